"""The tfds builders of the raw datasets, each on a tiny fixture in its real raw format:
record contents, grouping, ids and labels, VQA vocabulary and soft scores, skip accounting of
bad input with its source, the threshold, missing files, the registry and the CLI."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs.pretrain import get_config
from mtower_jax.data import pipeline, records
from mtower_jax.data.bad_records import DataError
from mtower_jax.data.build import build as build_dataset
from mtower_jax.data.build import build_command
from mtower_jax.data.builders import BUILDERS, builder_class, get_builder
from mtower_jax.data.builders import vqav2
from mtower_jax.data.synthetic import TOKENIZER_DIR

# --- writing raw fixtures --------------------------------------------------------------------


def write_image(path, color=(200, 30, 30), fmt: str = "JPEG") -> bytes:
    """A 8x8 image of one colour in `fmt`; returns the bytes written."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, fmt)
    return write_bytes(path, buffer.getvalue())


def write_bytes(path, data: bytes) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


def write_corrupt(path) -> None:
    """A JPEG cut short: the header parses, the full decode fails."""
    write_bytes(path, write_image(path)[:120])


def write_json(path, content) -> None:
    write_bytes(path, json.dumps(content).encode())


def write_lines(path, lines: list) -> None:
    """Text lines; dicts are written as JSON (jsonl), strings verbatim."""
    text = "".join((json.dumps(l) if isinstance(l, dict) else l) + "\n" for l in lines)
    write_bytes(path, text.encode())


def karpathy(split: str, filename: str, captions: list[str], **fields) -> dict:
    return dict(split=split, filename=filename, sentences=[{"raw": c} for c in captions],
                **fields)


def write_coco(raw) -> None:
    """Karpathy COCO: two train, one restval, one val, one test image, plus bad ones."""
    def entry(split, cocoid, captions, folder="val2014", image=True):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        if image:
            write_image(raw / folder / filename)
        return karpathy(split, filename, captions, filepath=folder, cocoid=cocoid)

    images = [
        entry("train", 1, [" A cat. ", "A dog.", "", "c3", "c4", "c5", "c6"], folder="train2014"),
        entry("train", 2, ["two"], folder="train2014"),
        entry("restval", 3, ["three"]),
        entry("val", 4, ["four"]),
        entry("test", 5, ["five a", "five b"]),
        entry("train", 6, ["corrupt image", "lost too"], folder="train2014"),
        entry("train", 7, ["  ", ""]),          # every caption empty: no record
        entry("val", 8, ["missing"], image=False),
    ]
    write_corrupt(raw / "train2014" / "COCO_train2014_000000000006.jpg")
    write_json(raw / "dataset_coco.json", {"images": images})


def write_flickr(raw) -> None:
    captions = [f"caption {i}" for i in range(6)]
    images = [karpathy("train", "10.jpg", captions), karpathy("val", "20.jpg", captions[:5]),
              karpathy("test", "30.jpg", captions[:5]), karpathy("test", "40.jpg", captions[:5])]
    for image in images:
        write_image(raw / "flickr30k-images" / image["filename"])
    write_json(raw / "dataset_flickr30k.json", {"images": images})


# --- reading what was built ------------------------------------------------------------------


def build(name: str, raw, tmp_path, max_skipped_fraction: float = 1.0, **kwargs):
    """Builds `name` from `raw` into tmp_path/data; the default threshold allows any skips."""
    return get_builder(name, raw_dir=str(raw), data_dir=str(tmp_path / "data"),
                       max_skipped_fraction=max_skipped_fraction, **kwargs).build()


def _decoded(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) or (isinstance(value, np.ndarray) and value.dtype == object):
        return [v.decode() for v in value]
    return value


def read(builder, split: str) -> dict[str, dict]:
    """{image_id: record} of a built split; texts decoded, images left as bytes."""
    source = builder.as_data_source()[split]
    out = {}
    for i in range(len(source)):
        record = {k: (v if k.startswith("image") and k != "image_id" else _decoded(v))
                  for k, v in source[i].items()}
        out[record["image_id"]] = record
    return out


