"""Fuzzing the raw-format readers with hypothesis: arbitrary bytes, arbitrary JSON values,
truncated files and garbage images fed to every raw builder.

A reader may only (a) yield good records: what tfds writes (encoded, serialized, keys
unique and UTF-8), texts non-empty, images that the pipeline decodes; or (b) skip a bad
record and count it with its source: the file and the line / entry / row, or the image path.
The one exception allowed is DataError: the skip threshold passed (the message names the
threshold, the count and how to change it), or a file the builder cannot do without that is
missing or unparseable as a whole (the message names the file).

The readers run as `build()` runs them (`_split_generators`: the records of every split,
then the split's skip check); each record goes through the encode + serialize of tfds'
writer, without writing shards (a full build per example costs ~0.1 s); the bad inputs found
go through real builds at the end. MTOWER_FUZZ_SCALE=N runs N times as many examples per
test (a longer campaign: 15 passed in about 5 minutes).
"""
import atexit
import io
import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from tensorflow_datasets.core import example_serializer

from mtower_jax.data import examples, image_transforms, pipeline
from mtower_jax.data.bad_records import DataError
from mtower_jax.data.builders import arrow_import, get_builder
from mtower_jax.data.builders.base import image_problem
from mtower_jax.data.synthetic import TOKENIZER_DIR
from mtower_jax.data.tokenizer import Tokenizer
from test_builders import (nlvr2_line, texts, write_arrow, write_bytes, write_coco,
                           write_flickr, write_image, write_json, write_lines, write_snli_ve,
                           write_vqa)

