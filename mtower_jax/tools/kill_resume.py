"""Kill-and-resume experiment: interrupt the main job at seeded random moments, resume it
each time, and check every resume (docs/RELIABILITY.md).

    python -m mtower_jax.tools.kill_resume --workdir=runs/kills --seed=0 --kills=10 \
        --reference=runs/uninterrupted -- --config=configs/pretrain.py:model=tiny \
        --config.total_steps=40 --config.checkpoint_every=4 --config.log_every=1

Everything after `--` is passed to `python -m mtower_jax.main` (with --workdir); the run
must log every step (log_every=1): the tool follows DIR/metrics.jsonl. The seed orders the
events and draws their moments:

  sigkill    one per phase, the rest ('anytime') at a moment drawn uniformly from the run's
             expected duration (start-up dominates it, as it does in a preemption of a
             run this small):
             startup  a random moment before the first step (imports, restore, compile)
             step     inside a step (a random fraction of a step after the last log line)
             between  right after a step that writes no checkpoint
             write    while a checkpoint is being written (its temporary directory exists)
             saved    right after a checkpoint became complete
  sigterm    after a random step: exit 0 within the grace period, a checkpoint of the step
             it stopped at
  disk_full  a run whose file writes stop at --fsize_limit bytes (RLIMIT_FSIZE, SIGXFSZ
             ignored: writes fail with EFBIG): exit 1 at its first checkpoint with the
             reason, every earlier checkpoint untouched
  finish     the last run, to total_steps: exit 0

After every run: it resumed from the newest complete checkpoint there was (a partial one
is never loaded) and warned about each unfinished one it ignored. With --reference (an
uninterrupted run of the same config), the final params must be bitwise equal. Prints one
JSON object per event, then a summary; exit code 1 if any check failed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

PHASES = ("startup", "step", "between", "write", "saved")
TMP_MARKER = ".orbax-checkpoint-tmp"
WRITE_FAILED = "could not write checkpoint"


@dataclasses.dataclass
class Event:
    kind: str  # sigkill | sigterm | disk_full | finish
    phase: str = ""  # sigkill: one of PHASES, or 'anytime'
    complete_before: list[int] = dataclasses.field(default_factory=list)
    partial_before: list[str] = dataclasses.field(default_factory=list)
    moment: str = ""  # when the signal went out, as observed
    returncode: int | None = None
    seconds: float = 0.0  # the run's wall time
    exit_seconds: float | None = None  # SIGTERM -> exit
    steps: list[int] = dataclasses.field(default_factory=list)  # logged by this run
    resumed_from: int | None = None
    complete_after: list[int] = dataclasses.field(default_factory=list)
    partial_after: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    log: str = ""  # the run's stderr file

    partial_new: list[str] = dataclasses.field(default_factory=list)  # left by this run

    @property
    def interrupted_write(self) -> bool:
        """A checkpoint write was cut short: its temporary directory outlived the run."""
        return bool(self.partial_new)


def schedule(seed: int, kills: int) -> list[Event]:
    """The events in the order the seed gives, except the first, a SIGKILL right after the
    first checkpoint (so that every later fault has a checkpoint to leave alone), and the
    last, the finishing run."""
    if kills < len(PHASES):
        raise ValueError(f"--kills={kills}: at least one per phase, {len(PHASES)}")
    rng = np.random.default_rng(seed)
    phases = [p for p in PHASES if p != "saved"] + ["anytime"] * (kills - len(PHASES))
    events = [Event("sigkill", p) for p in phases] + [Event("sigterm"), Event("disk_full")]
    events = [events[i] for i in rng.permutation(len(events))]
    return [Event("sigkill", "saved")] + events + [Event("finish")]


def scan(checkpoint_dir: str) -> tuple[list[int], list[str]]:
    """(complete steps, unfinished write directories) in DIR/checkpoints."""
    if not os.path.isdir(checkpoint_dir):
        return [], []
    names = os.listdir(checkpoint_dir)
    return (sorted(int(n) for n in names if n.isdigit()),
            sorted(n for n in names if TMP_MARKER in n))


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def snapshot(directory: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


class _MetricsTail:
    """The steps appended to DIR/metrics.jsonl since the tail was made (whole lines only)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.steps: list[int] = []
        self.times: list[float] = []

    def poll(self) -> int | None:
        """The newest step logged so far by this run."""
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.offset += end
            for line in data[:end].splitlines():
                if line.strip():
                    self.steps.append(int(json.loads(line)["step"]))
                    self.times.append(time.monotonic())
        return self.steps[-1] if self.steps else None

    def step_seconds(self) -> float:
        gaps = np.diff(self.times)
        return float(np.median(gaps)) if len(gaps) else 0.1


