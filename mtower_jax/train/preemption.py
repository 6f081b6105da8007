"""SIGTERM (preemption) handling: the loop checkpoints at the next step boundary and exits 0.

Schedulers send SIGTERM, wait a grace period (Kubernetes and GCE: 30 s by default; SLURM:
KillWait), then SIGKILL. `Preemption` turns SIGTERM into a flag the loop checks between
steps, and starts a watchdog: if the process is still alive `grace_s` seconds after the
signal (a step, compile or write slower than the grace period), the watchdog ends it with
exit code 0 when the newest checkpoint already holds the current step, else 1 with a log
line naming the steps that are lost. Set config.preemption_grace_s a little below the
scheduler's period so that this line is written before the SIGKILL.

Python runs signal handlers in the main thread between bytecodes, so the flag and the
watchdog start when the main thread returns from the C++ call it is in (a step, a compile).
Light imports only: tests start this module in a bare subprocess.
"""
import os
import signal
import sys
import threading
import time

from absl import logging

EXIT_UNSAVED = 1  # the grace period ran out with steps not yet in a checkpoint


class Preemption:
    """Installs the SIGTERM handler (main thread only); `restore()` puts the old one back.

    The loop reports progress through `step` (steps done) and `saved_step` (the newest step
    whose checkpoint is complete on disk); the watchdog reads them."""

    def __init__(self, grace_s: float):
        if grace_s <= 0:
            raise ValueError(f"config.preemption_grace_s={grace_s}: must be > 0 (seconds "
                             "between SIGTERM and the scheduler's SIGKILL)")
        self.grace_s = float(grace_s)
        self.requested = False
        self.received_at: float | None = None
        self.step: int | None = None
        self.saved_step: int | None = None
        self._watchdog: threading.Timer | None = None
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        if self.requested:
            return
        self.requested, self.received_at = True, time.monotonic()
        logging.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting "
                        "(grace period %.0f s)", self.grace_s)
        self._watchdog = threading.Timer(self.grace_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        if self.step == self.saved_step:
            logging.warning("grace period of %.0f s over: the newest checkpoint holds step %s, "
                            "nothing is lost; exiting", self.grace_s, self.step)
            code = 0
        else:
            logging.error(
                "grace period of %.0f s over before the checkpoint of step %s was written: "
                "steps %s..%s are lost, the next run resumes from %s; exiting with code %d",
                self.grace_s, self.step,
                1 if self.saved_step is None else self.saved_step + 1, self.step,
                "scratch" if self.saved_step is None else f"step {self.saved_step}",
                EXIT_UNSAVED)
            code = EXIT_UNSAVED
        logging.flush()
        sys.stderr.flush()
        os._exit(code)  # the main thread is stuck; a normal exit would wait for it

    def restore(self) -> None:
        """Puts the previous SIGTERM handler back. The watchdog, if started, keeps running:
        the process must still be gone within the grace period."""
        signal.signal(signal.SIGTERM, self._previous)