def texts(builder, split: str) -> dict[str, list[str]]:
    return {image_id: r["texts"] for image_id, r in read(builder, split).items()}


def skipped_sources(builder, split: str) -> list[str]:
    return [source for source, _ in builder.bad[split].examples]


def check_text_index(builder) -> None:
    for split in builder.info.splits:
        counts = records.text_index(builder, split)
        assert counts.tolist() == [len(r["texts"]) for r in (
            builder.as_data_source()[split][i] for i in range(len(counts)))]


# --- builders --------------------------------------------------------------------------------


def test_coco_captions_records_splits_and_skips(tmp_path):
    raw = tmp_path / "raw"
    write_coco(raw)
    builder = build("coco_captions", raw, tmp_path)
    assert texts(builder, "train") == {  # train = train + restval; captions stripped, in order
        "1": ["A cat.", "A dog.", "c3", "c4", "c5", "c6"], "2": ["two"], "3": ["three"]}
    assert texts(builder, "val") == {"4": ["four"]}
    assert texts(builder, "test") == {"5": ["five a", "five b"]}
    image = read(builder, "val")["4"]["image"]
    assert image == (raw / "val2014" / "COCO_val2014_000000000004.jpg").read_bytes()
    check_text_index(builder)
    assert records.text_index(builder, "train").sum() == 8

    train = builder.bad["train"]
    # skipped texts: 1 empty caption, the corrupt image's 2, image 7's 2 empty captions
    assert (train.seen, train.skipped) == (13, 5)
    sources = skipped_sources(builder, "train")
    assert str(raw / "train2014" / "COCO_train2014_000000000006.jpg") in sources
    assert f"{raw / 'dataset_coco.json'}: entry 0 text 2" in sources
    assert "corrupt image" in train.reasons and train.reasons["empty or missing text"] == 3
    val = builder.bad["val"]
    assert val.skipped == 1 and "missing or unreadable file" in val.examples[0][1]


def test_the_skip_threshold_fails_the_build_with_its_value(tmp_path):
    raw = tmp_path / "raw"
    write_coco(raw)
    with pytest.raises(DataError, match=r"max_skipped_fraction=10\.00%"):
        build("coco_captions", raw, tmp_path, max_skipped_fraction=0.1)
    # the failed build left nothing that looks built: a second one generates again
    assert build("coco_captions", raw, tmp_path).bad["train"].skipped == 5


def test_a_split_with_every_record_bad_is_a_data_error_not_an_empty_split(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "flickr30k-images" / "1.jpg")
    write_json(raw / "dataset_flickr30k.json", {"images": [
        karpathy("train", "1.jpg", ["a"]), karpathy("val", "1.jpg", ["b"]),
        karpathy("test", "gone.jpg", ["c"])]})
    with pytest.raises(DataError, match="f30k_retrieval/test: skipped 1 of 1"):
        build("f30k_retrieval", raw, tmp_path, max_skipped_fraction=0.01)
    with pytest.raises(DataError, match="f30k_retrieval/test: no records found under"):
        build("f30k_retrieval", raw, tmp_path / "again")  # when every skip is allowed


def test_retrieval_keeps_five_captions_in_order_and_shares_the_coco_split(tmp_path):
    raw = tmp_path / "raw"
    write_flickr(raw)
    write_coco(raw)
    flickr = build("f30k_retrieval", raw, tmp_path)
    assert texts(flickr, "train") == {"10": [f"caption {i}" for i in range(5)]}
    assert set(texts(flickr, "test")) == {"30", "40"}
    # the text index, flattened in record order, maps every caption to its image
    test = flickr.as_data_source()["test"]
    owner = np.repeat(np.arange(len(test)), records.text_index(flickr, "test"))
    assert owner.tolist() == [0] * 5 + [1] * 5

    coco = build("coco_retrieval", raw, tmp_path)
    assert texts(coco, "train")["1"] == ["A cat.", "A dog.", "c3", "c4", "c5"]
    assert set(texts(coco, "train")) == {"1", "2", "3"}
    assert coco.data_dir != flickr.data_dir