SCALE = int(os.environ.get("MTOWER_FUZZ_SCALE", "1"))
# Overwritten image headers claim huge sizes; PIL warns, then the image stands on its merits.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def fuzz(runs: int):
    """Hypothesis settings: `runs` x SCALE examples, no deadline (the CPU is shared), no
    example database (a failure prints the example to reproduce it)."""
    return settings(max_examples=runs * SCALE, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- one valid raw directory per builder (bad records included: the baseline has skips) ---

def write_vg(raw) -> None:
    write_image(raw / "VG_100K" / "1.jpg")
    write_image(raw / "VG_100K_2" / "2.jpg")
    write_json(raw / "region_descriptions.json", [
        {"id": 1, "regions": [{"phrase": "red sky"}, {"phrase": "a clock"}]},
        {"id": 2, "regions": [{"phrase": "green"}, {"phrase": " "}]}, {"id": 3, "regions": []}])


def write_nlvr2(raw) -> None:
    for split in ("train", "dev", "test1"):
        folder = raw / split / "7" if split == "train" else raw / split
        for pair in (f"{split}-1-0", f"{split}-2-0"):
            for side in (0, 1):
                write_image(folder / f"{pair}-img{side}.png", (side * 200, 0, 0), "PNG")
        write_lines(raw / f"{split}.json", [
            nlvr2_line(f"{split}-1-0-0", "Two dogs.", "True", directory="7"),
            nlvr2_line(f"{split}-1-0-1", "No dogs.", "False", directory="7"),
            nlvr2_line(f"{split}-2-0-0", "A cat.", "True", directory="7"), "{bad"])


def write_sbu(raw) -> None:
    write_lines(raw / "SBU_captioned_photo_dataset_urls.txt",
                ["http://x.com/1/a.jpg", "http://x.com/2/b.jpg", "http://x.com/3/gone.jpg"])
    write_lines(raw / "SBU_captioned_photo_dataset_captions.txt", ["one", "two", "three"])
    write_image(raw / "images" / "a.jpg")
    write_image(raw / "images" / "b.jpg")


def write_cc3m(raw) -> None:
    write_lines(raw / "Train_GCC-training.tsv", ["a dog\thttp://x/0", 'a "cat"\thttp://x/1',
                                                  "gone\thttp://x/2"])
    write_lines(raw / "Validation_GCC-1.1.0-Validation.tsv", ["val\thttp://y/0"])
    write_image(raw / "training" / "000000000.jpg")
    write_image(raw / "training" / "1.png", fmt="PNG")
    write_image(raw / "validation" / "000000000.jpg")


def jpeg(color=(200, 30, 30), size=(8, 8), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def write_arrow_captions(raw) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    image = jpeg()
    write_arrow(raw / "coco_caption_karpathy_train.arrow", dict(
        image=[image, image, jpeg((0, 0, 9))], caption=[[" a ", "b"], ["c"], ["t"]],
        image_id=["x.jpg", "y.jpg", "t.jpg"], split=["train", "restval", "test"]))


VQA_FILES = ["v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
             "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
             "v2_OpenEnded_mscoco_test2015_questions.json",
             "v2_OpenEnded_mscoco_test-dev2015_questions.json"]


def with_spare_images(write, *images):
    """`write` plus images no record uses yet, for fuzzed entries to point at."""
    def write_all(raw):
        write(raw)
        for image in images:
            write_image(raw / image)
    return write_all


# builder -> (fixture writer, the raw files it reads, constructor arguments)
FIXTURES = {
    "coco_captions": (with_spare_images(write_coco, "val2014/COCO_val2014_000000000009.jpg"),
                      ["dataset_coco.json"], {}),
    "f30k_retrieval": (with_spare_images(write_flickr, "flickr30k-images/spare.jpg"),
                       ["dataset_flickr30k.json"], {}),
    "visual_genome": (with_spare_images(write_vg, "VG_100K/9.jpg"),
                      ["region_descriptions.json"], {}),
    "vqav2": (write_vqa, VQA_FILES, dict(min_answer_count=1)),
    "nlvr2": (write_nlvr2, ["train.json", "dev.json", "test1.json"], {}),
    "snli_ve": (write_snli_ve, ["snli_ve_train.jsonl", "snli_ve_dev.jsonl",
                                "snli_ve_test.jsonl"], {}),
    "sbu": (write_sbu, ["SBU_captioned_photo_dataset_urls.txt",
                        "SBU_captioned_photo_dataset_captions.txt"], {}),
    "cc3m": (with_spare_images(write_cc3m, *(f"training/{row}.jpg" for row in range(3, 9))),
             ["Train_GCC-training.tsv", "Validation_GCC-1.1.0-Validation.tsv"], {}),
    "arrow_captions": (write_arrow_captions, ["coco_caption_karpathy_train.arrow"], {}),
}
FILES = [(name, file) for name, (_, files, _) in FIXTURES.items() for file in files]
_TEMPLATES = tempfile.mkdtemp(prefix="fuzz_readers_")
atexit.register(shutil.rmtree, _TEMPLATES, True)


class Raw:
    """A fresh copy of `name`'s valid raw directory (written once per session), to mutate."""

    def __init__(self, name: str):
        template = pathlib.Path(_TEMPLATES) / name / "raw"
        if not template.exists():
            FIXTURES[name][0](template)
        self.name, self.root = name, pathlib.Path(tempfile.mkdtemp(prefix=f"{name}_"))
        self.path = self.root / "raw"
        shutil.copytree(template, self.path)

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def read(self, max_skipped_fraction: float = 1.0):
        """(builder, {split: {key: record}}) as `build()` reads them, checked; raises what
        the build would raise (DataError only, else the test fails)."""
        builder = get_builder(self.name, raw_dir=str(self.path), data_dir=str(self.root / "data"),
                              max_skipped_fraction=max_skipped_fraction, **FIXTURES[self.name][2])
        os.makedirs(builder.data_dir, exist_ok=True)  # vqav2 writes answers.json there
        features = builder.info.features
        serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        splits = {}
        for split, generated in builder._split_generators(dl_manager=None).items():
            records = splits[split] = {}
            for key, record in generated:
                assert key not in records, f"duplicate key {key!r}: tfds refuses the split"
                key.encode("utf-8")  # tfds hashes keys as UTF-8
                serializer.serialize_example(features.encode_example(record))  # what is written
                records[key] = record
        check_records(builder, splits, self.path)
        return builder, splits

    def outcome(self, max_skipped_fraction: float = 1.0):
        """`read()`, or (None, DataError) when the build would stop with one."""
        try:
            return self.read(max_skipped_fraction)
        except DataError as e:
            assert str(self.path) in str(e), f"the error names no file: {e}"
            return None, e


# How a skip names its source: a file (or image) under raw_dir, then where in it.
_SOURCE = re.compile(r"^(?P<file>.+?)(?P<where>:\d+( \(.*\))?|: (entry \d+( text \d+)?|"
                     r"questions\[\d+\]|annotations\[\d+\]|row \d+( caption \d+)?))?$", re.S)


def check_records(builder, splits: dict, raw) -> None:
    """Every record is good, every text is either kept or counted as skipped, and every
    logged skip names its file under raw_dir, and where in it for an annotation file."""
    for split, records in splits.items():
        kept = 0
        for record in records.values():
            record_texts = record["texts"]
            assert record_texts and all(isinstance(t, str) and t and t == t.strip()
                                        for t in record_texts)
            for field in ("image", "image_2"):
                if field in record:
                    image_transforms.decode(record[field])  # as the pipeline will
            for field, values in record.items():
                if field not in ("image", "image_2", "image_id", "texts"):
                    assert len(values) == len(record_texts), field
            kept += len(record_texts)
        bad = builder.bad[split]
        assert bad.seen == kept + bad.skipped, (bad.seen, kept, bad.skipped)
        for source, reason in bad.examples:
            match = _SOURCE.match(source)
            assert match["file"].startswith(str(raw)) and reason, (source, reason)
            if os.path.basename(match["file"]) in FIXTURES[builder.name][1]:
                assert match["where"], f"{source}: the line / entry / row is not named"


def texts_of(splits: dict) -> dict:
    return {(split, key): record["texts"] for split, records in splits.items()
            for key, record in records.items()}


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def assert_baseline_kept(baseline: dict, splits: dict) -> None:
    """The records of the untouched input are all still there with all their texts."""
    after = texts_of(splits)
    for key, before in texts_of(baseline).items():
        assert key in after and is_subsequence(before, after[key]), (key, before, after.get(key))


_BASELINES = {}


def baseline(name: str) -> dict:
    if name not in _BASELINES:
        with Raw(name) as raw:
            _BASELINES[name] = raw.read()[1]
    return _BASELINES[name]


# --- strategies ----------------------------------------------------------------------------

# Any text: lone surrogates (valid in JSON's \\u escapes; hypothesis leaves them out unless
# asked), NUL and line separators included.
any_text = st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"])
                   | st.sampled_from(["\x00", "\r", "\x85", "\u2028"]), max_size=12)
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
                | st.floats() | any_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)


