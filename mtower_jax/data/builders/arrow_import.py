"""ViLT / METER `.arrow` caption files, converted into the captions schema.

Many users already hold the pre-processed caption sets of ViLT
(https://github.com/dandelin/ViLT/blob/master/DATA.md, written by `vilt/utils/write_*.py`),
which METER, BridgeTower and ManagerTower reuse. Raw layout under raw_dir:

    *.arrow   Arrow IPC files of one caption set (e.g. coco_caption_karpathy_train.arrow,
              ..._restval, ..._val, ..._test; vg.arrow; sbu_0.arrow ...;
              conceptual_caption_train_0.arrow ...; f30k_caption_karpathy_*.arrow) with
              columns image (binary: the encoded JPEG), caption (list<string>),
              image_id (string or int) and split ("train" | "restval" | "val" | "test")

Put each set's files in a folder of their own (links will do), or pass `files=GLOB` to the
constructor: every matching file goes into this one dataset, and one data_dir holds one
`arrow_captions` dataset. Splits: `train` (split train or restval), `val`, `test`, those
present. One record per row, key and `image_id` the row's image_id; a repeated image_id
within a split is skipped and counted. ViLT's VQA / NLVR2 / SNLI-VE files have other columns:
build those from the raw sets.
"""
import glob
import os
from typing import Iterator

import pyarrow as pa

from mtower_jax.data.bad_records import BadRecords, DataError
from mtower_jax.data.builders.base import RawFilesBuilder, image_problem
from mtower_jax.data.builders.raw_rows import (Example, accepted, clean_text,
                                                count_other_lost_texts)

LAYOUT = __doc__
COLUMNS = ("image", "caption", "image_id", "split")
# The `split` column's values -> our split.
SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _open(path: str) -> pa.Table:
    """The file's table, memory-mapped: a column is only read when it is used."""
    try:
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"arrow_captions: {path} is not an Arrow IPC file ({e})") from None
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise DataError(f"arrow_captions: {path} lacks columns {sorted(missing)}; it has "
                        f"{table.column_names} (only ViLT's caption files are supported)")
    return table


class ArrowCaptions(RawFilesBuilder):
    """ViLT/METER caption `.arrow` files (COCO, VG, SBU, CC3M, Flickr30K) as captions."""
    name = "arrow_captions"
    VERSION = "1.0.0"
    SCHEMA = "captions"
    RAW_FILES = LAYOUT

    def __init__(self, *, files: str = "*.arrow", **kwargs):
        self.files = files
        super().__init__(**kwargs)

    def _splits(self, raw_dir: str, bad) -> dict:
        paths = sorted(glob.glob(os.path.join(raw_dir, self.files)))
        if not paths:
            raise DataError(f"{self.name}: no files match {os.path.join(raw_dir, self.files)}")
        tables = {path: _open(path) for path in paths}
        present = {SPLIT_OF.get(value) for table in tables.values()
                   for value in table.column("split").unique().to_pylist()}
        return {split: self._records(tables, split, bad(split))
                for split in ("train", "val", "test") if split in present}

    def _records(self, tables: dict[str, pa.Table], split: str,
                 bad: BadRecords) -> Iterator[Example]:
        keys = set()
        for path, table in tables.items():
            start = 0
            # Small chunks: a ViLT file is one batch of gigabytes of images.
            for chunk in table.to_batches(max_chunksize=256):
                for i, row_split in enumerate(chunk.column("split").to_pylist()):
                    if SPLIT_OF.get(row_split) == split:  # other splits' images stay unread
                        example = self._row(chunk, i, f"{path}: row {start + i}", keys, bad)
                        if example is not None:
                            yield example
                start += chunk.num_rows

    def _row(self, chunk: pa.RecordBatch, i: int, source: str, keys: set[str],
             bad: BadRecords) -> Example | None:
        key = str(chunk.column("image_id")[i].as_py())
        if key in keys:
            bad.skip(source, f"duplicate image id: {key}")
            return None
        keys.add(key)
        captions = chunk.column("caption")[i].as_py() or []
        texts = [text for j, caption in enumerate(captions)
                 if (text := clean_text(caption, f"{source} caption {j}", bad))]
        if not texts:
            return None
        image = chunk.column("image")[i].as_py()
        reason = image_problem(image) if isinstance(image, bytes) else "no image bytes"
        if reason:
            bad.skip(source, reason)
            count_other_lost_texts(bad, len(texts) - 1)
            return None
        return accepted(key, dict(image=image), texts, bad)
