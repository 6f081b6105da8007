"""VQAv2 with the answer vocabulary and soft scores (vqa schema).

Raw layout under raw_dir (https://visualqa.org/download.html; the images are COCO's,
https://cocodataset.org/#download):

    v2_OpenEnded_mscoco_train2014_questions.json      {"questions": [{"image_id": 458752,
    v2_OpenEnded_mscoco_val2014_questions.json          "question": "What is this photo
    v2_OpenEnded_mscoco_test2015_questions.json         taken looking through?",
    v2_OpenEnded_mscoco_test-dev2015_questions.json     "question_id": 458752000}, ...]}
    v2_mscoco_train2014_annotations.json   {"annotations": [{"question_id": 458752000,
    v2_mscoco_val2014_annotations.json       "image_id": 458752, "multiple_choice_answer":
                                             "net", "answers": [{"answer": "net",
                                             "answer_confidence": "maybe", "answer_id": 1},
                                             ... 10 annotators]}, ...]}
    train2014/COCO_train2014_000000458752.jpg ...
    val2014/COCO_val2014_000000000042.jpg ...
    test2015/COCO_test2015_000000000001.jpg ...   (test and test-dev share these)

Splits: `train`, `val`, `test_dev`, `test`. One record per image with all its questions
(whitespace-stripped) and their `question_id`s.

Answers are normalised as in the official VQA evaluation (punctuation, number words,
articles, contractions; `normalize_answer`). The vocabulary is every normalised
`multiple_choice_answer` seen at least `min_answer_count` (9, as ViLT/METER/ManagerTower)
times in train + val, ordered by descending count then alphabetically, 3129 answers on the
real data; it is written as `answers.json` next to the shards (`read_answers`); a different
`min_answer_count` needs its own data_dir, as a built dataset is never rebuilt in place. Each
question's labels are the vocabulary answers among its 10 annotators' normalised answers,
most given first, scored 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 annotators. Questions
with no answer in the vocabulary are kept, all labels -1: ViLT drops them from training
(`answer_labels[:, 0] == -1` finds them), while the VQA score of val counts them. Test splits
have no answers: labels -1, scores 0.
"""
import collections
import itertools
import json
import os
import re
from typing import Iterator

from mtower_jax.data import records
from mtower_jax.data.bad_records import BadRecords, DataError
from mtower_jax.data.builders.base import RawFilesBuilder, read_json
from mtower_jax.data.builders.raw_rows import Example, Groups, clean_text

LAYOUT = __doc__
ANSWERS_FILE = "answers.json"
DEFAULT_MIN_ANSWER_COUNT = 9
# split -> (questions file, annotations file or None, image folder / file prefix)
SPLITS = {
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json",
              "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json",
            "v2_mscoco_val2014_annotations.json", "val2014"),
    "test_dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
}

# --- answer normalisation, as the official VQA evaluation (vqaEval.py) ----------------------
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5",
                six="6", seven="7", eight="8", nine="9", ten="10")
_ARTICLES = {"a", "an", "the"}
# The official table maps each contraction written without (some of) its apostrophes back
# to it; listing the contractions and generating the variants is the compact equivalent.
_CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
    hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll
    ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't
    she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd
    someone'd've someone'll someone's something'd something'd've something'll that's there'd
    there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've
    we've weren't what'll what're what's what've when's where'd where's where've who'd
    who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all
    y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _without_apostrophes(word: str) -> set[str]:
    """`word` with every non-empty subset of its inner apostrophes removed."""
    parts = word.split("'")
    variants = set()
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        variants.add(parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:])))
    return variants - {word}