def test_visual_genome_looks_in_both_folders_and_excludes_listed_ids(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "VG_100K" / "1.jpg")
    write_image(raw / "VG_100K_2" / "2.jpg")
    write_image(raw / "VG_100K" / "3.jpg")
    write_corrupt(raw / "VG_100K_2" / "4.jpg")
    write_json(raw / "region_descriptions.json", [
        {"id": image_id, "regions": [{"phrase": p, "image_id": image_id} for p in phrases]}
        for image_id, phrases in [(1, ["red sky ", "a clock"]), (2, ["green"]), (3, ["x"]),
                                  (4, ["bad"]), (5, ["no file"])]] + [{"regions": []}])
    write_lines(raw / "coco_overlap.txt", ["3"])
    builder = build("visual_genome", raw, tmp_path, exclude_ids_file=str(raw / "coco_overlap.txt"))
    assert texts(builder, "train") == {"1": ["red sky", "a clock"], "2": ["green"]}
    sources = skipped_sources(builder, "train")
    assert sources == [str(raw / "VG_100K_2" / "4.jpg"), str(raw / "VG_100K" / "5.jpg"),
                       f"{raw / 'region_descriptions.json'}: entry 5"]


def test_sbu_names_images_by_url_basename_and_counts_dead_links(tmp_path):
    raw = tmp_path / "raw"
    urls = ["http://static.flickr.com/1/111_a.jpg", "http://static.flickr.com/2/222_b.jpg",
            "http://static.flickr.com/3/333_c.jpg", "http://static.flickr.com/1/111_a.jpg"]
    write_lines(raw / "SBU_captioned_photo_dataset_urls.txt", urls)
    write_lines(raw / "SBU_captioned_photo_dataset_captions.txt",
                ["first caption ", "dead link", "   ", "same photo again"])
    write_image(raw / "images" / "111_a.jpg")
    write_image(raw / "images" / "333_c.jpg")
    builder = build("sbu", raw, tmp_path)
    assert texts(builder, "train") == {"111_a": ["first caption", "same photo again"]}
    assert skipped_sources(builder, "train") == [
        f"{raw / 'SBU_captioned_photo_dataset_captions.txt'}:3", str(raw / "images" / "222_b.jpg")]

    write_lines(raw / "SBU_captioned_photo_dataset_captions.txt", ["one", "two"])
    with pytest.raises(DataError, match="not aligned"):
        build("sbu", raw, tmp_path / "again")


def test_cc3m_finds_images_by_row_index_and_counts_the_missing(tmp_path):
    raw = tmp_path / "raw"
    write_lines(raw / "Train_GCC-training.tsv", [
        "a dog\thttp://x/0", "never downloaded\thttp://x/1", 'a "quoted" cat \thttp://x/2',
        "no url", "png one\thttp://x/4"])
    write_lines(raw / "Validation_GCC-1.1.0-Validation.tsv", ["val caption\thttp://y/0"])
    write_image(raw / "training" / "000000000.jpg")
    write_image(raw / "training" / "2.jpeg")
    write_image(raw / "training" / "000000004.png", fmt="PNG")
    write_image(raw / "validation" / "000000000.jpg")
    builder = build("cc3m", raw, tmp_path)
    assert texts(builder, "train") == {"0": ["a dog"], "2": ['a "quoted" cat'], "4": ["png one"]}
    assert texts(builder, "val") == {"0": ["val caption"]}
    tsv = raw / "Train_GCC-training.tsv"
    assert builder.bad["train"].examples == [
        (f"{tsv}:2", f"image never downloaded: no {raw / 'training'}/000000001"
                     "{.jpg,.jpeg,.png} for http://x/1"),
        (f"{tsv}:4", "malformed row: 1 tab-separated fields, not 2")]


VQA_IMAGES = {"train": ("train2014", [1, 2]), "val": ("val2014", [3]),
              "test": ("test2015", [4, 5]), "test_dev": ("test2015", [4])}


