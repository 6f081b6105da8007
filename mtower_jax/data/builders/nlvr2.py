"""NLVR2: sentences true or false of an image pair (nlvr2 schema).

Raw layout under raw_dir (https://github.com/lil-lab/nlvr/tree/master/nlvr2 for the json
files in `data/`; the images via the request form linked there):

    train.json   one json object a line: {"identifier": "train-10171-0-0", "sentence": ...,
    dev.json       "label": "True" | "False", "directory": "88" (train only), ...}
    test1.json
    train/88/train-10171-0-img0.png, train/88/train-10171-0-img1.png ...
    dev/dev-850-0-img0.png, dev/dev-850-0-img1.png ...
    test1/test1-0-1-img0.png ...

The pair of a line is its identifier without the last `-N` (`dev-850-0-0` -> `dev-850-0`);
its images are `{pair}-img0.png` (`image`) and `{pair}-img1.png` (`image_2`). Splits
`train`, `dev`, `test1` (the public test). One record per pair with all its sentences,
labels (1 = "True", 0 = "False") and identifiers (`text_ids`); key and `image_id` are the
pair.
"""
import os
from typing import Iterator

from mtower_jax.data.bad_records import BadRecords
from mtower_jax.data.builders.base import RawFilesBuilder
from mtower_jax.data.builders.raw_rows import Example, jsonl_records, raw_path, require

LAYOUT = __doc__
SPLITS = ("train", "dev", "test1")
LABELS = {"True": 1, "False": 0}


class Nlvr2(RawFilesBuilder):
    """NLVR2 image-pair reasoning: one record per pair with all its sentences."""
    name = "nlvr2"
    VERSION = "1.0.0"
    SCHEMA = "nlvr2"
    RAW_FILES = LAYOUT

    def _splits(self, raw_dir: str, bad) -> dict:
        return {split: self._records(raw_dir, split, require(
                    os.path.join(raw_dir, f"{split}.json"), self.name), bad(split))
                for split in SPLITS}

    def _records(self, raw_dir: str, split: str, path: str,
                 bad: BadRecords) -> Iterator[Example]:
        def parse(line: dict) -> tuple[str, tuple[str, ...], str, dict]:
            identifier, label = str(line["identifier"]), LABELS[line["label"]]
            pair = identifier.rsplit("-", 1)[0]
            # train images are spread over 100 numbered folders
            folder = (split, str(line["directory"])) if split == "train" else (split,)
            images = tuple(raw_path(raw_dir, *folder, f"{pair}-img{i}.png") for i in (0, 1))
            return pair, images, line.get("sentence"), dict(labels=label, text_ids=identifier)

        return jsonl_records(path, bad, "identifier", parse)
