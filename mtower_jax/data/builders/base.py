"""What every builder shares: raw files from a local directory (never the network),
ArrayRecord output, image validation, bad-record accounting, the text index.

A concrete builder sets `VERSION`, `SCHEMA` (a key of `records.SCHEMAS`), `RAW_FILES` (what
the user must have downloaded, for the error message) and implements
`_splits(raw_dir, bad) -> {split: iterator of (key, example)}`.

    builder = CocoCaptions(raw_dir="/data/raw/coco", data_dir="/data/tfds")
    builder.build()                 # writes ArrayRecord shards + the text index
    source = builder.as_data_source()["train"]
"""
import abc
import json
import os
import warnings

import tensorflow_datasets as tfds

from mtower_jax.data import image_transforms, records
from mtower_jax.data.bad_records import BadRecords, DataError, DEFAULT_MAX_SKIPPED_FRACTION


class RawFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base class; never registered by name, so `tfds.load` cannot try to download it."""
    SCHEMA: str = ""
    RAW_FILES: str = ""  # human description of the expected layout under raw_dir

    def __init__(self, *, raw_dir: str, data_dir: str,
                 max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION, **kwargs):
        self.raw_dir = os.path.abspath(os.path.expanduser(raw_dir)) if raw_dir else ""
        self.max_skipped_fraction = max_skipped_fraction
        self.bad: dict[str, BadRecords] = {}
        super().__init__(data_dir=data_dir, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return records.dataset_info(self, self.SCHEMA)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        if not self.raw_dir or not os.path.isdir(self.raw_dir):
            raise DataError(
                f"{self.name}: raw data directory {self.raw_dir or '(unset)'!r} does not exist. "
                f"Download the raw files and pass their directory; expected layout:\n"
                f"{self.RAW_FILES}")
        return {split: self._generate_examples(examples, self._bad_records(split))
                for split, examples in self._splits(self.raw_dir, self._bad_records).items()}

    def _generate_examples(self, examples, bad: BadRecords):
        """The (key, example) iterator from `_splits`. The split's skips are checked as it
        ends, inside tfds' temporary folder: a failed build leaves nothing that looks built
        (a check after `download_and_prepare` would leave a complete dataset that the next
        `build` accepts). An empty split is a DataError, not tfds' bare AssertionError."""
        count = 0
        for count, example in enumerate(examples, 1):
            yield example
        bad.check()
        if not count:
            raise DataError(f"{bad.what}: no records found under {self.raw_dir}; expected "
                            f"layout:\n{self.RAW_FILES}")

    def _bad_records(self, split: str) -> BadRecords:
        """The skip counter of one split (created on first use)."""
        if split not in self.bad:
            self.bad[split] = BadRecords(f"{self.name}/{split}", self.max_skipped_fraction)
        return self.bad[split]

    @abc.abstractmethod
    def _splits(self, raw_dir: str, bad) -> dict:
        """{split: iterator of (key, example)}; `bad(split)` is that split's BadRecords."""

    def build(self) -> "RawFilesBuilder":
        """Writes the shards (unless already built), checks skips, writes the text index."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.download_and_prepare()
        for counter in self.bad.values():
            counter.check()
        if self.bad:  # only when this call generated the data
            with open(os.path.join(self.data_dir, "skipped.json"), "w") as f:
                json.dump({s: b.summary() for s, b in self.bad.items()}, f, indent=1)
            # A full pass over the records: not again for a dataset already built
            # (`records.text_index` writes a missing index on first use).
            records.write_text_index(self)
        return self


def read_image(path: str, bad: BadRecords) -> bytes | None:
    """The file's bytes if it is a complete, decodable image; else None (skipped, counted)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:  # ValueError: a NUL or lone surrogate in the name
        bad.skip(path, f"missing or unreadable file: {getattr(e, 'strerror', None) or e}")
        return None
    reason = image_problem(data)
    if reason:
        bad.skip(path, reason)
        return None
    return data


def image_problem(data: bytes) -> str:
    """'' if `data` decodes fully as an image, exactly as the pipeline decodes it; else why
    not (truncated, not an image...)."""
    try:
        image_transforms.decode(data)
    except image_transforms.BadImage as e:
        return f"corrupt image: {e}"
    return ""


def read_json(path: str, what: str):
    """Loads a JSON file the builder cannot do without; a clear error if it is bad."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"{what}: required file {path} is missing") from None
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, a huge int, deep nesting
        raise DataError(f"{what}: {path} is not valid JSON ({type(e).__name__}: {e}); "
                        f"re-download it") from None


def read_jsonl(path: str, bad: BadRecords):
    """Yields (line number, parsed line) of a jsonl file; a malformed line is skipped and
    counted."""
    try:
        f = open(path, "rb")  # lines end at b"\n" only, each decoded on its own
    except FileNotFoundError:
        raise DataError(f"{bad.what}: required file {path} is missing") from None
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, huge int, nesting
                bad.skip(f"{path}:{line_no}", f"malformed JSON line: {type(e).__name__}: "
                                              f"{str(e)[:200]}")
                continue
            yield line_no, value