class KillResume:
    """Runs the events of `schedule` against one workdir (see the module doc)."""

    def __init__(self, main_args: Sequence[str], workdir: str, *, seed: int = 0,
                 checkpoint_every: int, total_steps: int, grace_s: float = 25.0,
                 fsize_limit: int = 1 << 20, env: dict | None = None,
                 run_timeout_s: float = 600.0, say: Callable[[str], None] = print):
        self.main_args, self.workdir = list(main_args), os.path.abspath(workdir)
        self.checkpoint_dir = os.path.join(self.workdir, "checkpoints")
        self.rng = np.random.default_rng(seed + 1)  # moments; `schedule` uses `seed`
        self.every, self.total, self.grace_s = checkpoint_every, total_steps, grace_s
        self.fsize_limit, self.env, self.timeout = fsize_limit, env, run_timeout_s
        self.say = say
        self.startup_s = 8.0  # spawn -> first step line; measured from the runs as they go
        self.step_s = 0.1  # between step lines; measured too
        os.makedirs(os.path.join(self.workdir, "kill_resume"), exist_ok=True)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mtower_jax.main", *self.main_args,
                f"--workdir={self.workdir}"]

    def _start(self, index: int, event: Event) -> tuple[subprocess.Popen, object]:
        event.log = os.path.join(self.workdir, "kill_resume", f"run_{index:02d}_{event.kind}.log")
        stderr = open(event.log, "w")
        limit = self.fsize_limit

        def full_disk() -> None:  # in the child, before exec: its writes stop at `limit`
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        proc = subprocess.Popen(self.command(), env=self.env, stdout=subprocess.DEVNULL,
                                stderr=stderr,
                                preexec_fn=full_disk if event.kind == "disk_full" else None)
        return proc, stderr

    def _wait_until(self, proc: subprocess.Popen, ready: Callable[[], bool],
                    interval: float) -> bool:
        """Polls until `ready()`; False if the run exited or timed out first."""
        deadline = time.monotonic() + self.timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True

    def _first_save_after(self, step: int) -> int:
        return (step // self.every + 1) * self.every

    def _target_step(self, resumed: int, *, off_checkpoint: bool = False) -> int:
        """A random step within the next checkpoint interval (before the last step)."""
        high = min(resumed + self.every, self.total - 1)
        choices = [s for s in range(resumed + 1, high + 1)
                   if not (off_checkpoint and s % self.every == 0)]
        if not choices:
            raise RuntimeError(f"no step left to interrupt after step {resumed} of "
                               f"{self.total}: use more total_steps")
        return int(self.rng.choice(choices))

    def _interrupt(self, proc: subprocess.Popen, event: Event, tail: _MetricsTail,
                   resumed: int, started: float) -> float | None:
        """Sends the event's signal at its moment; returns when it went out (None: the run
        ended before that moment came)."""
        def logged(step: int) -> Callable[[], bool]:
            return lambda: (tail.poll() or 0) >= step

        if event.phase in ("startup", "anytime"):
            if event.phase == "startup":
                delay = float(self.rng.uniform(0.2, 0.9)) * self.startup_s
            else:  # until a little past the next checkpoint
                delay = float(self.rng.uniform(0.2 * self.startup_s, self.startup_s + (
                    self.every + 1) * self.step_s))
            def due() -> bool:
                tail.poll()  # keeps the times of the log lines exact
                return time.monotonic() - started >= delay
            if not self._wait_until(proc, due, 0.01):
                return None
            event.moment = f"{delay:.1f} s after start, " + (
                f"after step {tail.steps[-1]}'s log line" if tail.steps
                else "before the first step")
        elif event.phase in ("step", "between") or event.kind == "sigterm":
            target = self._target_step(resumed, off_checkpoint=event.phase == "between")
            if not self._wait_until(proc, logged(target), 0.005):
                return None
            if event.phase == "step":
                step_s = tail.step_seconds() if len(tail.times) > 2 else self.step_s
                delay = float(self.rng.uniform(0, 1)) * step_s
                time.sleep(delay)
                event.moment = f"{delay * 1000:.0f} ms after step {target}'s log line"
            else:
                event.moment = f"right after step {target}'s log line"
        elif event.phase == "write":
            save = self._first_save_after(resumed)
            prefix = f"{save}{TMP_MARKER}"
            # An earlier run's leftover of the same name is not this run's write.
            old = {_identity(os.path.join(self.checkpoint_dir, n)) for n in event.partial_before}

            def writing() -> bool:
                return any(n.startswith(prefix) and _identity(
                    os.path.join(self.checkpoint_dir, n)) not in old
                    for n in scan(self.checkpoint_dir)[1])
            # Watch only once the run has stepped: during start-up, Orbax's clean-up of a
            # leftover directory changes its identity (ctime) and looked like a new write.
            if not (self._wait_until(proc, logged(resumed + 1), 0.005)
                    and self._wait_until(proc, writing, 0.001)):
                return None
            event.moment = f"while checkpoint {save} was being written"
        elif event.phase == "saved":
            save = self._first_save_after(resumed)
            if not self._wait_until(proc, lambda: save in scan(self.checkpoint_dir)[0], 0.002):
                return None
            event.moment = f"right after checkpoint {save} was complete"
        if proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGTERM if event.kind == "sigterm" else signal.SIGKILL)
        return time.monotonic()

    def run_event(self, index: int, event: Event) -> Event:
        event.complete_before, event.partial_before = scan(self.checkpoint_dir)
        resumed = event.complete_before[-1] if event.complete_before else 0
        kept = {s: snapshot(os.path.join(self.checkpoint_dir, str(s)))
                for s in event.complete_before} if event.kind == "disk_full" else {}
        old = {_identity(os.path.join(self.checkpoint_dir, n)) for n in event.partial_before}
        tail = _MetricsTail(os.path.join(self.workdir, "metrics.jsonl"))
        started = time.monotonic()
        proc, stderr = self._start(index, event)
        try:
            sent_at = None
            if event.kind in ("sigkill", "sigterm"):
                sent_at = self._interrupt(proc, event, tail, resumed, started)
                if sent_at is None:
                    event.problems.append(f"the run ended before the {event.kind}")

            def follow() -> bool:  # the times of the log lines measure the start-up
                tail.poll()
                return False  # until the run exits

            if not self._wait_until(proc, follow, 0.01):
                if proc.poll() is None:
                    proc.kill()
                    event.problems.append(f"still running after {self.timeout:.0f} s: killed")
            proc.wait()
            if sent_at is not None and event.kind == "sigterm":
                event.exit_seconds = time.monotonic() - sent_at
        finally:
            stderr.close()
        event.seconds = time.monotonic() - started
        event.returncode = proc.returncode
        tail.poll()
        event.steps = tail.steps
        if tail.times:  # the first step line comes after imports, restore and compile
            self.startup_s = tail.times[0] - started
        if len(tail.times) > 2:
            self.step_s = tail.step_seconds()
        event.complete_after, event.partial_after = scan(self.checkpoint_dir)
        event.partial_new = [n for n in event.partial_after
                             if _identity(os.path.join(self.checkpoint_dir, n)) not in old]
        self._check(event, kept)
        return event

    def _check(self, event: Event, kept: dict) -> None:
        with open(event.log, errors="replace") as f:
            log = f.read()
        problems = event.problems
        resumed = re.findall(r"resuming from \S*/checkpoints/(\d+)\b", log)
        event.resumed_from = int(resumed[-1]) if resumed else None
        newest = event.complete_before[-1] if event.complete_before else None
        got_going = bool(event.steps) or event.kind != "sigkill"
        if event.resumed_from != newest and (got_going or event.resumed_from is not None):
            problems.append(f"resumed from {event.resumed_from}, the newest complete "
                            f"checkpoint was {newest}")
        if got_going:
            for name in event.partial_before:
                if f"ignoring unfinished checkpoint {self.checkpoint_dir}/{name}" not in log:
                    problems.append(f"no warning about the unfinished checkpoint {name}")
        if event.kind == "sigkill" and event.returncode != -signal.SIGKILL:
            problems.append(f"exit code {event.returncode}, not killed (-9)")
        if event.kind == "sigterm":
            stopped = event.steps[-1] if event.steps else None
            if event.returncode != 0:
                problems.append(f"SIGTERM: exit code {event.returncode}, not 0")
            if event.exit_seconds is None or event.exit_seconds > self.grace_s:
                problems.append(f"SIGTERM: exit after {event.exit_seconds} s, grace "
                                f"{self.grace_s} s")
            if not event.complete_after or event.complete_after[-1] != stopped:
                problems.append(f"SIGTERM: the run stopped after step {stopped}, the newest "
                                f"checkpoint is {event.complete_after[-1:]}")
        if event.kind == "disk_full":
            if event.returncode != 1:
                problems.append(f"disk full: exit code {event.returncode}, not 1")
            if WRITE_FAILED not in log or "File too large" not in log:
                problems.append("disk full: no 'could not write checkpoint ... File too "
                                "large' in the log")
            for step, files in kept.items():
                if snapshot(os.path.join(self.checkpoint_dir, str(step))) != files:
                    problems.append(f"disk full: checkpoint {step} changed or vanished")
            if event.complete_after != event.complete_before:
                problems.append(f"disk full: checkpoints {event.complete_before} became "
                                f"{event.complete_after}")
        if event.kind == "finish":
            if event.returncode != 0:
                problems.append(f"finish: exit code {event.returncode}")
            if not event.complete_after or event.complete_after[-1] != self.total:
                problems.append(f"finish: newest checkpoint {event.complete_after[-1:]}, "
                                f"not {self.total}")

    def run(self, events: Sequence[Event]) -> list[Event]:
        done = []
        for index, event in enumerate(events):
            done.append(self.run_event(index, event))
            self.say(json.dumps(summary_row(event)))
        return done