def write_vqa(raw) -> None:
    """Questions over 5 images; majority answers chosen so the vocabulary (min count 2) is
    ["2" (3 times), "dog", "yes" (twice each)] and the soft scores cover every count."""
    def question(image_id, qid, text="What is it?"):
        return dict(image_id=image_id, question=text, question_id=qid)

    def annotation(qid, image_id, major, answers):
        return dict(question_id=qid, image_id=image_id, multiple_choice_answer=major,
                    answers=[dict(answer=a, answer_confidence="yes", answer_id=i + 1)
                             for i, a in enumerate(answers)])

    questions = {
        "train2014": [question(1, 10, " How many? "), question(1, 11), question(2, 20),
                      question(2, 21, ""), question(9, 90)],
        "val2014": [question(3, 30), question(3, 31), question(3, 32), {"question": "no ids"}],
        "test2015": [question(4, 40), question(5, 50)], "test-dev2015": [question(4, 40)]}
    annotations = {
        "train2014": [
            annotation(10, 1, "two",
                       ["Two", "2", "two.", "2", "3", "yes", "Yes!", "dog", "x", "x"]),
            annotation(11, 1, "Yes", ["yes"] * 10),
            annotation(20, 2, "dog", ["the dog", "dog", "dog", "a dog"] + ["cat"] * 6),
            annotation(90, 9, "2", ["2"] * 10)],
        "val2014": [annotation(30, 3, "2", ["cat"] * 10), annotation(31, 3, "yes", ["yes"] * 10),
                    annotation(32, 3, "the dog", ["dog"] * 10)]}
    for name, content in questions.items():
        write_json(raw / f"v2_OpenEnded_mscoco_{name}_questions.json", {"questions": content})
    for name, content in annotations.items():
        write_json(raw / f"v2_mscoco_{name}_annotations.json", {"annotations": content})
    for folder, ids in VQA_IMAGES.values():
        for image_id in ids:
            write_image(raw / folder / f"COCO_{folder}_{image_id:012d}.jpg")


def test_vqav2_vocabulary_soft_scores_and_question_grouping(tmp_path):
    raw = tmp_path / "raw"
    write_vqa(raw)
    builder = build("vqav2", raw, tmp_path, min_answer_count=2)
    # normalised majority answers: "2" x3 ("two" too), "dog" x2 ("the dog" too), "yes" x2
    assert vqav2.read_answers(builder.data_dir) == ["2", "dog", "yes"]

    train = read(builder, "train")
    assert set(train) == {"1", "2"}  # image 9 has no file
    assert train["1"]["texts"] == ["How many?", "What is it?"]
    assert train["1"]["question_id"].tolist() == [10, 11]
    # question 10: "2" x4 (Two, 2, two., 2), "yes" x2, "dog" x1 -> most given first
    np.testing.assert_array_equal(train["1"]["answer_labels"][0], [0, 2, 1] + [-1] * 7)
    np.testing.assert_allclose(train["1"]["answer_scores"][0], [1.0, 0.6, 0.3] + [0] * 7)
    np.testing.assert_allclose(train["1"]["answer_scores"][1][:1], [1.0])
    # question 20: "dog" x4 with the articles dropped; "cat" is not in the vocabulary
    assert train["2"]["question_id"].tolist() == [20]
    assert train["2"]["answer_labels"][0].tolist() == [1] + [-1] * 9
    val = read(builder, "val")["3"]  # question 30 has no vocabulary answer: kept, all -1
    assert val["answer_labels"][0].tolist() == [-1] * 10 and val["answer_labels"][1][0] == 2

    for split in ("test", "test_dev"):
        folder, ids = VQA_IMAGES[split]
        test = read(builder, split)
        assert sorted(test) == [str(i) for i in ids]
        assert test["4"]["question_id"].tolist() == [40]
        assert test["4"]["answer_labels"].shape == (1, records.MAX_ANSWERS)
        assert (test["4"]["answer_labels"] == -1).all() and (test["4"]["answer_scores"] == 0).all()
    check_text_index(builder)
    assert builder.bad["train"].reasons["empty or missing text"] == 1
    assert "missing or unreadable file" in builder.bad["train"].reasons
    assert "malformed question" in builder.bad["val"].reasons