@st.composite
def near(draw, valid: dict, **plausible):
    """`valid` (an entry that yields a record) with up to two fields replaced by a plausible
    bad value or any JSON value, or dropped: the other fields stay good, so that the bad
    ones get far into the reader. Shrinks towards `valid`."""
    entry = dict(valid)
    for key in draw(st.lists(st.sampled_from(list(valid)), max_size=2, unique=True)):
        how = draw(st.integers(0, 3))
        if how < 2 and key in plausible:
            entry[key] = draw(plausible[key])
        elif how < 3:
            entry[key] = draw(json_values)
        else:
            del entry[key]
    return entry


SPLIT = st.sampled_from(["train", "restval", "val", "test"])
BAD_NAMES = any_text | st.sampled_from(["..", "/etc", "a\x00b", "\udc80", "../../etc/passwd"])
BIG_INTS = st.integers(-2**70, 2**70) | st.sampled_from([2**63, -2**63 - 1])
NUMBERS = BIG_INTS | st.floats() | st.sampled_from(["12", " 3 ", "x"])


def texts_list(field: str, valid: str):
    return st.lists(near({field: valid}, **{field: any_text}) | json_values, max_size=3)


# Each builder's spare image (in the fixture, in no baseline record) makes `valid` yield one.
KARPATHY_ENTRY = near(dict(split="val", filepath="val2014",
                           filename="COCO_val2014_000000000009.jpg", cocoid=9,
                           sentences=[{"raw": "spare"}]),
                      split=SPLIT, filepath=BAD_NAMES, filename=BAD_NAMES,
                      cocoid=NUMBERS | any_text, sentences=texts_list("raw", "spare"))