_CONTRACTION_OF = {variant: word
                   for word in _CONTRACTIONS for variant in _without_apostrophes(word)}


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (ViLT's `normalize_word`): punctuation removed
    or turned into spaces, periods not before a digit dropped, lower case, number words to
    digits, articles dropped, contractions restored."""
    text = answer
    drop = _COMMA_BETWEEN_DIGITS.search(answer) is not None
    for p in _PUNCTUATION:
        # Punctuation next to a space (or any text with a "1,000") vanishes, else it splits.
        gone = drop or p + " " in answer or " " + p in answer
        text = text.replace(p, "" if gone else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTION_OF.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def answer_vocabulary(answers: list[str], min_count: int) -> list[str]:
    """The (normalised) answers seen >= min_count times: most frequent first, ties by name."""
    counts = collections.Counter(answers)
    return sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))


def soft_score(count: int) -> float:
    """The VQA soft target of an answer that `count` of the 10 annotators gave."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def answer_targets(annotator_answers: list[str], label_of: dict[str, int]):
    """[MAX_ANSWERS] labels and soft scores of one question from its annotators' answers."""
    counts = collections.Counter(normalize_answer(a) for a in annotator_answers)
    known = sorted(((label_of[a], c) for a, c in counts.items() if a in label_of),
                   key=lambda lc: (-lc[1], lc[0]))[:records.MAX_ANSWERS]
    return records.vqa_answer_arrays([label for label, _ in known],
                                     [soft_score(count) for _, count in known])


def read_answers(data_dir: str) -> list[str]:
    """The answer vocabulary (label -> answer) of a built VQAv2 dataset; `data_dir` is the
    builder's `data_dir` (the versioned folder holding the shards)."""
    path = os.path.join(data_dir, ANSWERS_FILE)
    if not os.path.exists(path):
        from mtower_jax.data.build import build_command  # the CLI imports the builders
        raise DataError(f"vqav2: no answer vocabulary {path}; the dataset is not built there. "
                        f"Build it with: {build_command('vqav2')}")
    with open(path) as f:
        return json.load(f)


class Vqav2(RawFilesBuilder):
    """VQAv2: questions grouped per COCO image, 3129-answer vocabulary, soft scores."""
    name = "vqav2"
    VERSION = "1.0.0"
    SCHEMA = "vqa"
    RAW_FILES = LAYOUT

    def __init__(self, *, min_answer_count: int = DEFAULT_MIN_ANSWER_COUNT, **kwargs):
        self.min_answer_count = min_answer_count
        super().__init__(**kwargs)

    def _splits(self, raw_dir: str, bad) -> dict:
        # Every file is loaded (or found missing) before anything is written.
        questions = {split: self._load(raw_dir, name, "questions")
                     for split, (name, _, _) in SPLITS.items()}
        annotations = {split: self._annotations(raw_dir, name, bad(split))
                       for split, (_, name, _) in SPLITS.items() if name}
        vocabulary = answer_vocabulary(
            [normalize_answer(a["multiple_choice_answer"])
             for split_annotations in annotations.values() for a in split_annotations.values()
             if isinstance(a.get("multiple_choice_answer"), str)],
            self.min_answer_count)
        if not vocabulary:
            raise DataError(f"{self.name}: no answer of the train and val annotations under "
                            f"{raw_dir} is given {self.min_answer_count} times or more, so the "
                            f"answer vocabulary would be empty; build with a smaller "
                            f"--min_answer_count (into a new --data_dir)")
        # data_dir is the build's temporary folder here: the file lands with the shards.
        with open(os.path.join(self.data_dir, ANSWERS_FILE), "w") as f:
            json.dump(vocabulary, f)
        label_of = {answer: label for label, answer in enumerate(vocabulary)}
        return {split: self._records(raw_dir, folder, questions[split],
                                     annotations.get(split), label_of, bad(split))
                for split, (_, _, folder) in SPLITS.items()}

    def _load(self, raw_dir: str, name: str, field: str) -> tuple[str, list]:
        path = os.path.join(raw_dir, name)
        content = read_json(path, self.name)
        if not isinstance(content, dict) or not isinstance(content.get(field), list):
            raise DataError(f"{self.name}: {path} has no {field!r} list")
        return path, content[field]

    def _annotations(self, raw_dir: str, name: str, bad: BadRecords) -> dict[int, dict]:
        """{question_id: annotation}; an annotation without a question id is skipped."""
        path, annotations = self._load(raw_dir, name, "annotations")
        by_question = {}
        for i, annotation in enumerate(annotations):
            if isinstance(annotation, dict) and isinstance(annotation.get("question_id"), int):
                by_question[annotation["question_id"]] = annotation
            else:
                bad.skip(f"{path}: annotations[{i}]", "malformed annotation: no question_id")
        return by_question

    def _records(self, raw_dir: str, folder: str, questions: tuple[str, list],
                 annotations: dict[int, dict] | None, label_of: dict[str, int],
                 bad: BadRecords) -> Iterator[Example]:
        path, entries = questions
        groups = Groups()
        for i, entry in enumerate(entries):
            source = f"{path}: questions[{i}]"
            try:
                image_id, question_id = int(entry["image_id"]), int(entry["question_id"])
                if not -2**63 <= question_id < 2**63:  # written as int64
                    raise ValueError(f"question_id {question_id} is out of the int64 range")
            except (KeyError, TypeError, ValueError, OverflowError) as e:  # Overflow: inf
                bad.skip(source, f"malformed question: {type(e).__name__}: {e}")
                continue
            text = clean_text(entry.get("question"), source, bad)
            if not text:
                continue
            if annotations is None:  # test splits: no answers
                labels, scores = records.vqa_answer_arrays([], [])
            else:
                annotation = annotations.get(question_id)
                answers = annotation.get("answers") if annotation else None
                if not isinstance(answers, list):
                    bad.skip(source, f"no answers: question {question_id} has no annotation")
                    continue
                labels, scores = answer_targets(
                    [a["answer"] for a in answers
                     if isinstance(a, dict) and isinstance(a.get("answer"), str)],
                    label_of)
            image = os.path.join(raw_dir, folder, f"COCO_{folder}_{image_id:012d}.jpg")
            groups.add(str(image_id), (image,), text, question_id=question_id,
                       answer_labels=labels, answer_scores=scores)
        yield from groups.records(bad)
