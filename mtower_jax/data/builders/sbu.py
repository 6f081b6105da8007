"""SBU Captioned Photo Dataset, for pretraining (captions schema).

Raw layout under raw_dir (https://www.cs.rice.edu/~vo9/sbucaptions/ gives the two text
files; the photos must be fetched from their Flickr URLs, e.g. with img2dataset or wget):

    SBU_captioned_photo_dataset_urls.txt       one photo URL per line
    SBU_captioned_photo_dataset_captions.txt   the caption of the photo on the same line
    images/4385058960_b0f291553e.jpg ...       each photo saved under the basename of its
                                               URL (http://static.flickr.com/2723/
                                               4385058960_b0f291553e.jpg)

Split: `train` (1M photos). One record per photo; key and `image_id` are the file's stem.
Many Flickr URLs are dead, so part of the photos can never be downloaded: those rows are
skipped and counted, and a build typically needs `--max_skipped_fraction` well above the
default (e.g. 0.2); the skip summary (`skipped.json`) says how many were missing.
"""
import itertools
import os
import posixpath
import urllib.parse
from typing import Iterator

from mtower_jax.data.bad_records import BadRecords, DataError
from mtower_jax.data.builders.base import RawFilesBuilder
from mtower_jax.data.builders.raw_rows import Example, Groups, clean_text, require

LAYOUT = __doc__
URLS = "SBU_captioned_photo_dataset_urls.txt"
CAPTIONS = "SBU_captioned_photo_dataset_captions.txt"


def url_basename(url: str) -> str:
    """The file name a downloader gives the URL's target: the last path component ('' if
    the URL does not parse, e.g. 'http://[x/a.jpg': no downloader fetched it)."""
    try:
        return posixpath.basename(urllib.parse.urlparse(url.strip()).path)
    except ValueError:
        return ""


class SbuCaptions(RawFilesBuilder):
    """SBU captioned photos (1M Flickr images, one caption each) for pretraining."""
    name = "sbu"
    VERSION = "1.0.0"
    SCHEMA = "captions"
    RAW_FILES = LAYOUT

    def _splits(self, raw_dir: str, bad) -> dict:
        urls = require(os.path.join(raw_dir, URLS), self.name)
        captions = require(os.path.join(raw_dir, CAPTIONS), self.name)
        return {"train": self._records(raw_dir, urls, captions, bad("train"))}

    def _records(self, raw_dir: str, urls: str, captions: str,
                 bad: BadRecords) -> Iterator[Example]:
        groups = Groups()  # a photo listed twice gets one record with both captions
        # Lines end at "\n" only: a stray "\r" in one file must not shift every later line.
        with (open(urls, encoding="utf-8", errors="replace", newline="\n") as url_lines,
              open(captions, encoding="utf-8", errors="replace", newline="\n") as caption_lines):
            for line_no, (url, caption) in enumerate(
                    itertools.zip_longest(url_lines, caption_lines), 1):
                if url is None or caption is None:
                    if not (url or caption).strip():
                        continue  # a trailing blank line in one of the files
                    raise DataError(f"{self.name}: {urls} and {captions} are not aligned: "
                                    f"one ends at line {line_no - 1}, the other goes on")
                source = f"{captions}:{line_no}"
                basename = url_basename(url)
                if not basename:
                    bad.skip(f"{urls}:{line_no}", f"no file name in URL: {url.strip()!r}")
                    continue
                text = clean_text(caption, source, bad)
                if text:
                    key = os.path.splitext(basename)[0]
                    groups.add(key, (os.path.join(raw_dir, "images", basename),), text)
        yield from groups.records(bad)