FLICKR_ENTRY = near(dict(split="test", filename="spare.jpg", sentences=[{"raw": "spare"}]),
                    split=SPLIT, filename=BAD_NAMES, sentences=texts_list("raw", "spare"))
VG_ENTRY = near(dict(id=9, regions=[{"phrase": "spare"}]), id=NUMBERS | BAD_NAMES,
                regions=texts_list("phrase", "spare"))
VQA_QUESTION = near(dict(image_id=2, question="Spare?", question_id=11),  # 11 is answered
                    image_id=NUMBERS, question=any_text, question_id=NUMBERS)
VQA_TEST_QUESTION = near(dict(image_id=5, question="Spare?", question_id=77),
                         image_id=NUMBERS, question=any_text, question_id=NUMBERS)
VQA_ANNOTATION = near(dict(question_id=20, image_id=2, multiple_choice_answer="dog",
                           answers=[{"answer": "dog"}] * 10),
                      question_id=NUMBERS, multiple_choice_answer=any_text,
                      answers=st.lists(near({"answer": "dog"}, answer=any_text) | json_values,
                                       max_size=11))
NLVR2_LINE = near(dict(identifier="train-2-0-5", sentence="Spare.", label="True", directory="7"),
                  identifier=BAD_NAMES | st.sampled_from(["train-2-0-\udc80", "x"]),
                  sentence=any_text, label=any_text, directory=BAD_NAMES)
SNLI_VE_LINE = near(dict(Flikr30kID="2.jpg", sentence2="Spare.", gold_label="neutral",
                         pairID="p9"),
                    Flikr30kID=BAD_NAMES, sentence2=any_text, gold_label=any_text,
                    pairID=any_text)


@st.composite
def mutated_bytes(draw, valid: bytes) -> bytes:
    """Garbage, the valid content truncated, with bytes overwritten, or with a 140 kB run of
    one byte inserted (a line longer than csv's field limit)."""
    kind = draw(st.sampled_from(["garbage", "truncated", "overwritten", "long"]))
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    cut = draw(st.integers(0, len(valid)))
    if kind == "truncated":
        return valid[:cut]
    if kind == "long":
        return valid[:cut] + draw(st.binary(min_size=1, max_size=1)) * 140_000 + valid[cut:]
    return valid[:cut] + draw(st.binary(min_size=1, max_size=8)) + valid[cut + 8:]


def image_bytes() -> st.SearchStrategy:
    """Garbage images: random bytes, JPEG/PNG/GIF/WEBP truncated or with bytes overwritten."""
    valid = st.sampled_from([jpeg(), jpeg(fmt="PNG"), jpeg(fmt="GIF"), jpeg(fmt="WEBP"),
                             jpeg(size=(40, 3), fmt="PNG")])
    return valid.flatmap(mutated_bytes)


# --- whole files: garbage, truncated, overwritten ------------------------------------------


@pytest.mark.parametrize("name, file", FILES)
@fuzz(25)
@given(data=st.data())
def test_any_bytes_in_any_raw_file_are_skipped_or_a_data_error(name, file, data):
    with Raw(name) as raw:
        path = raw.path / file
        content = data.draw(mutated_bytes(path.read_bytes()), label="content")
        path.write_bytes(content)
        raw.outcome()


# --- one bad entry / line / row among good ones --------------------------------------------


@pytest.mark.parametrize("name, file, field, entry", [
    ("coco_captions", "dataset_coco.json", "images", KARPATHY_ENTRY),
    ("f30k_retrieval", "dataset_flickr30k.json", "images", FLICKR_ENTRY),
    ("visual_genome", "region_descriptions.json", None, VG_ENTRY),
    ("vqav2", VQA_FILES[0], "questions", VQA_QUESTION),
    ("vqav2", VQA_FILES[1], "annotations", VQA_ANNOTATION),
    ("vqav2", VQA_FILES[4], "questions", VQA_TEST_QUESTION),
])
@fuzz(40)
@given(data=st.data())
def test_a_bad_json_entry_is_skipped_and_the_good_ones_kept(name, file, field, entry, data):
    with Raw(name) as raw:
        path = raw.path / file
        content = json.loads(path.read_text())
        entries = content[field] if field else content
        entries.append(data.draw(entry | json_values, label="entry"))
        write_json(path, content)
        builder, splits = raw.read()
        if not (name == "vqav2" and field == "annotations"):  # a new answer may relabel
            assert_baseline_kept(baseline(name), splits)


