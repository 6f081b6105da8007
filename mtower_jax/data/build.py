"""Builds one dataset from its raw files into ArrayRecord shards (and its text index).

    python -m mtower_jax.data.build NAME --raw_dir=DIR --data_dir=DIR [--max_skipped_fraction=0.01]
        [--min_answer_count=9]   (vqav2: answers seen fewer times are not in the vocabulary)

NAME is one of `builders.BUILDERS` built from raw files (not synthetic_shapes, which is
generated on first use); each builder's module docstring gives the raw layout it expects
under raw_dir and where to download it. Prints, per split, the records and texts written
and the texts skipped (with reasons). A dataset already built under data_dir is not
rebuilt; its counts are printed again.
"""
import json
import os
import shlex
import sys

from absl import app, flags

from mtower_jax.data import records
from mtower_jax.data.bad_records import DEFAULT_MAX_SKIPPED_FRACTION, DataError
from mtower_jax.data.builders import BUILDERS, builder_class
from mtower_jax.data.builders.base import RawFilesBuilder

_RAW_DIR = flags.DEFINE_string("raw_dir", "", "Folder holding the downloaded raw files.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data folder to write the dataset into.")
_MAX_SKIPPED = flags.DEFINE_float(
    "max_skipped_fraction", DEFAULT_MAX_SKIPPED_FRACTION,
    "Fail when more than this fraction of a split's texts had to be skipped (bad images, "
    "empty texts, malformed lines). Web-crawled sets (cc3m, sbu) need more, e.g. 0.25.")
_MIN_ANSWER_COUNT = flags.DEFINE_integer(
    "min_answer_count", None, "vqav2 only: the answer vocabulary keeps the answers seen at "
    "least this often in train + val (default 9, the paper's 3129 answers).")


def build_command(name: str, raw_dir: str = "RAW_DIR", data_dir: str = "DATA_DIR") -> str:
    """The shell command that builds dataset `name` (for 'not built' error messages)."""
    return (f"python -m mtower_jax.data.build {shlex.quote(name)} "
            f"--raw_dir={shlex.quote(raw_dir)} --data_dir={shlex.quote(data_dir)}")


def build(name: str, raw_dir: str, data_dir: str,
          max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
          min_answer_count: int | None = None) -> dict[str, dict]:
    """Builds `name` and returns {split: {records, texts, skipped, reasons}}
    (`min_answer_count`: vqav2's vocabulary threshold, None for its default)."""
    cls = builder_class(name)
    if not issubclass(cls, RawFilesBuilder):
        raise DataError(f"{name} is not built from raw files; see {cls.__module__}: "
                        f"{(cls.__doc__ or '').strip()}")
    if not 0 <= max_skipped_fraction <= 1:
        raise DataError(f"--max_skipped_fraction={max_skipped_fraction} must be in [0, 1]")
    extra = {}
    if min_answer_count is not None:
        if name != "vqav2":
            raise DataError(f"--min_answer_count applies to vqav2, not {name}")
        if min_answer_count < 1:
            raise DataError(f"--min_answer_count={min_answer_count} must be >= 1")
        extra["min_answer_count"] = min_answer_count
    builder = cls(raw_dir=raw_dir, data_dir=data_dir, max_skipped_fraction=max_skipped_fraction,
                  **extra)
    builder.build()
    skipped_file = os.path.join(builder.data_dir, "skipped.json")
    skipped = {}
    if os.path.exists(skipped_file):  # written by the build that generated the data
        with open(skipped_file) as f:
            skipped = json.load(f)
    report = {}
    for split in builder.info.splits:
        counts = records.text_index(builder, split)
        summary = skipped.get(split, {})
        report[split] = dict(records=len(counts), texts=int(counts.sum()),
                             skipped=summary.get("skipped", 0), reasons=summary.get("reasons", {}))
    return report


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError(f"give one dataset name, one of: {', '.join(sorted(BUILDERS))}")
    if not _DATA_DIR.value:
        raise app.UsageError("--data_dir is required")
    name = argv[1]
    try:
        report = build(name, _RAW_DIR.value, _DATA_DIR.value, _MAX_SKIPPED.value,
                       _MIN_ANSWER_COUNT.value)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{name} built under {os.path.abspath(_DATA_DIR.value)}")
    for split, r in report.items():
        reasons = f" ({r['reasons']})" if r["skipped"] else ""
        print(f"  {split}: {r['records']} records, {r['texts']} texts, "
              f"{r['skipped']} texts skipped{reasons}")


if __name__ == "__main__":
    app.run(main)
