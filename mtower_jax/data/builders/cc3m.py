"""Conceptual Captions (CC3M), for pretraining (captions schema).

Raw layout under raw_dir (https://ai.google.com/research/ConceptualCaptions/download gives
the two TSV files; the images must be fetched from their URLs, e.g. with img2dataset):

    Train_GCC-training.tsv                caption<TAB>url, one image per line (3.3M)
    Validation_GCC-1.1.0-Validation.tsv   the same for validation (15.8k)
    training/000000123.jpg ...            the image of the TSV's zero-based row 123 (data
    validation/000000007.png ...          line 124); any zero padding, and any of .jpg,
                                          .jpeg, .png (the downloader keeps the server's)

Splits: `train`, `val`. One record per row; key and `image_id` are the row index. Rows whose
image was never downloaded (a dead URL: typically 10-20% of CC3M today) are skipped and
counted like any bad record, so a CC3M build normally needs `--max_skipped_fraction` above
the 1% default, e.g. `--max_skipped_fraction=0.25`; the default is not raised here, so that
losing that much data is always a decision. `skipped.json` has the counts by reason.
"""
import os
from typing import Iterator

from mtower_jax.data.bad_records import BadRecords
from mtower_jax.data.builders.base import RawFilesBuilder
from mtower_jax.data.builders.raw_rows import Example, clean_text, record, require

LAYOUT = __doc__
# split -> (TSV file, image folder)
SPLITS = {"train": ("Train_GCC-training.tsv", "training"),
          "val": ("Validation_GCC-1.1.0-Validation.tsv", "validation")}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def downloaded_images(folder: str) -> dict[int, str]:
    """{row index: file name} of the images in `folder` (one listing, not a stat per row)."""
    found = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            stem, extension = os.path.splitext(name)
            if stem.isdigit() and extension.lower() in IMAGE_EXTENSIONS:
                found[int(stem)] = name
    return found


class ConceptualCaptions(RawFilesBuilder):
    """Conceptual Captions 3M (web images, one alt-text caption each) for pretraining."""
    name = "cc3m"
    VERSION = "1.0.0"
    SCHEMA = "captions"
    RAW_FILES = LAYOUT

    def _splits(self, raw_dir: str, bad) -> dict:
        return {split: self._records(require(os.path.join(raw_dir, tsv), self.name),
                                     os.path.join(raw_dir, folder), bad(split))
                for split, (tsv, folder) in SPLITS.items()}

    def _records(self, tsv: str, folder: str, bad: BadRecords) -> Iterator[Example]:
        images = downloaded_images(folder)
        with open(tsv, newline="", encoding="utf-8", errors="replace") as f:
            # Captions may hold quote characters: no CSV quoting, a tab is the only separator
            # (csv.reader would also stop the build at a field over 128 kB).
            for row, line in enumerate(f):
                fields = line.rstrip("\r\n").split("\t")
                source = f"{tsv}:{row + 1}"
                if len(fields) != 2:
                    bad.skip(source, f"malformed row: {len(fields)} tab-separated fields, not 2")
                    continue
                text = clean_text(fields[0], source, bad)
                if not text:
                    continue
                if row not in images:
                    bad.skip(source, f"image never downloaded: no {folder}/{row:09d}"
                                     f"{{.jpg,.jpeg,.png}} for {fields[1].strip()}")
                    continue
                example = record(str(row), (os.path.join(folder, images[row]),), [text], bad)
                if example is not None:
                    yield example
