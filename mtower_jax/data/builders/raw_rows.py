"""From raw annotation rows to records: cleaned texts grouped per image (or image pair), the
images read and validated once per record, every loss counted.

Skip accounting counts *texts* (an epoch visits every (record, text) pair, so that is the
data a user loses): an empty text or a malformed row is one skipped text; an unreadable image
is skipped with its path, and its record's other texts are counted as lost with it. A record
whose texts are all bad is never written (its image is not even read).
"""
import json
import os
from typing import Any, Callable, Iterable, Iterator

from mtower_jax.data.bad_records import BadRecords, DataError
from mtower_jax.data.builders.base import read_image, read_jsonl

Example = tuple[str, dict[str, Any]]  # (unique key within its split, the record)
# Feature names of a record's images, in the order of its image paths.
_IMAGE_FEATURES = ("image", "image_2")


def require(path: str, what: str) -> str:
    """`path` if the file exists, else a DataError naming it (checked before writing starts)."""
    if not os.path.isfile(path):
        raise DataError(f"{what}: required file {path} is missing")
    return path


def clean_text(text: Any, source: str, bad: BadRecords) -> str | None:
    """The text stripped of surrounding whitespace; None (skipped, counted) if it is empty
    or not writable as UTF-8 (a lone surrogate, which JSON's \\u escapes allow)."""
    if not (isinstance(text, str) and text.strip()):
        bad.skip(source, f"empty or missing text: {text!r}")
        return None
    if not is_utf8(text):
        bad.skip(source, f"text not encodable as UTF-8: {text!r}")
        return None
    return text.strip()


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def raw_path(raw_dir: str, *parts: str) -> str:
    """os.path.join(raw_dir, *parts) of names read from an annotation file; a ValueError
    (the entry is skipped) if the path leaves raw_dir ('..', an absolute path). Only the
    names are checked: links inside raw_dir may point anywhere (the user put them there)."""
    path = os.path.join(raw_dir, *parts)
    if not os.path.normpath(path).startswith(os.path.join(raw_dir, "")):
        raise ValueError(f"image path {path!r} is outside the raw directory")
    return path


def _line_source(path: str, line_no: int, line: Any, id_field: str) -> str:
    """How a parsed jsonl line is named in skip messages: file:line and its id (greppable)."""
    if isinstance(line, dict) and id_field in line:
        return f"{path}:{line_no} ({id_field} {line[id_field]!r})"
    return f"{path}:{line_no} ({json.dumps(line)[:80]})"


def check_utf8(*values: Any) -> None:
    """A ValueError unless tfds can write each string value (a key, its image_id, an id)."""
    for value in values:
        if isinstance(value, str) and not is_utf8(value):
            raise ValueError(f"{value!r} is not encodable as UTF-8")


def count_other_lost_texts(bad: BadRecords, lost: int) -> None:
    """Counts the texts lost with an image whose skip was already counted (and logged) once."""
    bad.seen += lost
    bad.skipped += lost
    bad.reasons["other texts of a skipped image"] += lost


def record(key: str, image_paths: tuple[str, ...], texts: list[str], bad: BadRecords,
           **per_text: list) -> Example | None:
    """One record, its images read and validated; None (counted) if an image is bad.

    `per_text` are lists aligned with `texts` (labels, question ids...). The key doubles as
    the record's `image_id`."""
    if not texts:
        return None
    images = {}
    for feature, path in zip(_IMAGE_FEATURES, image_paths):
        data = read_image(path, bad)  # counts the first lost text, with the image's path
        if data is None:
            count_other_lost_texts(bad, len(texts) - 1)
            return None
        images[feature] = data
    return accepted(key, images, texts, bad, **per_text)


def accepted(key: str, images: dict[str, bytes], texts: list[str], bad: BadRecords,
             **per_text: list) -> Example:
    """The record of valid images and texts, its texts counted as kept."""
    for _ in texts:
        bad.ok()
    return key, dict(images, image_id=key, texts=texts, **per_text)


class Groups:
    """Texts collected per record key from annotation rows, in first-seen order; the rows
    of one image may be scattered through the file (VQA questions, SNLI-VE hypotheses)."""

    def __init__(self):
        self._groups: dict[str, tuple[tuple[str, ...], dict[str, list]]] = {}

    def add(self, key: str, image_paths: tuple[str, ...], text: str, **per_text) -> None:
        if key not in self._groups:
            self._groups[key] = (image_paths, dict(texts=[], **{k: [] for k in per_text}))
        columns = self._groups[key][1]
        columns["texts"].append(text)
        for name, value in per_text.items():
            columns[name].append(value)

    def records(self, bad: BadRecords) -> Iterator[Example]:
        """Every group as a record; groups with a bad image are skipped and counted."""
        for key, (paths, columns) in self._groups.items():
            example = record(key, paths, bad=bad, **columns)
            if example is not None:
                yield example


def entry_records(entries: Iterable[tuple[int, Any]], path: str, bad: BadRecords,
                  parse: Callable[[dict], tuple[str, tuple[str, ...], list]], text_field: str,
                  max_texts: int | None = None) -> Iterator[Example]:
    """Records from a JSON list whose entries each hold one image and its texts (Karpathy
    splits, VG regions): `entries` are (index in the list, entry); `parse(entry)` -> (key,
    image paths, the text dicts) raises KeyError / TypeError / ValueError on a malformed
    entry, which is skipped, as is a repeated key; the first `max_texts` good texts are
    kept, in order."""
    keys = set()  # tfds needs unique keys; a repeated entry would also double-count its image
    for i, entry in entries:
        source = f"{path}: entry {i}"
        try:
            key, image_paths, items = parse(entry)
            items = list(items)
            check_utf8(key)
        except (KeyError, TypeError, ValueError) as e:
            bad.skip(source, f"malformed entry: {type(e).__name__}: {e}")
            continue
        if key in keys:
            bad.skip(source, f"duplicate image id: {key}")
            continue
        keys.add(key)
        texts = [text for j, item in enumerate(items)
                 if (text := clean_text(item.get(text_field) if isinstance(item, dict) else None,
                                        f"{source} text {j}", bad))]
        example = record(key, image_paths, texts[:max_texts], bad)
        if example is not None:
            yield example


def jsonl_records(path: str, bad: BadRecords, id_field: str,
                  parse: Callable[[dict], tuple[str, tuple[str, ...], Any, dict]]
                  ) -> Iterator[Example]:
    """Records from a jsonl file of one text a line (NLVR2, SNLI-VE), grouped per image:
    `parse(line)` -> (key, image paths, the raw text, per-text fields) raises KeyError /
    TypeError / ValueError on a malformed line, which is skipped and named by its number
    and `id_field`."""
    groups = Groups()
    for line_no, line in read_jsonl(path, bad):
        source = _line_source(path, line_no, line, id_field)
        try:
            key, image_paths, text, per_text = parse(line)
            check_utf8(key, *per_text.values())
        except (KeyError, TypeError, ValueError) as e:
            bad.skip(source, f"malformed line: {type(e).__name__}: {e}")
            continue
        text = clean_text(text, source, bad)
        if text:
            groups.add(key, image_paths, text, **per_text)
    yield from groups.records(bad)
