"""Per-task example assembly: one (record, text) pair -> the numpy features a step consumes.

Each task function takes the record (a dict from the tfds data source), the index of the
text within it, a per-example numpy Generator (grain's `random_map` seeds it from the
example's global position, so it is reproducible and resumable), and the shared `TaskSpec`.
It returns a flat dict of numpy arrays:

    all tasks    pixel_values [S, S, 3] f32, input_ids [L] i32, attention_mask [L] i32
    pretrain     mlm_input_ids [L], mlm_labels [L] (masking.IGNORE where unmasked),
                 mlm_positions [k] (the masked positions, then 0; absent without a cap);
                 with itm_negatives='dataset' also itm_pixel_values, itm_labels ()
    vqa          vqa_targets [num_answers] f32 soft scores, question_id () i64
    nlvr2        pixel_values_2, labels () i32 (1 = True)
    snli_ve      labels () i32 (records.SNLI_VE_LABELS order)
    every task   record_index () i32, text_index () i32: the example's place in the
                 split (added by the pipeline; retrieval evaluation ranks by them)

Images that fail to decode raise; the pipeline counts and skips that example.
`batch_spec` gives the same table for a batch without reading any data (ahead-of-time
compilation, tools/aot.py).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Callable

import jax
import ml_collections
import numpy as np

from mtower_jax.data import image_transforms, masking

if TYPE_CHECKING:
    from mtower_jax.data.tokenizer import Tokenizer

TASKS = ("pretrain", "vqa", "nlvr2", "snli_ve", "retrieval")
# Where ITM's false images come from: the global batch, the example's device shard of it
# (train/objectives.py), or the dataset (drawn here).
ITM_NEGATIVES = ("batch", "shard", "dataset")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What the example functions need besides the record; pickled into grain workers."""
    task: str
    tokenizer: Tokenizer
    image_size: int
    max_text_len: int
    image_mode: str  # image_transforms.MODES
    flip: bool = False  # random horizontal flip in 'finetune' mode (swaps left/right in text)
    mlm_probability: float = 0.15
    mlm_max_predictions: int | None = None  # masking.max_predictions; None: no cap
    itm_negatives: str = "batch"  # 'batch' / 'shard': the step picks images; 'dataset': here
    num_answers: int = 0  # VQA vocabulary size
    # ITM negatives drawn from the dataset need another record: (rng) -> image bytes.
    random_image: Callable[[np.random.Generator], bytes] | None = None

    @functools.cached_property  # works on frozen dataclasses: writes __dict__ directly
    def ordinary_ids(self) -> np.ndarray:
        tok = self.tokenizer
        return masking.ordinary_ids(tok.vocab_size, [tok.cls_id, tok.pad_id, tok.sep_id,
                                                     tok.unk_id, tok.mask_id])


def swap_left_right(text: str) -> str:
    """'left' <-> 'right', keeping case: a flipped image keeps its caption true."""
    def swap(m: re.Match) -> str:
        word = {"left": "right", "right": "left"}[m.group(0).lower()]
        return word.capitalize() if m.group(0)[0].isupper() else word
    return _LEFT_RIGHT.sub(swap, text)


def _text(record: dict, text_idx: int) -> str:
    text = record["texts"][text_idx]
    return text.decode("utf-8") if isinstance(text, bytes) else text


def _image(data: bytes, spec: TaskSpec, rng: np.random.Generator, flip: bool) -> np.ndarray:
    return image_transforms.transform(image_transforms.decode(data), spec.image_size,
                                      spec.image_mode, rng, flip)


def _encode(text: str, spec: TaskSpec) -> dict:
    tokens = spec.tokenizer.encode_batch([text], spec.max_text_len)
    return {k: v[0] for k, v in tokens.items()}


def _image_and_text(record: dict, text_idx: int, rng: np.random.Generator,
                    spec: TaskSpec) -> tuple[dict, dict]:
    """Shared start of every task: the (maybe flipped) image and the tokenized text."""
    flip = spec.flip and spec.image_mode == "finetune" and rng.random() < 0.5
    text = _text(record, text_idx)
    features = dict(pixel_values=_image(record["image"], spec, rng, flip))
    if "image_2" in record:
        features["pixel_values_2"] = _image(record["image_2"], spec, rng, flip)
        if flip:  # mirroring the pair also swaps which image is "left": keep the text true
            features["pixel_values"], features["pixel_values_2"] = (
                features["pixel_values_2"], features["pixel_values"])
    tokens = _encode(swap_left_right(text) if flip else text, spec)
    features.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return features, tokens


