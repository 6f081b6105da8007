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
# Column -> (the types ViLT writes, in words); image_id may be of any type.
_TYPES = dict(image=(lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
              caption=(lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t))
                       and _is_text(t.value_type), "list<string>"),
              split=(lambda t: _is_text(t), "string"))
# The `split` column's values -> our split.
SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _open(path: str) -> pa.Table:
    """The file's table, memory-mapped: a column is only read when it is used. A damaged
    file (bad offsets, invalid UTF-8) is a DataError here, before any row is read: `validate`
    checks the structure, not the image bytes."""
    try:
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: a non-UTF-8 name
        raise DataError(f"arrow_captions: {path} is not a valid Arrow IPC file ({e}); "
                        f"re-download or re-write it") from None
    missing = [name for name in COLUMNS if table.column_names.count(name) != 1]
    if missing:
        raise DataError(f"arrow_captions: {path} lacks columns {missing} (or has them twice); "
                        f"it has {table.column_names} (only ViLT's caption files are supported)")
    wrong = [f"{name} is {table.schema.field(name).type}, not {expected}"
             for name, (ok, expected) in _TYPES.items() if not ok(table.schema.field(name).type)]
    if wrong:
        raise DataError(f"arrow_captions: {path}: column {'; '.join(wrong)} (only ViLT's "
                        f"caption files are supported)")
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
