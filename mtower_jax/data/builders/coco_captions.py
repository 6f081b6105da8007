"""COCO captions on Karpathy's splits, for pretraining (captions schema).

Raw layout under raw_dir (https://cocodataset.org/#download for the images,
https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip for the json):

    dataset_coco.json      Karpathy's split file: {"images": [{"filepath": "val2014",
                           "filename": "COCO_val2014_000000391895.jpg", "split":
                           "train" | "restval" | "val" | "test", "cocoid": 391895,
                           "sentences": [{"raw": "A man riding a bike."}, ...]}, ...]}
    train2014/COCO_train2014_000000000009.jpg ...
    val2014/COCO_val2014_000000000042.jpg ...

Splits: `train` (Karpathy train + restval, 113k images), `val` (5k), `test` (5k). One record
per image with all its captions (`raw` sentences, whitespace-stripped) in file order; the
record key and `image_id` are the COCO id.

`karpathy_splits` is shared with the retrieval builders (Flickr30K uses the same format).
"""
import os
from typing import Callable, Iterator

from mtower_jax.data.bad_records import BadRecords, DataError
from mtower_jax.data.builders.base import RawFilesBuilder, read_json
from mtower_jax.data.builders.raw_rows import Example, entry_records, raw_path

LAYOUT = __doc__
ANNOTATION = "dataset_coco.json"
# Our split -> the Karpathy `split` values it takes.
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def coco_image(raw_dir: str, entry: dict) -> tuple[str, str]:
    """(key, image path) of one dataset_coco.json entry; the key is the COCO id."""
    return str(entry["cocoid"]), raw_path(raw_dir, entry["filepath"], entry["filename"])


def karpathy_splits(name: str, raw_dir: str, bad: Callable[[str], BadRecords], annotation: str,
                    locate: Callable[[str, dict], tuple[str, str]],
                    max_captions: int | None = None) -> dict[str, Iterator[Example]]:
    """{split: records} of a Karpathy split file; `locate(raw_dir, entry)` -> (key, image
    path); each record keeps the first `max_captions` good captions (all if None), in order."""
    path = os.path.join(raw_dir, annotation)
    content = read_json(path, name)
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise DataError(f"{name}: {path} has no 'images' list; is it a Karpathy split file?")

    def parse(entry: dict) -> tuple[str, tuple[str, ...], list]:
        key, image_path = locate(raw_dir, entry)
        return key, (image_path,), entry["sentences"]

    def records(split: str) -> Iterator[Example]:
        # An entry without a known split belongs to no split: nothing to count it against.
        entries = ((i, entry) for i, entry in enumerate(content["images"])
                   if isinstance(entry, dict) and entry.get("split") in SPLITS[split])
        return entry_records(entries, path, bad(split), parse, "raw", max_captions)

    return {split: records(split) for split in SPLITS}


class CocoCaptions(RawFilesBuilder):
    """COCO captions (Karpathy splits; train = train + restval) for pretraining."""
    name = "coco_captions"
    VERSION = "1.0.0"
    SCHEMA = "captions"
    RAW_FILES = LAYOUT

    def _splits(self, raw_dir: str, bad) -> dict:
        return karpathy_splits(self.name, raw_dir, bad, ANNOTATION, coco_image)
