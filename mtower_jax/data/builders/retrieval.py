"""Image-text retrieval sets on Karpathy's splits: Flickr30K and COCO (captions schema).

Raw layout under raw_dir (Karpathy's split files:
https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip; Flickr30K
images: https://shannon.cs.illinois.edu/DenotationGraph/ (request form); COCO images:
https://cocodataset.org/#download):

    Flickr30kRetrieval (f30k_retrieval):
        dataset_flickr30k.json   {"images": [{"filename": "1000092795.jpg", "split":
                                 "train" | "val" | "test", "sentences": [{"raw": ...}] * 5}]}
        flickr30k-images/1000092795.jpg ...
    CocoRetrieval (coco_retrieval):
        dataset_coco.json, train2014/, val2014/  exactly as for coco_captions

Splits: `train` (COCO: train + restval), `val`, `test` (1k images for Flickr30K, 5k for COCO).
One record per image with its first CAPTIONS_PER_IMAGE = 5 good captions *in file order*
(COCO has a few images with 6 or 7; the standard protocol scores 5 per image).

All-pairs evaluation: caption c of the flattened caption list belongs to record r where
`np.repeat(np.arange(num_records), records.text_index(builder, split))[c] == r`, i.e. the
text index, flattened in on-disk record order, is the caption -> image map; no separate
caption file is needed.
"""
import os

from mtower_jax.data.builders.base import RawFilesBuilder
from mtower_jax.data.builders.coco_captions import ANNOTATION as COCO_ANNOTATION
from mtower_jax.data.builders.coco_captions import coco_image, karpathy_splits
from mtower_jax.data.builders.raw_rows import raw_path

LAYOUT = __doc__
CAPTIONS_PER_IMAGE = 5


def flickr_image(raw_dir: str, entry: dict) -> tuple[str, str]:
    """(key, image path) of one dataset_flickr30k.json entry; the key is the file's stem."""
    return (os.path.splitext(entry["filename"])[0],
            raw_path(raw_dir, "flickr30k-images", entry["filename"]))


class Flickr30kRetrieval(RawFilesBuilder):
    """Flickr30K image-text retrieval (Karpathy splits, 5 captions per image)."""
    name = "f30k_retrieval"
    VERSION = "1.0.0"
    SCHEMA = "captions"
    RAW_FILES = LAYOUT

    def _splits(self, raw_dir: str, bad) -> dict:
        return karpathy_splits(self.name, raw_dir, bad, "dataset_flickr30k.json", flickr_image,
                               max_captions=CAPTIONS_PER_IMAGE)


class CocoRetrieval(RawFilesBuilder):
    """COCO image-text retrieval (Karpathy splits, train = train + restval, 5 captions)."""
    name = "coco_retrieval"
    VERSION = "1.0.0"
    SCHEMA = "captions"
    RAW_FILES = LAYOUT

    def _splits(self, raw_dir: str, bad) -> dict:
        return karpathy_splits(self.name, raw_dir, bad, COCO_ANNOTATION, coco_image,
                               max_captions=CAPTIONS_PER_IMAGE)
