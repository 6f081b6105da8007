"""The synthetic shapes world and its tfds builder: determinism, ranges, balance, records."""
from __future__ import annotations

import collections
import io
import itertools
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from mtower_jax.data import records
from mtower_jax.data.builders import synthetic_shapes as ss
from mtower_jax.data.builders import vqav2
from mtower_jax.data.synthetic import world

NUM = 1000  # records per statistics check: as many as a default train split


@pytest.fixture(scope="module")
def vqa_items():
    return list(world.vqa_split(0, "train", NUM))


def test_same_seed_gives_identical_outputs():
    def make(seed):
        caps = list(world.caption_split(seed, "train", 20))
        return ([world.render(scene, 64) for scene, _ in caps], [c for _, c in caps],
                list(world.vqa_split(seed, "val", 20)), list(world.nlvr2_split(seed, "dev", 10)),
                list(world.snli_ve_split(seed, "test", 20)))
    first, again, other = make(0), make(0), make(1)
    assert first == again  # PNG bytes included
    assert first[0] != other[0] and first[1] != other[1]
    # Splits and tasks draw different scenes from the same seed.
    assert next(world.caption_split(0, "train", 1))[0] != next(world.caption_split(0, "val", 1))[0]


def test_scenes_stay_in_range():
    scenes = [world.sample_scene(world.record_rng(0, "t", "s", i)) for i in range(2000)]
    assert {len(s.objects) for s in scenes} == set(range(1, world.MAX_OBJECTS + 1))
    objs = [o for s in scenes for o in s.objects]
    assert {o.color for o in objs} == set(world.COLORS) and len(world.COLORS) >= 6
    assert {o.shape for o in objs} == set(world.SHAPES) and len(world.SHAPES) >= 3
    assert {o.size for o in objs} == set(world.SIZES) == {"small", "large"}
    for s in scenes:
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
        for o in s.objects:
            assert world.RADIUS[o.size][0] <= o.radius <= world.RADIUS[o.size][1]
            assert o.radius < o.x < 1 - o.radius and o.radius < o.y < 1 - o.radius
        for a, b in itertools.combinations(s.objects, 2):
            assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius  # no overlap


@pytest.mark.parametrize("size", [32, 384])
def test_render_sizes(size):
    scene = world.sample_scene(world.record_rng(3, "t", "s", 0))
    image = Image.open(io.BytesIO(world.render(scene, size)))
    assert image.format == "PNG" and image.size == (size, size) and image.mode == "RGB"
    pixels = np.asarray(image).reshape(-1, 3)
    for o in scene.objects:  # every object's exact color is drawn at its centre
        centre = np.asarray(image)[int(o.y * size), int(o.x * size)]
        assert tuple(centre) == world.RGB[o.color]
    assert len(np.unique(pixels, axis=0)) > len(scene.objects) + 1  # textured background


def test_captions_are_distinct_paraphrases():
    for scene, texts in world.caption_split(0, "train", 300):
        assert len(texts) >= 5 and len(set(texts)) == len(texts)
        for o in scene.objects:
            assert o.name in texts[0]
    for _, texts in world.caption_split(0, "test", 100, task="retrieval", per_image=5):
        assert len(texts) == 5 and len(set(texts)) == 5


def test_vqa_answers_are_balanced(vqa_items):
    by_type = collections.defaultdict(collections.Counter)
    for scene, questions in vqa_items:
        assert {"count", "existence"} <= {q.type for q in questions}  # every scene has them
        for q in questions:
            by_type[q.type][q.answer] += 1
    assert set(by_type) == set(world.QUESTION_TYPES)
    for qtype, answers in by_type.items():
        assert set(answers) <= set(world.ANSWERS)
        share = max(answers.values()) / sum(answers.values())
        # A yes/no type cannot go below 50%: it must be balanced instead.
        assert share <= (0.55 if set(answers) == {"yes", "no"} else 0.4), (qtype, answers)
    assert set(by_type["existence"]) == {"yes", "no"}
    assert len(by_type["count"]) == world.MAX_OBJECTS + 1  # 0..4 all asked