def pretrain_example(record: dict, text_idx: int, rng: np.random.Generator,
                     spec: TaskSpec) -> dict:
    features, tokens = _image_and_text(record, text_idx, rng, spec)
    tok = spec.tokenizer
    features["mlm_input_ids"], features["mlm_labels"] = masking.mask_tokens(
        tokens["input_ids"], tokens["special_tokens_mask"], mask_id=tok.mask_id,
        ordinary_ids=spec.ordinary_ids, probability=spec.mlm_probability, rng=rng,
        max_predictions=spec.mlm_max_predictions)
    if spec.mlm_max_predictions is not None:
        features["mlm_positions"] = masking.selected_positions(features["mlm_labels"],
                                                               spec.mlm_max_predictions)
    if spec.itm_negatives == "dataset":
        matched = rng.random() < 0.5
        features["itm_labels"] = np.int32(matched)
        features["itm_pixel_values"] = (features["pixel_values"] if matched else
                                        _image(spec.random_image(rng), spec, rng, False))
    return features


def vqa_example(record: dict, text_idx: int, rng: np.random.Generator, spec: TaskSpec) -> dict:
    features, _ = _image_and_text(record, text_idx, rng, spec)
    labels = record["answer_labels"][text_idx]
    targets = np.zeros((spec.num_answers,), np.float32)
    keep = labels >= 0
    targets[labels[keep]] = record["answer_scores"][text_idx][keep]
    features.update(vqa_targets=targets, question_id=np.int64(record["question_id"][text_idx]))
    return features


def classification_example(record: dict, text_idx: int, rng: np.random.Generator,
                           spec: TaskSpec) -> dict:
    """NLVR2 (image pair + statement) and SNLI-VE (image + hypothesis): one label each."""
    features, _ = _image_and_text(record, text_idx, rng, spec)
    features["labels"] = np.int32(record["labels"][text_idx])
    return features


def retrieval_example(record: dict, text_idx: int, rng: np.random.Generator,
                      spec: TaskSpec) -> dict:
    """Image + caption; the pipeline adds the global image/text indices."""
    return _image_and_text(record, text_idx, rng, spec)[0]


EXAMPLE_FNS = dict(pretrain=pretrain_example, vqa=vqa_example, nlvr2=classification_example,
                   snli_ve=classification_example, retrieval=retrieval_example)


def feature_spec(task: str, *, image_size: int, max_text_len: int, itm_negatives: str = "batch",
                 num_answers: int = 0, mlm_max_predictions: int | None = None
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{feature: (per-example shape, numpy dtype)} of what the pipeline yields for `task`
    (the table in the module docstring, record_index / text_index included)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    pixels, text, scalar = ((image_size, image_size, 3), f32), ((max_text_len,), i32), ((), i32)
    spec = dict(pixel_values=pixels, input_ids=text, attention_mask=text)
    if task == "pretrain":
        spec.update(mlm_input_ids=text, mlm_labels=text)
        if mlm_max_predictions is not None:
            spec["mlm_positions"] = ((mlm_max_predictions,), i32)
        if itm_negatives == "dataset":
            spec.update(itm_pixel_values=pixels, itm_labels=scalar)
    elif task == "vqa":
        spec.update(vqa_targets=((num_answers,), f32), question_id=((), np.dtype(np.int64)))
    elif task in ("nlvr2", "snli_ve"):
        if task == "nlvr2":
            spec["pixel_values_2"] = pixels
        spec["labels"] = scalar
    spec.update(record_index=scalar, text_index=scalar)
    return spec


def mlm_max_predictions(config: ml_collections.ConfigDict) -> int | None:
    """The MLM cap k of a run (masking.max_predictions of config.mlm_max_predictions)."""
    return masking.max_predictions(config.get("mlm_max_predictions", -1),
                                   config.get("mlm_probability", 0.15), config.model.max_text_len)


def batch_spec(config: ml_collections.ConfigDict, batch_size: int,
               sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch of config.task as ShapeDtypeStructs: [batch_size, *feature shape]
    for every feature `task_data(config, config.task, split, train=True)` yields, with the
    pipeline's dtypes (question_id is int64 on the host; jax makes it int32 on device unless
    x64 is enabled). `sharding` (e.g. mesh.batch_sharding) is attached to every leaf."""
    data, model = config.data, config.model
    spec = feature_spec(config.get("task", "pretrain"), image_size=model.vision.image_size,
                        max_text_len=model.max_text_len,
                        itm_negatives=data.get("itm_negatives", "batch"),
                        num_answers=model.vqa_num_answers,
                        mlm_max_predictions=mlm_max_predictions(config))
    return {name: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=sharding)
            for name, (shape, dtype) in spec.items()}
