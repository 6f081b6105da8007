"""Grain pipelines: one function per task returns an iterator of host-local numpy batches.

    index      every (record, text) pair of the split(s), in on-disk order: [num_examples]
    shuffle    a global permutation of that index, re-drawn each epoch from `seed` (train)
    load       fetch the record, decode + transform the image, tokenize, task features;
               randomness from grain's `random_map`, seeded by the global position, so an
               example gets the same masking / augmentation whatever the process count
    shard      train: of each global batch of B consecutive positions, process p of P keeps
               rows [p B/P, (p+1) B/P), so the global batch (and its row order) is the same
               whatever the process count; eval: positions p, p + P, p + 2P, ... (the
               last, short batch then splits as evenly as it can). Disjoint either way: the
               P slices together cover each epoch exactly once
    batch      per-process batch = global batch / P; `num_workers` > 0 runs load in
               grain worker processes (the caller's `__main__` needs the usual guard)

The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` capture and restore
its position exactly, so a resumed run reads the batches an uninterrupted one would have.
That state is per process; a run resumed on a different number of processes starts the
train stream at global position `start` = steps x global batch instead (exact unless a bad
record was skipped before the checkpoint).
An example whose image fails to decode is skipped and counted (`BadRecords`): the run fails
only when the skipped fraction passes `max_skipped_fraction`.
"""
import dataclasses
import functools
import os
from typing import Sequence

import grain
from absl import flags, logging
import jax
import ml_collections
import numpy as np

from mtower_jax.data import examples, records
from mtower_jax.data.bad_records import BadRecords, DataError, DEFAULT_MAX_SKIPPED_FRACTION
from mtower_jax.data.build import build_command
from mtower_jax.data.builders import get_builder
from mtower_jax.data.builders.vqav2 import read_answers
from mtower_jax.data.synthetic import TOKENIZER_DIR
from mtower_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class SplitIndex:
    """Flat (source, record, text) triples over one or more data sources."""
    sources: list  # tfds data sources (random access by record index)
    source_of: np.ndarray  # [num_examples] int32
    record_of: np.ndarray  # [num_examples] int32
    text_of: np.ndarray  # [num_examples] int32

    @classmethod
    def build(cls, parts: list[tuple[object, np.ndarray]]) -> "SplitIndex":
        """parts: (data source, texts-per-record counts) for each dataset, concatenated."""
        source_of, record_of, text_of = [], [], []
        for i, (_, counts) in enumerate(parts):
            counts = np.asarray(counts, np.int64)
            starts = np.cumsum(counts) - counts
            rec = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
            record_of.append(rec)
            text_of.append((np.arange(counts.sum()) - np.repeat(starts, counts)).astype(np.int32))
            source_of.append(np.full(len(rec), i, np.int32))
        return cls([p[0] for p in parts], *(np.concatenate(a) for a in
                                             (source_of, record_of, text_of)))

    def __len__(self) -> int:
        return len(self.record_of)


class LoadExample(grain.transforms.RandomMap):
    """Global example position -> features dict, or None when its image is bad."""

    def __init__(self, index: SplitIndex, spec: examples.TaskSpec, what: str,
                 max_skipped_fraction: float):
        self.index, self.spec = index, spec
        self.example_fn = examples.EXAMPLE_FNS[spec.task]
        self.bad = BadRecords(what, max_skipped_fraction)

    def random_map(self, i: int, rng: np.random.Generator) -> dict | None:
        source, rec, text = (int(a[i]) for a in (self.index.source_of, self.index.record_of,
                                                  self.index.text_of))
        record = self.index.sources[source][rec]
        try:
            features = self.example_fn(record, text, rng, self.spec)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's ways of saying "bad image"
            self.bad.skip(f"{self.bad.what} record {rec} ({_image_id(record)})",
                          f"corrupt image: {type(e).__name__}: {e}")
            return None
        self.bad.ok()
        features.update(record_index=np.int32(rec), text_index=np.int32(i))
        return features


def _image_id(record: dict) -> str:
    image_id = record.get("image_id", b"")
    return image_id.decode() if isinstance(image_id, bytes) else str(image_id)


def _random_image(index: SplitIndex, rng: np.random.Generator) -> bytes:
    """Encoded bytes of an image drawn from the split (ITM negatives from the dataset)."""
    i = int(rng.integers(len(index)))
    return index.sources[int(index.source_of[i])][int(index.record_of[i])]["image"]


