"""SyntheticShapes: the shapes world (`mtower_jax.data.synthetic.world`) written through the
same tfds ArrayRecord path and record schemas as the real datasets; the embedded default.

    builder = ensure_built("vqa", data_dir="data", image_size=64)  # generates on first use
    source = builder.as_data_source()["train"]                     # records.SCHEMAS["vqa"]
    answers = json.load(open(os.path.join(builder.data_dir, "answers.json")))

Each (task, image size, seed, split sizes) is one tfds builder config, made on the fly from
its name, so the data directory says what it holds: `data/synthetic_shapes/vqa_64px_s0/1.0.0`;
non-default split sizes append `_n<sizes in split order>` (`vqa_32px_s1_n100-20-20`).
`SyntheticShapes(config="vqa_64px_s0", data_dir="data")` reopens one.

    task       schema     splits (default records)                  texts per record
    captions   captions   train 1000, val 200                       all 5..9 paraphrases
    retrieval  captions   train 1000, val 200, test 200             5 captions
    vqa        vqa        train 1000, val 200, test_dev 200         4..5 questions
    nlvr2      nlvr2      train 500, dev 100, test1 100 (pairs)     3 statements
    snli_ve    snli_ve    train 1000, dev 200, test 200             3 hypotheses, one per label

VQA answers are scored from the simulated annotators exactly as VQAv2's
(`vqav2.answer_targets`), and the answer vocabulary (`world.ANSWERS`, index = label id) is
written as `answers.json` in the vqa config's data directory, so `vqav2.read_answers` reads
it. Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import warnings
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from mtower_jax.data import records
from mtower_jax.data.builders import vqav2
from mtower_jax.data.synthetic import world


@dataclasses.dataclass(frozen=True)
class Task:
    schema: str  # a key of records.SCHEMAS
    splits: dict[str, int]  # split -> default number of records, in this order


TASKS = dict(
    captions=Task("captions", dict(train=1000, val=200)),
    retrieval=Task("captions", dict(train=1000, val=200, test=200)),
    vqa=Task("vqa", dict(train=1000, val=200, test_dev=200)),
    nlvr2=Task("nlvr2", dict(train=500, dev=100, test1=100)),
    snli_ve=Task("snli_ve", dict(train=1000, dev=200, test=200)),
)
RETRIEVAL_CAPTIONS = 5
NLVR2_STATEMENTS = 3
IMAGE_SIZES = (32, 384)  # the supported range, inclusive
_NAME = re.compile(r"(?P<task>[a-z_0-9]+?)_(?P<size>\d+)px_s(?P<seed>\d+)(?:_n(?P<n>\d+(?:-\d+)*))?")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    task: str = "captions"
    image_size: int = 64
    seed: int = 0
    split_sizes: tuple[int, ...] = ()  # records per split, in TASKS[task].splits order


def config_name(task: str, image_size: int = 64, seed: int = 0,
                split_sizes: dict[str, int] | None = None) -> str:
    """The config (and data directory) name; validates the arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; one of {sorted(TASKS)}")
    if not IMAGE_SIZES[0] <= image_size <= IMAGE_SIZES[1]:
        raise ValueError(f"image_size={image_size} is outside {IMAGE_SIZES[0]}..{IMAGE_SIZES[1]}")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    defaults = TASKS[task].splits
    unknown = set(split_sizes or {}) - set(defaults)
    if unknown:
        raise ValueError(f"{task} has splits {list(defaults)}, not {sorted(unknown)}")
    sizes = [(split_sizes or {}).get(split, n) for split, n in defaults.items()]
    if min(sizes) < 1:
        raise ValueError(f"every split needs at least one record, got {split_sizes}")
    suffix = "" if sizes == list(defaults.values()) else "_n" + "-".join(map(str, sizes))
    return f"{task}_{image_size}px_s{seed}{suffix}"


def parse_config(name: str) -> ShapesConfig:
    """The config a `config_name` stands for."""
    match = _NAME.fullmatch(name)
    if not match or match["task"] not in TASKS:
        raise ValueError(f"{name!r} is not a synthetic_shapes config name like 'vqa_64px_s0'")
    task = match["task"]
    splits = list(TASKS[task].splits)
    sizes = ([int(n) for n in match["n"].split("-")] if match["n"]
             else list(TASKS[task].splits.values()))
    if len(sizes) != len(splits):
        raise ValueError(f"{name!r}: {task} needs {len(splits)} split sizes ({splits})")
    config = ShapesConfig(name=name, task=task, image_size=int(match["size"]),
                          seed=int(match["seed"]), split_sizes=tuple(sizes),
                          description=f"synthetic shapes, {task}")
    if config_name(task, config.image_size, config.seed, dict(zip(splits, sizes))) != name:
        raise ValueError(f"{name!r} is not canonical (write it as config_name() does)")
    return config


class SyntheticShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The synthetic shapes world: captions, retrieval, VQA, NLVR2 and SNLI-VE tasks."""
    name = "synthetic_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def __init__(self, *, config: str, data_dir: str, **kwargs):
        super().__init__(config=config, data_dir=data_dir, file_format="array_record", **kwargs)

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> ShapesConfig:
        del version  # one version
        return parse_config(name)  # configs are made from their names, not listed

    def _info(self) -> tfds.core.DatasetInfo:
        return records.dataset_info(self, TASKS[self.task].schema)

    @property
    def task(self) -> str:
        return self.builder_config.task

    @property
    def splits(self) -> dict[str, int]:
        """{split: number of records} of this config."""
        return dict(zip(TASKS[self.task].splits, self.builder_config.split_sizes))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(split, num) for split, num in self.splits.items()}

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        seed, size = config.seed, config.image_size
        if self.task in ("captions", "retrieval"):
            per_image = RETRIEVAL_CAPTIONS if self.task == "retrieval" else None
            for i, (scene, texts) in enumerate(
                    world.caption_split(seed, split, num, self.task, per_image)):
                yield _key(split, i), _record(split, i, scene, size, texts=texts)
        elif self.task == "vqa":
            for i, (scene, questions) in enumerate(world.vqa_split(seed, split, num)):
                yield _key(split, i), _record(split, i, scene, size, **_vqa_fields(i, questions))
        elif self.task == "nlvr2":
            for i, (left, right, statements) in enumerate(
                    world.nlvr2_split(seed, split, num, NLVR2_STATEMENTS)):
                yield _key(split, i), _record(
                    split, i, left, size, image_2=world.render(right, size),
                    texts=[text for text, _ in statements],
                    labels=np.array([truth for _, truth in statements], np.int32),
                    text_ids=[f"{split}-{i}-{j}" for j in range(len(statements))])
        else:  # snli_ve
            for i, (scene, hypotheses) in enumerate(world.snli_ve_split(seed, split, num)):
                labels = [records.SNLI_VE_LABELS.index(label) for _, label in hypotheses]
                yield _key(split, i), _record(split, i, scene, size,
                                              texts=[text for text, _ in hypotheses],
                                              labels=np.array(labels, np.int32))


def _key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _record(split: str, index: int, scene: world.Scene, image_size: int, **fields) -> dict:
    return dict(image=world.render(scene, image_size), image_id=_key(split, index), **fields)


def _vqa_fields(index: int, questions: list[world.Question]) -> dict:
    """The vqa schema's question fields; question ids are unique within a split."""
    answers = [vqav2.answer_targets(list(q.annotators), world.ANSWER_IDS) for q in questions]
    return dict(texts=[q.text for q in questions],
                question_id=np.array([index * 10 + j for j in range(len(questions))], np.int64),
                answer_labels=np.stack([labels for labels, _ in answers]),
                answer_scores=np.stack([scores for _, scores in answers]))


def ensure_built(task: str, data_dir: str, image_size: int = 64, seed: int = 0,
                 split_sizes: dict[str, int] | None = None) -> SyntheticShapes:
    """The built dataset of `task`: generated into data_dir on first use, opened afterwards.

    Also writes the text index of every split and, for vqa, `answers.json`. Processes
    sharing data_dir (a multi-process run, parallel tests) take turns: the first builds,
    the others wait on a file lock and then open what it built."""
    data_dir = os.path.expanduser(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".synthetic_shapes.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        builder = SyntheticShapes(config=config_name(task, image_size, seed, split_sizes),
                                  data_dir=data_dir)
        if not builder.is_prepared():
            with warnings.catch_warnings():  # tfds warns about its own deprecations
                warnings.simplefilter("ignore")
                builder.download_and_prepare()
        for split in builder.splits:
            records.text_index(builder, split)  # written on first use
        answers_path = os.path.join(builder.data_dir, vqav2.ANSWERS_FILE)
        if task == "vqa" and not os.path.exists(answers_path):
            with open(answers_path + ".tmp", "w") as f:
                json.dump(list(world.ANSWERS), f)
            os.replace(answers_path + ".tmp", answers_path)  # readers never see half a file
    return builder