JSONL_LINE = {"nlvr2": NLVR2_LINE, "snli_ve": SNLI_VE_LINE}


@pytest.mark.parametrize("name", ["nlvr2", "snli_ve"])
@fuzz(40)
@given(data=st.data())
def test_bad_jsonl_lines_are_skipped_with_file_and_line(name, data):
    """Garbage lines go anywhere; JSON lines after the good ones (the first line of an image
    sets its paths: a bad one first would lose the image's good lines, counted)."""
    garbage = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")) | st.sampled_from(
        [b"[" * 100_000, b"1" * 5000, b'{"identifier": "\xff"}'])  # deep, a huge int, not UTF-8
    line = (JSONL_LINE[name] | json_values).map(lambda v: json.dumps(v).encode())
    with Raw(name) as raw:
        path = raw.path / FIXTURES[name][1][0]
        lines = path.read_bytes().splitlines()
        for _ in range(data.draw(st.integers(1, 4), label="count")):
            if data.draw(st.booleans(), label="garbage"):
                lines.insert(data.draw(st.integers(0, len(lines))), data.draw(garbage))
            else:
                lines.append(data.draw(line, label="line"))
        path.write_bytes(b"\n".join(lines) + b"\n")
        builder, splits = raw.read()
        assert_baseline_kept(baseline(name), splits)
        sources = {source for source, _ in builder.bad["train"].examples}
        for line_no, content in enumerate(lines, 1):
            try:
                json.loads(content.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                if content.strip():
                    assert f"{path}:{line_no}" in sources, (line_no, content, sources)


URLS = st.sampled_from(["http://x.com/1/a.jpg", "http://[x/a.jpg", "http://x.com/..",
                        "http://x/\x00.jpg", "http://x/\udc80.jpg", ""]) | any_text


@fuzz(40)
@given(rows=st.lists(st.tuples(URLS, any_text), max_size=6), extra=st.booleans())
def test_sbu_any_url_and_caption_lines(rows, extra):
    """Lines are matched by number, so a caption with a stray '\\r' must not shift the rest;
    files of different lengths are a DataError."""
    with Raw("sbu") as raw:
        def write(file: str, lines: list[str]) -> None:
            text = "".join(line.replace("\n", " ") + "\n" for line in lines)
            (raw.path / file).write_bytes(text.encode("utf-8", "surrogatepass"))
        write(FIXTURES["sbu"][1][0], ["http://x.com/1/a.jpg", "http://x.com/2/b.jpg"]
              + [url for url, _ in rows] + (["http://x/y.jpg"] if extra else []))
        write(FIXTURES["sbu"][1][1], ["one", "two"] + [caption for _, caption in rows])
        if extra:
            with pytest.raises(DataError, match="not aligned"):
                raw.read()
        else:
            assert raw.read()[0].bad["train"].seen == 2 + len(rows)


@fuzz(40)
@given(rows=st.lists(any_text | st.tuples(any_text, any_text).map("\t".join), max_size=6))
def test_cc3m_any_rows(rows):
    with Raw("cc3m") as raw:
        tsv = raw.path / FIXTURES["cc3m"][1][0]
        good = tsv.read_bytes()
        extra = "".join(r.replace("\n", " ").replace("\r", " ") + "\n" for r in rows)
        tsv.write_bytes(good + extra.encode("utf-8", "surrogatepass"))
        builder, splits = raw.read()
        assert_baseline_kept(baseline("cc3m"), splits)


arrow_text = st.text(max_size=12)  # Arrow strings are UTF-8: no lone surrogates
three = dict(min_size=3, max_size=3)
ARROW_COLUMNS = {  # ViLT's types, and others
    "image": st.lists(st.binary(max_size=20) | st.just(jpeg()) | st.none(), **three)
    | st.lists(arrow_text, **three),
    "caption": st.lists(st.lists(arrow_text | st.none(), max_size=3) | st.none(), **three)
    | st.lists(arrow_text, **three) | st.lists(st.integers(), **three),
    "image_id": st.lists(arrow_text, **three) | st.lists(st.integers(0, 2), **three),
    "split": st.lists(SPLIT | arrow_text | st.none(), **three) | st.lists(st.integers(), **three)
    | st.lists(st.lists(SPLIT), **three),
}


@fuzz(40)
@given(columns=st.fixed_dictionaries(ARROW_COLUMNS))
def test_arrow_any_column_values(columns):
    with Raw("arrow_captions") as raw:
        try:
            table = pa.table({k: pa.array(v) for k, v in columns.items()})
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return  # mixed types pyarrow cannot put in one column: no such file exists
        write_arrow(raw.path / "extra.arrow", {k: table.column(k) for k in table.column_names})
        raw.outcome()


# --- garbage images --------------------------------------------------------------------------

IMAGE_OF = {  # builder -> an image file of one of its good records, and that record's key
    "coco_captions": ("train2014/COCO_train2014_000000000002.jpg", ("train", "2")),
    "nlvr2": ("dev/dev-1-0-img1.png", ("dev", "dev-1-0")),
    "cc3m": ("training/1.png", ("train", "1")),
}


@pytest.mark.parametrize("name", IMAGE_OF)
@fuzz(30)
@given(data=image_bytes())
def test_a_garbage_image_is_skipped_with_its_path(name, data):
    file, key = IMAGE_OF[name]
    with Raw(name) as raw:
        (raw.path / file).write_bytes(data)
        builder, splits = raw.read()
        problem = image_problem(data)
        assert (key[1] in splits[key[0]]) == (not problem)
        if problem:
            assert (str(raw.path / file), problem) in builder.bad[key[0]].examples


@fuzz(30)
@given(data=image_bytes())
def test_a_garbage_arrow_image_is_skipped_with_its_row(data):
    with Raw("arrow_captions") as raw:
        write_arrow(raw.path / "extra.arrow", dict(image=[data], caption=[["z"]],
                                                   image_id=["z.jpg"], split=["test"]))
        builder, splits = raw.read()
        problem = image_problem(data)
        assert ("z.jpg" in splits["test"]) == (not problem)
        if problem:
            assert builder.bad["test"].examples == [(f"{raw.path / 'extra.arrow'}: row 0",
                                                     problem)]


_SPECS = {}


def load_in_pipeline(image: bytes, mode: str):
    """The training pipeline's load step on a record holding `image`: (features or None,
    the step's BadRecords)."""
    if mode not in _SPECS:
        _SPECS[mode] = examples.TaskSpec(task="pretrain", tokenizer=Tokenizer.from_dir(
            TOKENIZER_DIR), image_size=16, max_text_len=16, image_mode=mode)
    records = [dict(image=image, image_id=b"x", texts=[b"a red square"])]
    load = pipeline.LoadExample(pipeline.SplitIndex.build([(records, np.array([1]))]),
                                _SPECS[mode], "fuzz", max_skipped_fraction=1.0)
    return load.random_map(0, np.random.default_rng(0)), load.bad


def bomb_gif() -> bytes:
    """A GIF whose header claims 65535 x 65535 pixels: PIL's DecompressionBombError, which
    is not an OSError (found by this test: it crashed the pipeline)."""
    gif = jpeg(fmt="GIF")
    return gif[:6] + b"\xff\xff\xff\xff" + gif[10:]


@fuzz(50)
@given(data=image_bytes() | st.binary(max_size=100),
       mode=st.sampled_from(image_transforms.MODES))
@example(data=bomb_gif(), mode="eval")
def test_build_time_image_check_agrees_with_the_pipeline(data, mode):
    """An image the builders accept loads in the pipeline in every transform mode; one they
    refuse is skipped and counted there too (a damaged shard), never crashing the run."""
    features, bad = load_in_pipeline(data, mode)
    if image_problem(data):
        assert features is None and bad.skipped == 1 and "corrupt image" in bad.reasons
    else:
        assert features["pixel_values"].shape == (16, 16, 3)
        assert np.isfinite(features["pixel_values"]).all() and bad.skipped == 0


# --- the skip threshold ---------------------------------------------------------------------


@fuzz(30)
@given(good=st.integers(0, 12), bad=st.integers(0, 12),
       threshold=st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 0.99]))