def test_vqav2_refuses_an_empty_answer_vocabulary_and_the_cli_sets_the_threshold(tmp_path):
    """The default threshold (9) on a small set keeps no answer: the build stops rather
    than write a dataset no VQA head can train on; --min_answer_count is the way out."""
    raw = tmp_path / "raw"
    write_vqa(raw)
    with pytest.raises(DataError, match="answer vocabulary would be empty; build with a "
                                        "smaller --min_answer_count"):
        build_dataset("vqav2", str(raw), str(tmp_path / "data"), 1.0)
    assert not list((tmp_path / "data" / "vqav2").glob("*"))  # no version half-written
    with pytest.raises(DataError, match="--min_answer_count applies to vqav2, not nlvr2"):
        build_dataset("nlvr2", str(raw), str(tmp_path / "data"), 1.0, min_answer_count=2)
    with pytest.raises(DataError, match=r"--max_skipped_fraction=-1 must be in \[0, 1\]"):
        build_dataset("vqav2", str(raw), str(tmp_path / "data"), -1)
    result = subprocess.run([sys.executable, "-m", "mtower_jax.data.build", "vqav2",
                             f"--raw_dir={raw}", f"--data_dir={tmp_path / 'data'}",
                             "--max_skipped_fraction=1", "--min_answer_count=2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data_dir = get_builder("vqav2", raw_dir=str(raw), data_dir=str(tmp_path / "data")).data_dir
    assert vqav2.read_answers(data_dir) == ["2", "dog", "yes"]


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("the dog.", "dog"), ("Yes!", "yes"), ("dont", "don't"), ("cant", "can't"),
    ("couldnt've", "couldn't've"), ("1,000", "1000"), ("3.5", "3.5"), ("t-shirt", "t shirt"),
    ("left , right", "left right"), ("A red (dark) car", "red dark car"), ("  none ", "0")])
def test_vqa_answer_normalisation_follows_the_official_evaluation(raw, normalised):
    assert vqav2.normalize_answer(raw) == normalised


