"""Training metrics output: a JSON-lines log, TensorBoard scalars, and a console progress line.

    writer = MetricsWriter(workdir, total_steps=config.total_steps,
                           is_main_process=jax.process_index() == 0)
    writer.write(step, {"loss": 2.31, "lr": 1e-5, "examples_per_sec": 812.0})
    writer.close()

`workdir/metrics.jsonl` gets one object per write, {"step": s, "wall_time": t, **metrics}, with
every number exact: a Python float's JSON text is its shortest round-tripping repr, and
NumPy / JAX scalars are converted to the Python int / float / bool holding the same value
(a float32 0.1 is written as 0.10000000149011612). NaN and Inf are written as Python's json
does (NaN, Infinity), which `json.loads` reads back. A resumed run appends, so a step can
appear twice; the later record is the newer one. TensorBoard gets one scalar tag per key
under `workdir/tensorboard` (stored as float32 by the event format). The console gets, when
stdout is a terminal, one progress bar line redrawn in place; otherwise one plain log line
per write. ETA = (total_steps - step) x an exponential moving average of seconds per step,
measured between writes (the first write, which usually follows compilation, only starts it).
Only the main process writes anything.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("step", "wall_time")
PROGRESS_KEYS = ("loss", "lr", "examples_per_sec", "mfu")
EMA_DECAY = 0.8  # weight of the old average per new step-time sample: adapts within ~5 writes
BAR_WIDTH = 20


def to_python_scalar(value: Any) -> bool | int | float:
    """A Python bool / int / float with exactly the value of a Python, NumPy or JAX scalar
    (or one-element array)."""
    if type(value) in (bool, int, float):
        return value
    array = np.asarray(value)
    item = array.reshape(()).item() if array.size == 1 else None  # bfloat16 -> float, too
    if type(item) not in (bool, int, float):
        raise TypeError(f"metric values must be real numeric scalars, got {value!r}")
    return item


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Every record of workdir/metrics.jsonl in file order; a last line without its newline
    (a write cut short by preemption) is skipped."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


def _format(value: bool | int | float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class MetricsWriter:
    """Writes each step's metrics to JSON lines, TensorBoard and the console (see module doc).

    progress_keys: the metrics shown on the terminal progress bar, when present. stream: where
    the console line goes (default: sys.stdout at the time of each write). clock: seconds,
    for the step-time average (default time.monotonic).
    """

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int,
                 is_main_process: bool = True, progress_keys: Sequence[str] = PROGRESS_KEYS,
                 stream=None, clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self.progress_keys = tuple(progress_keys)
        self._enabled = is_main_process
        self._stream, self._clock = stream, clock
        self._last: tuple[int, float] | None = None  # (step, clock) of the previous write
        self._seconds_per_step: float | None = None
        self._bar_drawn = False
        self._file = self._tensorboard = None
        if not self._enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        self._drop_partial_line(path)
        self._file = open(path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter  # imported here: other processes never need it
        self._tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    @staticmethod
    def _drop_partial_line(path: str) -> None:
        """Truncates a record cut short by a crash, so the next one starts on its own line."""
        if not os.path.exists(path):
            return
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self._enabled:
            return
        clash = set(metrics) & set(RESERVED_KEYS)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved for the record itself")
        step = int(step)
        values = {key: to_python_scalar(value) for key, value in metrics.items()}
        record = {"step": step, "wall_time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a preempted run keeps every record written so far
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, step)
        self._update_step_time(step)
        self._print(step, values)

    def _update_step_time(self, step: int) -> None:
        now = self._clock()
        if self._last is not None and step > self._last[0]:
            sample = (now - self._last[1]) / (step - self._last[0])
            old = self._seconds_per_step
            self._seconds_per_step = sample if old is None else EMA_DECAY * old + (
                1 - EMA_DECAY) * sample
        self._last = (step, now)

    def eta_seconds(self) -> float | None:
        """Seconds left at the current average step time; None before two writes."""
        if self._seconds_per_step is None or self._last is None:
            return None
        return max(self.total_steps - self._last[0], 0) * self._seconds_per_step

    def _print(self, step: int, values: dict) -> None:
        stream = self._stream or sys.stdout
        eta = self.eta_seconds()
        eta_text = "?" if eta is None else _format_seconds(eta)
        if stream.isatty():
            frac = min(max(step / self.total_steps, 0.0), 1.0) if self.total_steps else 1.0
            filled = math.floor(frac * BAR_WIDTH)
            shown = " | ".join(f"{k} {_format(values[k])}" for k in self.progress_keys
                               if k in values)
            line = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {step}/{self.total_steps} "
                    f"| {shown} | eta {eta_text}")
            stream.write("\r" + line + "\x1b[K")  # \x1b[K: clear what a longer line left
            self._bar_drawn = True
        else:
            shown = " ".join(f"{k}={_format(v)}" for k, v in values.items())
            stream.write(f"step {step}/{self.total_steps} {shown} eta={eta_text}\n")
        stream.flush()

    def close(self) -> None:
        """Flushes and closes the files; ends the progress bar line."""
        if not self._enabled:
            return
        if self._bar_drawn:
            (self._stream or sys.stdout).write("\n")
            self._bar_drawn = False
        if self._tensorboard is not None:
            self._tensorboard.close()  # flushes the event file
            self._tensorboard = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