def summary_row(event: Event) -> dict:
    return dict(kind=event.kind, phase=event.phase, moment=event.moment,
                returncode=event.returncode, seconds=round(event.seconds, 1),
                exit_seconds=None if event.exit_seconds is None else round(event.exit_seconds, 2),
                steps=[event.steps[0], event.steps[-1]] if event.steps else [],
                resumed_from=event.resumed_from, complete_before=event.complete_before,
                complete_after=event.complete_after, interrupted_write=event.interrupted_write,
                problems=event.problems)


def final_params(workdir: str) -> dict:
    """The params of the newest checkpoint in `workdir` (numpy)."""
    import orbax.checkpoint as ocp

    complete, _ = scan(os.path.join(workdir, "checkpoints"))
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(complete[-1]), "state")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)["params"]


def params_differ(a: dict, b: dict) -> list[str]:
    """Paths of the leaves that are not bitwise equal (or that only one side has)."""
    from flax import traverse_util
    fa, fb = (traverse_util.flatten_dict(p, sep="/") for p in (a, b))
    return sorted(k for k in set(fa) | set(fb)
                  if k not in fa or k not in fb or not np.array_equal(
                      np.asarray(fa[k]), np.asarray(fb[k])))


def _flag(args: Sequence[str], name: str, default: int | float | None = None):
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--config.{name}=")]
    if not values and default is None:
        raise SystemExit(f"pass --config.{name}=... after --")
    return type(default or 0)(values[-1]) if values else default


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--reference", default="", help="an uninterrupted run's workdir")
    parser.add_argument("--fsize_limit", type=int, default=1 << 20,
                        help="bytes a disk_full run may write per file (the checkpoint's "
                        "array file must be bigger)")
    args = parser.parse_args(argv[:split])
    main_args = argv[split + 1:]
    experiment = KillResume(main_args, args.workdir, seed=args.seed,
                            checkpoint_every=_flag(main_args, "checkpoint_every"),
                            total_steps=_flag(main_args, "total_steps"),
                            grace_s=_flag(main_args, "preemption_grace_s", 25.0),
                            fsize_limit=args.fsize_limit)
    events = experiment.run(schedule(args.seed, args.kills))
    failed = [e for e in events if e.problems]
    summary = dict(events=len(events), failed=len(failed),
                   interrupted_writes=sum(e.interrupted_write for e in events))
    if args.reference:
        summary["params_differ"] = params_differ(final_params(args.workdir),
                                                 final_params(args.reference))
    print(json.dumps(summary))
    return 1 if failed or summary.get("params_differ") else 0


if __name__ == "__main__":
    sys.exit(main())