def test_vqa_answers_are_true(vqa_items):
    """Re-derive the answers of the count and existence questions from the scene."""
    checked = 0
    for scene, questions in vqa_items[:300]:
        for q in questions:
            if m := re.fullmatch(r"how many (objects|shapes|(\w+)s|(\w+) objects) are there\?",
                                 q.text):
                attr = m[3] and (dict(color=m[3]) if m[3] in world.COLORS else dict(size=m[3]))
                expected = world.count(scene, **(attr or ({} if not m[2] else dict(shape=m[2]))))
                assert q.answer == str(expected), q
                checked += 1
            elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q.text):
                key = "color" if m[1] in world.COLORS else "size"
                found = world.count(scene, **{key: m[1], "shape": m[2]})
                assert q.answer == ("yes" if found else "no"), q
                checked += 1
    assert checked > 300


def test_vqa_annotators_give_every_soft_score(vqa_items):
    questions = [q for _, qs in vqa_items for q in qs]
    dense = np.zeros((len(questions), len(world.ANSWERS)))
    for row, q in enumerate(questions):
        assert len(q.annotators) == world.NUM_ANNOTATORS
        labels, scores = vqav2.answer_targets(list(q.annotators), world.ANSWER_IDS)
        assert (labels[0], scores[0]) == (world.ANSWER_IDS[q.answer], 1.0)  # the truth wins
        dense[row, labels[labels >= 0]] = scores[labels >= 0]
    assert set(np.round(dense, 1).ravel().tolist()) == {0.0, 0.3, 0.6, 0.9, 1.0}
    assert any(set(q.annotators) - set(world.ANSWERS) for q in questions)  # off-vocabulary


def test_nlvr2_statements_are_balanced():
    truths = []
    for _, _, statements in world.nlvr2_split(0, "train", 500):
        assert len({text for text, _ in statements}) == len(statements) == 3
        truths += [truth for _, truth in statements]
    assert abs(np.mean(truths) - 0.5) < 0.05


def test_nlvr2_statements_are_true():
    for left, right, statements in world.nlvr2_split(0, "dev", 100):
        for text, truth in statements:
            if m := re.fullmatch(r"the (left|right) image has more (\w+)s than the \w+ image", text):
                a, b = (left, right) if m[1] == "left" else (right, left)
                attr = {} if m[2] == "object" else dict(shape=m[2])
                assert truth == (world.count(a, **attr) > world.count(b, **attr)), text


def test_snli_ve_labels_are_balanced_and_grounded():
    labels = collections.Counter()
    for scene, hypotheses in world.snli_ve_split(0, "train", NUM):
        assert sorted(label for _, label in hypotheses) == sorted(records.SNLI_VE_LABELS)
        labels.update(label for _, label in hypotheses)
        for text, label in hypotheses:
            if m := re.fullmatch(r"there is an? (\w+) (\w+)", text):
                key = "color" if m[1] in world.COLORS else "size"
                present = world.count(scene, **{key: m[1], "shape": m[2]}) > 0
                assert label == ("entailment" if present else "contradiction"), text
            if label == "neutral":  # about an object that is there
                assert any(text.startswith(f"the {o.name} ") for o in scene.objects), text
    assert set(labels.values()) == {NUM}
    assert tuple(world.SNLI_LABELS) == records.SNLI_VE_LABELS


def test_config_names():
    assert ss.config_name("vqa") == "vqa_64px_s0"
    name = ss.config_name("snli_ve", 32, 7, dict(train=10))
    assert name == "snli_ve_32px_s7_n10-200-200"
    config = ss.parse_config(name)
    assert (config.task, config.image_size, config.seed, config.split_sizes) == (
        "snli_ve", 32, 7, (10, 200, 200))
    for bad in ("vqa_64px", "video_64px_s0", "vqa_64px_s0_n1-2", "vqa_064px_s0"):
        with pytest.raises(ValueError):
            ss.parse_config(bad)
    for kwargs in (dict(image_size=16), dict(image_size=512), dict(split_sizes=dict(test=5))):
        with pytest.raises(ValueError):
            ss.config_name("vqa", **kwargs)