def test_the_threshold_fails_exactly_when_passed_and_says_how_to_change_it(good, bad, threshold):
    """cc3m rows: `good` with an image, `bad` whose image was never downloaded."""
    with Raw("cc3m") as raw:
        tsv = raw.path / FIXTURES["cc3m"][1][0]
        write_lines(tsv, [f"caption {i}\thttp://x/{i}" for i in range(good + bad)])
        shutil.rmtree(raw.path / "training")
        for i in range(good):
            write_image(raw.path / "training" / f"{i}.jpg")
        if good + bad == 0:
            with pytest.raises(DataError, match="cc3m/train: no records found under"):
                raw.read(threshold)
            return
        if bad / (good + bad) <= threshold:
            if good:
                assert raw.read(threshold)[0].bad["train"].skipped == bad
            else:
                with pytest.raises(DataError, match="no records found"):
                    raw.read(threshold)
            return
        with pytest.raises(DataError) as error:
            raw.read(threshold)
        message = str(error.value)
        # It may stop early, at the first count that passes the threshold (bad_records.py).
        skipped, seen = map(int, re.search(r"cc3m/train: skipped (\d+) of (\d+) records",
                                           message).groups())
        assert 0 < skipped <= bad and seen <= good + bad and skipped / seen > threshold
        assert f"max_skipped_fraction={threshold:.2%}" in message
        assert "--max_skipped_fraction" in message and "config.data.max_skipped_fraction" in message
        assert f"{tsv}:" in message  # the first bad rows, by line