class ProcessBlocks(grain.MapDataset):
    """Rows [offset, offset + block) of every `stride` consecutive parent positions."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, block: int, stride: int, offset: int):
        super().__init__(parent)
        self._block, self._stride, self._offset = block, stride, offset

    def __len__(self) -> int:
        full, rest = divmod(len(self._parent), self._stride)
        return full * self._block + min(max(rest - self._offset, 0), self._block)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        group, row = divmod(index, self._block)
        return self._parent[group * self._stride + self._offset + row]

    def __str__(self) -> str:
        return f"ProcessBlocks(block={self._block}, stride={self._stride}, offset={self._offset})"


def make_dataset(index: SplitIndex, spec: examples.TaskSpec, *, batch_size: int, seed: int,
                 train: bool, process_index: int = 0, process_count: int = 1,
                 num_workers: int = 0, what: str = "data", start: int = 0,
                 max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION) -> grain.IterDataset:
    """The grain graph described in the module docstring. `batch_size` is global.

    train: shuffled, repeated forever, full batches only, from global position `start` (a
    multiple of `batch_size`). Otherwise one pass in order, the last batch may be short
    (evaluation must see every example).
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the "
                         f"{process_count} processes")
    if start % batch_size:
        raise ValueError(f"start={start} is not a multiple of batch_size={batch_size}")
    if spec.task == "pretrain" and spec.itm_negatives == "dataset":
        spec = dataclasses.replace(spec, random_image=functools.partial(_random_image, index))
    ds = grain.MapDataset.range(len(index))
    if train:
        ds = ds.shuffle(seed=seed).repeat(None)  # a fresh permutation every epoch
    # Map before slicing: grain seeds each example's Generator from its position in the
    # dataset, so it must be the global position, the same whatever the process count.
    ds = ds.random_map(LoadExample(index, spec, what, max_skipped_fraction), seed=seed)
    local = batch_size // process_count
    if train:
        ds = ProcessBlocks(ds[start:], block=local, stride=batch_size,
                           offset=process_index * local)
    else:
        ds = ds[process_index::process_count]
    ds = ds.filter(lambda features: features is not None)
    it = ds.to_iter_dataset()
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; library callers have none
            flags.FLAGS.mark_as_parsed()
        # Workers take examples round-robin and grain re-interleaves them in order; batching
        # after that makes batches independent of the worker count.
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    it = it.batch(local, drop_remainder=train)
    return it


# Which synthetic-world task (and record schema) serves each training task.
SYNTHETIC_TASKS = dict(pretrain="captions", vqa="vqa", nlvr2="nlvr2", snli_ve="snli_ve",
                       retrieval="retrieval")


def open_builder(name: str, task: str, data: ml_collections.ConfigDict, image_size: int):
    """The built tfds builder of dataset `name` (a key of builders.BUILDERS).

    The synthetic world is generated on first use; a real dataset that is not built yet
    gives a DataError with the command that builds it.
    """
    data_dir = os.path.expanduser(data.data_dir)
    if name == "synthetic_shapes":
        from mtower_jax.data.builders import synthetic_shapes
        train_images = data.get("synthetic_train_images", 0)  # 0: the world's default
        return synthetic_shapes.ensure_built(SYNTHETIC_TASKS[task], data_dir,
                                             image_size=image_size, seed=data.synthetic_seed,
                                             split_sizes={"train": train_images} if train_images
                                             else None)
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"config.data.data_dir={data.data_dir!r} is not a directory; point it "
                        f"at the tfds folder the builders wrote (`{build_command(name)}`)")
    builder = get_builder(name, raw_dir="", data_dir=data_dir)
    if not builder.is_prepared():
        raise DataError(f"dataset {name!r} is not built under {data_dir}; build it with:\n  "
                        f"{build_command(name, data_dir=data_dir)}")
    return builder


def _image_mode(task: str, train: bool, augment: bool) -> str:
    """Pretraining: resize + center crop; fine-tuning: random crop + RandAugment when
    training with config.data.augment; evaluation: resize to square."""
    if task == "pretrain":
        return "pretrain"
    return "finetune" if train and augment else "eval"


def tokenizer_for(data: ml_collections.ConfigDict) -> Tokenizer:
    """config.data.tokenizer_dir, or the synthetic world's own vocabulary when unset."""
    if data.tokenizer_dir:
        return Tokenizer.from_dir(data.tokenizer_dir)
    if tuple(data.datasets) != ("synthetic_shapes",):
        raise DataError("config.data.tokenizer_dir is empty: set it to a folder holding "
                        "RoBERTa's vocab.json and merges.txt (e.g. a local roberta-base copy)")
    return Tokenizer.from_dir(TOKENIZER_DIR)


def split_parts(config: ml_collections.ConfigDict, task: str, split: str
                ) -> list[tuple[object, object, np.ndarray]]:
    """(builder, data source, texts-per-record counts) of `split` in each dataset of
    config.data.datasets that has it. A dataset without the split takes no part in it (Visual
    Genome and SBU have only train: pretraining evaluates on COCO's and CC3M's val); a split
    that none of them has is a DataError."""
    return [(builder, builder.as_data_source()[split], records.text_index(builder, split))
            for _, builder in _datasets_with(config, task, split)]