def test_vqa_soft_scores_and_vocabulary_order():
    assert [vqav2.soft_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert vqav2.answer_vocabulary(["b", "a", "b", "c", "a", "d"], 2) == ["a", "b"]


def test_read_answers_of_an_unbuilt_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(DataError, match="python -m mtower_jax.data.build vqav2"):
        vqav2.read_answers(str(tmp_path))


def nlvr2_line(identifier, sentence, label, **fields) -> dict:
    return dict(identifier=identifier, sentence=sentence, label=label, **fields)


def test_nlvr2_pairs_images_and_groups_sentences(tmp_path):
    raw = tmp_path / "raw"
    left = write_image(raw / "train" / "7" / "train-1-0-img0.png", (255, 0, 0), "PNG")
    right = write_image(raw / "train" / "7" / "train-1-0-img1.png", (0, 0, 255), "PNG")
    write_lines(raw / "train.json", [
        nlvr2_line("train-1-0-0", "Two dogs. ", "True", directory="7"),
        nlvr2_line("train-1-0-1", "No dogs.", "False", directory="7"),
        nlvr2_line("train-1-0-2", "no directory", "True"), "{not json",
        nlvr2_line("train-1-0-3", "odd label", "maybe", directory="7")])
    for split in ("dev", "test1"):
        for side in (0, 1):
            write_image(raw / split / f"{split}-5-1-img{side}.png", fmt="PNG")
        write_lines(raw / f"{split}.json", [nlvr2_line(f"{split}-5-1-0", "s", "False")])
    builder = build("nlvr2", raw, tmp_path)

    pair = read(builder, "train")["train-1-0"]
    assert (pair["image"], pair["image_2"]) == (left, right)
    assert pair["texts"] == ["Two dogs.", "No dogs."]
    assert pair["labels"].tolist() == [1, 0]
    assert pair["text_ids"] == ["train-1-0-0", "train-1-0-1"]
    for split in ("dev", "test1"):
        assert read(builder, split)[f"{split}-5-1"]["labels"].tolist() == [0]
    assert skipped_sources(builder, "train") == [
        f"{raw / 'train.json'}:3 (identifier 'train-1-0-2')", f"{raw / 'train.json'}:4",
        f"{raw / 'train.json'}:5 (identifier 'train-1-0-3')"]


def write_snli_ve(raw) -> None:
    def line(image, hypothesis, label, pair):
        return dict(Flikr30kID=image, sentence2=hypothesis, gold_label=label, pairID=pair)

    write_lines(raw / "snli_ve_train.jsonl", [
        line("1.jpg", "A man.", "entailment", "p1"), line("2.jpg", "Rain.", "neutral", "p2"),
        line("1.jpg", " No man. ", "contradiction", "p3"), "[1, 2",
        line("1.jpg", "", "neutral", "p4"), line("2.jpg", "Sun.", "-", "p5")])
    for split in ("dev", "test"):
        write_lines(raw / f"snli_ve_{split}.jsonl", [line("3.jpg", "A dog.", "neutral", "d")])
    for image in ("1", "2", "3"):
        write_image(raw / "flickr30k-images" / f"{image}.jpg")


def test_snli_ve_groups_hypotheses_per_image_with_labels(tmp_path):
    raw = tmp_path / "raw"
    write_snli_ve(raw)
    builder = build("snli_ve", raw, tmp_path)
    train = read(builder, "train")
    assert train["1"]["texts"] == ["A man.", "No man."]
    assert train["1"]["labels"].tolist() == [0, 2]
    assert train["2"]["texts"] == ["Rain."] and train["2"]["labels"].tolist() == [1]
    assert read(builder, "dev")["3"]["labels"].tolist() == [1]
    path = raw / "snli_ve_train.jsonl"
    assert skipped_sources(builder, "train") == [
        f"{path}:4", f"{path}:5 (pairID 'p4')", f"{path}:6 (pairID 'p5')"]
    check_text_index(builder)


def write_arrow(path, columns: dict) -> None:
    """An Arrow IPC file as ViLT's write_*.py make them."""
    import pyarrow as pa
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def test_arrow_import_reads_vilt_caption_files(tmp_path):
    raw = tmp_path / "raw"
    image = write_image(raw / "unused.jpg")
    write_arrow(raw / "coco_caption_karpathy_train.arrow", dict(
        image=[image, image, image[:120], image], caption=[[" a ", "b"], ["c"], ["d"], ["e"]],
        image_id=["x.jpg", "y.jpg", "z.jpg", "x.jpg"],
        split=["train", "restval", "train", "train"]))
    write_arrow(raw / "coco_caption_karpathy_test.arrow", dict(
        image=[image], caption=[["t"]], image_id=["t.jpg"], split=["test"]))
    builder = build("arrow_captions", raw, tmp_path)
    assert texts(builder, "train") == {"x.jpg": ["a", "b"], "y.jpg": ["c"]}
    assert read(builder, "test")["t.jpg"]["image"] == image
    assert set(builder.info.splits) == {"train", "test"}
    train_file = raw / "coco_caption_karpathy_train.arrow"
    assert skipped_sources(builder, "train") == [f"{train_file}: row 2", f"{train_file}: row 3"]

    write_arrow(raw / "vqav2_train.arrow", dict(questions=[["q"]]))
    with pytest.raises(DataError, match="lacks columns"):
        build("arrow_captions", raw, tmp_path / "again")


# --- missing input, the registry, the CLI ----------------------------------------------------


def test_missing_raw_dir_and_missing_annotation_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="(?s)does not exist.*dataset_coco.json"):
        build("coco_captions", tmp_path / "nowhere", tmp_path)
    raw = tmp_path / "raw"
    write_lines(raw / "snli_ve_train.jsonl", [])
    with pytest.raises(DataError, match=f"required file {raw / 'snli_ve_dev.jsonl'} is missing"):
        build("snli_ve", raw, tmp_path)
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_train2014_questions.json is missing"):
        build("vqav2", raw, tmp_path)


def test_skipped_records_with_lone_surrogates_are_logged_escaped(caplog):
    # A JSON "\udc80" escape decodes to a lone surrogate, which no UTF-8 stream (nor
    # pytest-xdist's report channel) can write: the record is named by its escape.
    from mtower_jax.data.bad_records import BadRecords
    bad = BadRecords("coco_captions/train", max_skipped_fraction=0.0)
    with caplog.at_level("WARNING"), pytest.raises(DataError) as error:
        bad.skip("dataset_coco.json images[3] \udc80", "caption is not text: '\ud800x'")
    for text in (caplog.text, str(error.value)):
        text.encode("utf-8")  # raises on a lone surrogate
        assert "images[3] \\udc80" in text and "'\\ud800x'" in text