# --- the bad inputs found (by the fuzzing, or while fixing what it found), in a real build -


def append_json(path, field: str | None, *entries) -> None:
    content = json.loads(path.read_text())
    (content[field] if field else content).extend(entries)
    write_json(path, content)


def append_lines(path, *lines: bytes) -> None:
    path.write_bytes(path.read_bytes() + b"".join(line + b"\n" for line in lines))


def poison_coco(raw) -> list[tuple[str, str]]:
    spare = dict(split="val", filepath="val2014", cocoid=9,
                 filename="COCO_val2014_000000000009.jpg")
    write_bytes(raw / "val2014" / "COCO_val2014_000000000010.jpg", bomb_gif())
    path = raw / "dataset_coco.json"
    append_json(path, "images",
                dict(spare, sentences=[{"raw": "lone \ud800"}, {"raw": "kept"}]),
                dict(spare, cocoid=11, filename="a\x00b.jpg", sentences=[{"raw": "x"}]),
                dict(spare, cocoid=12, filepath="/etc", sentences=[{"raw": "x"}]),
                dict(spare, cocoid="\udc80", sentences=[{"raw": "x"}]),
                dict(spare, cocoid=10, filename="COCO_val2014_000000000010.jpg",
                     sentences=[{"raw": "x"}]))
    return [(f"{path}: entry 8 text 0", "text not encodable as UTF-8"),
            (str(raw / "val2014" / "a\x00b.jpg"), "missing or unreadable file"),
            (f"{path}: entry 10", "malformed entry: ValueError: image path '/etc/"),
            (f"{path}: entry 11", "malformed entry: ValueError: '\\udc80' is not encodable"),
            (str(raw / "val2014" / "COCO_val2014_000000000010.jpg"),
             "corrupt image: DecompressionBombError")]


def poison_vqav2(raw) -> list[tuple[str, str]]:
    path = raw / VQA_FILES[4]
    text = path.read_text()
    assert text.endswith("]}")
    path.write_text(text[:-2] + ', {"image_id": Infinity, "question": "q", "question_id": 1}, '
                    '{"image_id": 5, "question": "q", "question_id": 1180591620717411303424}]}')
    return [(f"{path}: questions[2]", "malformed question: OverflowError"),
            (f"{path}: questions[3]", "malformed question: ValueError: question_id")]