def check_splits(config: ml_collections.ConfigDict, task: str, splits: Sequence[str]) -> None:
    """DataError for a split that no dataset has; run when a run starts, so that a misspelt
    eval split fails then, not at the first evaluation. Logs the datasets that sit a split out."""
    for split in splits:
        having = [name for name, _ in _datasets_with(config, task, split)]
        if len(having) < len(config.data.datasets):
            logging.info("split %r: %s only (the other datasets have no such split)", split,
                         ", ".join(having))


def _datasets_with(config: ml_collections.ConfigDict, task: str, split: str) -> list[tuple]:
    """[(name, builder)] of the datasets that have `split`; DataError if none has it."""
    builders = [(name, open_builder(name, task, config.data, config.model.vision.image_size))
                for name in config.data.datasets]
    having = [(name, b) for name, b in builders if split in b.info.splits]
    if not having:
        there = "; ".join(f"{name!r} has {sorted(b.info.splits)}" for name, b in builders)
        raise DataError(f"no dataset has a split {split!r}: {there}")
    return having


def num_examples(config: ml_collections.ConfigDict, task: str, split: str) -> int:
    """(record, text) pairs in `split`: one epoch of `task_data(..., train=True)`."""
    return int(sum(np.sum(counts) for _, _, counts in split_parts(config, task, split)))


def answer_vocabulary(config: ml_collections.ConfigDict, split: str = "train") -> list[str]:
    """The VQA answers (index = label id) of the first dataset in config.data.datasets."""
    builder = split_parts(config, "vqa", split)[0][0]
    return read_answers(builder.data_dir)


def task_data(config: ml_collections.ConfigDict, task: str, split: str, *, train: bool,
              batch_size: int | None = None, process_index: int | None = None,
              process_count: int | None = None, start: int = 0,
              one_text_per_record: bool = False) -> grain.IterDataset:
    """The pipeline of `task` on `split` of every dataset in config.data.datasets.

    Reads config.data (datasets, data_dir, tokenizer_dir, num_workers,
    max_skipped_fraction, itm_negatives, synthetic_seed, augment, ...), config.model (image
    size, text length, VQA answers), config.seed, config.batch_size (global) and, for
    pretraining, config.mlm_probability and config.mlm_max_predictions. Process index /
    count default to JAX's.
    `one_text_per_record`: each record once, with its first text (an image gallery).
    `start`: global train position to begin at (resuming on a different process count).
    """
    data, model = config.data, config.model
    image_size = model.vision.image_size
    parts, answers = [], 0
    for builder, source, counts in split_parts(config, task, split):
        parts.append((source, np.minimum(counts, 1) if one_text_per_record else counts))
        if task == "vqa":
            answers = len(read_answers(builder.data_dir))
            if answers != model.vqa_num_answers:
                raise DataError(f"{builder.data_dir} has {answers} VQA answers but "
                                f"model.vqa_num_answers={model.vqa_num_answers}; set "
                                f"--config.model.vqa_num_answers={answers}")
    tokenizer = tokenizer_for(data)
    if tokenizer.vocab_size > model.text.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                        f"model.text.vocab_size={model.text.vocab_size}")
    spec = examples.TaskSpec(
        task=task, tokenizer=tokenizer, image_size=image_size,
        max_text_len=model.max_text_len,
        image_mode=_image_mode(task, train, data.get("augment", True)),
        flip=train and data.get("flip", task != "vqa"),
        mlm_probability=config.get("mlm_probability", 0.15),
        mlm_max_predictions=examples.mlm_max_predictions(config),
        itm_negatives=data.get("itm_negatives", "batch"), num_answers=answers)
    what = f"{'+'.join(data.datasets)}/{split}"
    return make_dataset(
        SplitIndex.build(parts), spec, batch_size=batch_size or config.batch_size,
        seed=config.seed, train=train,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        num_workers=data.num_workers, what=what, start=start,
        max_skipped_fraction=data.get("max_skipped_fraction", DEFAULT_MAX_SKIPPED_FRACTION))


def pretrain_data(config: ml_collections.ConfigDict, split: str = "train", **kw):
    return task_data(config, "pretrain", split, **kw)


def vqa_data(config: ml_collections.ConfigDict, split: str = "train", **kw):
    return task_data(config, "vqa", split, **kw)


def nlvr2_data(config: ml_collections.ConfigDict, split: str = "train", **kw):
    return task_data(config, "nlvr2", split, **kw)


def snli_ve_data(config: ml_collections.ConfigDict, split: str = "train", **kw):
    return task_data(config, "snli_ve", split, **kw)


def retrieval_data(config: ml_collections.ConfigDict, split: str = "train", **kw):
    return task_data(config, "retrieval", split, **kw)
