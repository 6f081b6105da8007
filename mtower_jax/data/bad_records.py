"""Skipping bad input without losing the run: count every skipped record with its source,
fail with a clear message only when the skipped fraction passes a threshold.

Used by the builders (unreadable image, missing file, empty caption, malformed JSON line)
and by the pipelines (an image that fails to decode at training time).
"""
import collections
import dataclasses
import logging

DEFAULT_MAX_SKIPPED_FRACTION = 0.01
# Below this many records seen, the fraction is too noisy to fail on (tiny fixtures, the
# first batches of a run); the check at the end of a build is always exact.
_MIN_RECORDS_FOR_EARLY_FAILURE = 1000


class DataError(Exception):
    """Bad or missing input data; the message says what, where, and how to fix it."""


@dataclasses.dataclass
class BadRecords:
    """Counts records seen and skipped; `skip()` logs the first few of each reason."""
    what: str  # e.g. "coco_captions/train" — names the data in messages
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION
    seen: int = 0
    skipped: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)  # (source, reason), first 20

    def ok(self) -> None:
        self.seen += 1

    def skip(self, source: str, reason: str) -> None:
        # Lone surrogates (a JSON "\udc80" escape, an undecodable file name) cannot be written
        # to a UTF-8 log, stream or pytest-xdist report: kept as their escapes.
        source, reason = (str(text).encode("utf-8", "backslashreplace").decode("utf-8")
                          for text in (source, reason))
        self.seen += 1
        self.skipped += 1
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < 20:
            self.examples.append((source, reason))
            logging.warning("%s: skipped %s: %s", self.what, source, reason)
        # Fail as soon as the skips exceed the allowed share of max(seen, 1000): a run with a
        # 1% threshold tolerates 10 bad records among its first 1000, a 0% run none.
        if self.skipped > self.max_skipped_fraction * max(self.seen,
                                                          _MIN_RECORDS_FOR_EARLY_FAILURE):
            self.check()

    @property
    def fraction(self) -> float:
        return self.skipped / max(self.seen, 1)

    def check(self) -> None:
        """Raises DataError if more than `max_skipped_fraction` of the records were bad."""
        if self.skipped and self.fraction > self.max_skipped_fraction:
            listed = "\n".join(f"  {src}: {why}" for src, why in self.examples)
            raise DataError(
                f"{self.what}: skipped {self.skipped} of {self.seen} records "
                f"({self.fraction:.2%} > max_skipped_fraction={self.max_skipped_fraction:.2%}). "
                f"By reason: {dict(self.reasons)}. First ones:\n{listed}\n"
                "Fix or re-download those files, or raise the threshold if the loss is "
                "acceptable: --max_skipped_fraction of `python -m mtower_jax.data.build`, "
                "config.data.max_skipped_fraction of a run.")

    def summary(self) -> dict:
        return dict(what=self.what, seen=self.seen, skipped=self.skipped,
                    reasons=dict(self.reasons), examples=[list(e) for e in self.examples])