def poison_nlvr2(raw) -> list[tuple[str, str]]:
    path = raw / "train.json"
    append_lines(path, b'{"identifier": "train-2-0-\xff"}', b"[" * 100_000, b"1" * 5000,
                 json.dumps(nlvr2_line("train-2-0-\udc80", "s", "True", directory="7")).encode(),
                 json.dumps(nlvr2_line("train-2-0-9", "s", "True", directory="../..")).encode())
    return [(f"{path}:4", "malformed JSON line"),  # the fixture's own bad line
            (f"{path}:5", "malformed JSON line: UnicodeDecodeError"),
            (f"{path}:6", "malformed JSON line: RecursionError"),
            (f"{path}:7", "malformed JSON line: ValueError: Exceeds the limit"),
            (f"{path}:8 (identifier 'train-2-0-\\udc80')", "malformed line: ValueError"),
            (f"{path}:9 (identifier 'train-2-0-9')", "malformed line: ValueError: image path")]


def poison_sbu(raw) -> list[tuple[str, str]]:
    urls, captions = (raw / file for file in FIXTURES["sbu"][1])
    append_lines(urls, b"http://[x/a.jpg", b"http://x.com/\xff.jpg", b"http://x.com/9/a.jpg")
    append_lines(captions, b"ipv6", b"not utf-8", b"a stray \r carriage return")
    return [(str(raw / "images" / "gone.jpg"), "missing or unreadable file"),
            (f"{urls}:4", "no file name in URL"),
            (str(raw / "images" / "\ufffd.jpg"), "missing or unreadable file")]


def poison_cc3m(raw) -> list[tuple[str, str]]:
    tsv = raw / FIXTURES["cc3m"][1][0]
    append_lines(tsv, b"x" * 140_000 + b"\thttp://x/3", b"nul \x00 inside\thttp://x/4")
    return [(f"{tsv}:3", "image never downloaded")]


@pytest.mark.parametrize("name, poison", [
    ("coco_captions", poison_coco), ("vqav2", poison_vqav2), ("nlvr2", poison_nlvr2),
    ("sbu", poison_sbu), ("cc3m", poison_cc3m)])
def test_the_bad_inputs_found_build_with_each_bad_record_skipped(name, poison, tmp_path):
    """Before the fixes, each of these stopped the build with a traceback, read a file outside
    raw_dir, or shifted SBU's lines (a stray '\\r'); the bomb passed the build's check and
    crashed the training pipeline."""
    with Raw(name) as raw:
        expected = poison(raw.path)
        builder = get_builder(name, raw_dir=str(raw.path), data_dir=str(tmp_path),
                              max_skipped_fraction=1.0, **FIXTURES[name][2]).build()
        logged = [example for bad in builder.bad.values() for example in bad.examples]
        for source, reason in expected:
            assert any(s == source and r.startswith(reason) for s, r in logged), (
                source, reason, logged)
        if name == "sbu":  # a '\r' inside a caption does not shift the lines after it
            assert texts(builder, "train")["a"] == ["one", "a stray \r carriage return"]
        if name == "cc3m":  # a 140 kB caption is kept (it is text), and so is the NUL one
            assert sorted(texts(builder, "train")) == ["0", "1", "3", "4"]


def test_a_damaged_or_foreign_arrow_file_is_a_data_error_naming_it(tmp_path):
    """Every 8-byte overwrite of a valid file: a DataError when opened, or every row reads
    (some of these segfaulted the reader: pyarrow trusts a file's offsets until validated)."""
    with Raw("arrow_captions") as raw:
        path = raw.path / FIXTURES["arrow_captions"][1][0]
        valid = path.read_bytes()
        refused = 0
        for offset in range(0, len(valid) - 8, 4):
            path.write_bytes(valid[:offset] + b"\x7f" * 8 + valid[offset + 8:])
            try:
                table = arrow_import._open(str(path))
            except DataError as e:
                assert str(path) in str(e)
                refused += 1
                continue
            for batch in table.to_batches(max_chunksize=256):
                [batch.column(name).to_pylist() for name in arrow_import.COLUMNS]
        assert refused > 100  # the sweep does reach the structure, not only image bytes
        write_arrow(path, dict(image=[b"x"], caption=[1], image_id=["a"], split=["train"]))
        with pytest.raises(DataError, match="column caption is int64, not list<string>"):
            get_builder("arrow_captions", raw_dir=str(raw.path), data_dir=str(tmp_path)).build()