def test_registry_names_are_the_builders_tfds_names():
    with pytest.raises(DataError, match="unknown dataset 'coco'; known: arrow_captions, cc3m"):
        get_builder("coco", raw_dir="", data_dir="")
    for name in BUILDERS:
        if name != "synthetic_shapes":  # written elsewhere; registered by name only
            assert builder_class(name).name == name


def test_opening_an_unbuilt_builder_leaves_no_temporary_directory(tmp_path, monkeypatch):
    # tfds' DatasetInfo.initialize_from_bucket mkdtemp's a directory per unbuilt builder
    # and never removes it: thousands piled up in /tmp before records.dataset_info.
    import tempfile
    from mtower_jax.data.builders.synthetic_shapes import SyntheticShapes
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tempfile.tempdir)
    get_builder("coco_captions", raw_dir="", data_dir=str(tmp_path / "data"))
    SyntheticShapes(config="vqa_32px_s0", data_dir=str(tmp_path / "data"))
    assert os.listdir(tempfile.tempdir) == []


def test_the_cli_refuses_builders_that_take_no_raw_files(tmp_path):
    with pytest.raises(DataError, match="synthetic_shapes is not built from raw files"):
        build_dataset("synthetic_shapes", str(tmp_path), str(tmp_path))


def test_build_command_quotes_its_arguments():
    assert build_command("nlvr2", "/raw dir", "/data") == (
        "python -m mtower_jax.data.build nlvr2 --raw_dir='/raw dir' --data_dir=/data")


def test_cli_builds_and_reports_counts(tmp_path):
    raw = tmp_path / "raw"
    write_snli_ve(raw)
    data = tmp_path / "data"
    command = [sys.executable, "-m", "mtower_jax.data.build", "snli_ve", f"--raw_dir={raw}",
               f"--data_dir={data}", "--max_skipped_fraction=0.5"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr
    assert "train: 2 records, 3 texts, 3 texts skipped" in done.stdout
    assert "dev: 1 records, 1 texts, 0 texts skipped" in done.stdout

    failed = subprocess.run(command[:3] + ["nope", f"--data_dir={data}"], capture_output=True,
                            text=True, cwd=repo)
    assert failed.returncode != 0 and "unknown dataset 'nope'" in failed.stderr


def test_a_split_is_read_from_the_datasets_that_have_it(tmp_path):
    """Pretraining's mix: Visual Genome has only train, so val is COCO's alone; a split that
    no dataset has is an error naming each one's splits."""
    write_coco(tmp_path / "coco")
    build("coco_captions", tmp_path / "coco", tmp_path)
    write_image(tmp_path / "vg" / "VG_100K" / "1.jpg")
    write_json(tmp_path / "vg" / "region_descriptions.json",
               [{"id": 1, "regions": [{"phrase": "red sky", "image_id": 1}]}])
    build("visual_genome", tmp_path / "vg", tmp_path)
    config = get_config("model=tiny,data=real")
    config.data.datasets, config.data.data_dir = ("coco_captions", "visual_genome"), str(tmp_path / "data")
    config.data.tokenizer_dir = TOKENIZER_DIR  # byte-level: any caption encodes
    assert pipeline.num_examples(config, "pretrain", "train") == 8 + 1
    assert pipeline.num_examples(config, "pretrain", "val") == 1
    pipeline.check_splits(config, "pretrain", ("train", "val"))
    batch = next(iter(pipeline.pretrain_data(config, "val", train=False, batch_size=1)))
    assert batch["input_ids"].shape == (1, config.model.max_text_len)
    with pytest.raises(DataError, match=r"no dataset has a split 'dev': 'coco_captions' has "
                                        r"\['test', 'train', 'val'\]; 'visual_genome' has \['train'\]"):
        pipeline.check_splits(config, "pretrain", ("val", "dev"))