SMALL = dict(captions=(30, 10), retrieval=(30, 10, 10), vqa=(30, 10, 10), nlvr2=(15, 5, 5),
             snli_ve=(30, 10, 10))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return data_dir, {task: ss.ensure_built(task, data_dir, image_size=48, seed=1, split_sizes=dict(
        zip(ss.TASKS[task].splits, sizes))) for task, sizes in SMALL.items()}


@pytest.mark.parametrize("task", list(SMALL))
def test_builder_writes_readable_records(built, task):
    data_dir, builders = built
    builder = builders[task]
    assert builder.data_dir == os.path.join(
        data_dir, "synthetic_shapes", ss.config_name(task, 48, 1, dict(
            zip(ss.TASKS[task].splits, SMALL[task]))), "1.0.0")
    sources = builder.as_data_source()
    assert {s: len(src) for s, src in sources.items()} == dict(
        zip(ss.TASKS[task].splits, SMALL[task]))
    schema = set(records.SCHEMAS[ss.TASKS[task].schema]().keys())
    for split, source in sources.items():
        counts = records.text_index(builder, split)
        assert counts.tolist() == [len(source[i]["texts"]) for i in range(len(source))]
        for i in range(len(source)):
            record = source[i]
            assert set(record) == schema
            assert Image.open(io.BytesIO(record["image"])).size == (48, 48)
            n = len(record["texts"])
            if task == "retrieval":
                assert n == ss.RETRIEVAL_CAPTIONS
            if task == "vqa":
                assert record["answer_labels"].shape == (n, records.MAX_ANSWERS)
                assert (record["answer_scores"][:, 0] == 1.0).all()
                assert record["answer_labels"].max() < len(world.ANSWERS)
            if task in ("nlvr2", "snli_ve"):
                assert len(record["labels"]) == n and record["labels"].min() >= 0
    if task == "vqa":
        assert vqav2.read_answers(builder.data_dir) == list(world.ANSWERS)
        ids = [q for i in range(len(sources["train"])) for q in sources["train"][i]["question_id"]]
        assert len(set(ids)) == len(ids)


def test_builder_reopens_without_regenerating(built):
    data_dir, builders = built
    shard = os.path.join(builders["vqa"].data_dir,
                         "synthetic_shapes-train.array_record-00000-of-00001")
    mtime = os.path.getmtime(shard)
    again = ss.ensure_built("vqa", data_dir, image_size=48, seed=1,
                            split_sizes=dict(train=30, val=10, test_dev=10))
    assert os.path.getmtime(shard) == mtime
    reopened = ss.SyntheticShapes(config=again.builder_config.name, data_dir=data_dir)
    first, second = again.as_data_source()["val"][0], reopened.as_data_source()["val"][0]
    assert first["image"] == second["image"] and first["texts"] == second["texts"]


@pytest.mark.parametrize("size", [32, 384])
def test_builder_image_size(tmp_path, size):
    builder = ss.ensure_built("captions", str(tmp_path), image_size=size,
                              split_sizes=dict(train=2, val=1))
    record = builder.as_data_source()["train"][0]
    assert Image.open(io.BytesIO(record["image"])).size == (size, size)


def test_default_build_takes_seconds(tmp_path):
    """A default task (1000 train images at 64 px + eval splits) builds in a few seconds."""
    start = time.perf_counter()
    builder = ss.ensure_built("vqa", str(tmp_path))
    seconds = time.perf_counter() - start
    assert len(builder.as_data_source()["train"]) == 1000
    print(f"vqa_64px_s0 (1400 images) built in {seconds:.1f} s")
    assert seconds < 30
