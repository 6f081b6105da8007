"""SNLI-VE: does a Flickr30K image entail, contradict or say nothing of a hypothesis
(snli_ve schema).

Raw layout under raw_dir (https://github.com/necla-ml/SNLI-VE for the jsonl files; the
Flickr30K images via https://shannon.cs.illinois.edu/DenotationGraph/):

    snli_ve_train.jsonl   one json object a line: {"Flikr30kID": "2248275918.jpg" (sic),
    snli_ve_dev.jsonl       "sentence2": "A man is outside." (the hypothesis), "gold_label":
    snli_ve_test.jsonl      "entailment" | "neutral" | "contradiction", "pairID": ..., ...}
    flickr30k-images/2248275918.jpg ...

Splits `train`, `dev`, `test`. One record per image with all its hypotheses and their labels
(indices into `records.SNLI_VE_LABELS`); key and `image_id` are the image file's stem.
"""
import os
from typing import Iterator

from mtower_jax.data.bad_records import BadRecords
from mtower_jax.data.builders.base import RawFilesBuilder
from mtower_jax.data.builders.raw_rows import Example, jsonl_records, raw_path, require
from mtower_jax.data.records import SNLI_VE_LABELS

LAYOUT = __doc__
SPLITS = ("train", "dev", "test")
LABELS = {label: index for index, label in enumerate(SNLI_VE_LABELS)}


class SnliVe(RawFilesBuilder):
    """SNLI-VE visual entailment: one record per Flickr30K image with all its hypotheses."""
    name = "snli_ve"
    VERSION = "1.0.0"
    SCHEMA = "snli_ve"
    RAW_FILES = LAYOUT

    def _splits(self, raw_dir: str, bad) -> dict:
        return {split: self._records(raw_dir, require(
                    os.path.join(raw_dir, f"snli_ve_{split}.jsonl"), self.name), bad(split))
                for split in SPLITS}

    def _records(self, raw_dir: str, path: str, bad: BadRecords) -> Iterator[Example]:
        def parse(line: dict) -> tuple[str, tuple[str, ...], str, dict]:
            filename, label = str(line["Flikr30kID"]), LABELS[line["gold_label"]]
            image = raw_path(raw_dir, "flickr30k-images", filename)
            return (os.path.splitext(filename)[0], (image,), line.get("sentence2"),
                    dict(labels=label))

        return jsonl_records(path, bad, "pairID", parse)
