"""Orbax checkpoints of the whole run: train state + the grain iterator position.

    DIR/checkpoints/<step>/state     params, opt_state, step, rng   (StandardSave, sharded)
    DIR/checkpoints/<step>/data      grain iterator state, one JSON per process
                                     (process_<i>-of-<n>.json)
    DIR/checkpoints/<step>/manifest  a fingerprint of every array of `state`, and the run's
                                     config (JSON)

Saves are asynchronous: the arrays are copied off the devices, then written in the
background while training goes on. Orbax writes into a temporary directory and renames it
when complete, so a run killed mid-write leaves a `*.orbax-checkpoint-tmp*` directory that
is never taken for a checkpoint; we warn about it and resume from the previous complete one.
A background write that fails (disk full, read-only directory) raises CheckpointWriteError
at the next step boundary; the previous checkpoints stay as they were.

Restoring uses the abstract train state (shapes + shardings of *this* run) as the target,
so a checkpoint restores onto a different mesh. After reading, every array's fingerprint
must equal the saved one, so a truncated, corrupt or missing file cannot pass silently.
When a restore fails or reads back other bits, the checkpoint's tree, shapes and dtypes
are compared with this run's: a checkpoint of another model or optimizer config is a
CheckpointMismatchError listing every difference (never a partial or cast restore);
otherwise the checkpoint is damaged. A checkpoint whose arrays fit but whose saved config
differs in a model field that changes numerics and no shape (an eps, an activation:
models/config.py SHAPELESS_FIELDS) is a CheckpointMismatchError too.
`restore_newest` then falls back to the previous checkpoint with a loud warning and moves
the damaged one to DIR/damaged_checkpoints/ (kept for inspection, out of Orbax's way);
when no checkpoint reads back intact it raises and moves nothing.
"""
import json
import logging
import os
import re
import shutil
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mtower_jax.models.config import shapeless_differences

_TMP_MARKER = ".orbax-checkpoint-tmp"
DAMAGED_DIR = "damaged_checkpoints"
# Per array: the wrapping uint32 sum over elements of murmur3_fmix32(bits ^ index * golden).
# Exact integer arithmetic, so the value does not depend on the mesh or the reduction order.
FINGERPRINT = "sum32-fmix32-v1"
_GOLDEN = np.uint32(0x9E3779B9)
_CHUNK = 1 << 22  # elements per NumPy pass (bounds the temporaries)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or restored (the message says what and how to fix)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a run with a different model or optimizer config."""


class CheckpointDamagedError(CheckpointError):
    """The checkpoint's files do not read back to what was saved."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, read-only directory, ...)."""


class _IteratorSnapshot:
    """The iterator state captured at save time (the async write happens later, and the
    live iterator will have moved on by then)."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


def _fmix32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, max(bits.size, 1)).reshape(bits.shape)
    return jnp.sum(_fmix32(bits ^ (index * _GOLDEN)), dtype=jnp.uint32)


@jax.jit
def _device_fingerprints(leaves: list) -> list:
    return [_leaf_fingerprint(x) for x in leaves]


def _host_fingerprint(x: np.ndarray) -> int:
    """_leaf_fingerprint in NumPy (the same value), in chunks."""
    if x.dtype == np.bool_:
        bits = x.reshape(-1).astype(np.uint32)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
        bits = np.ascontiguousarray(x).reshape(-1).view(unsigned)
    total = np.uint32(0)
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start:start + _CHUNK].astype(np.uint32)
        h = chunk ^ (np.arange(start, start + chunk.size, dtype=np.uint32) * _GOLDEN)
        h ^= h >> 16
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> 13
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> 16
        total = np.uint32((int(total) + int(h.sum(dtype=np.uint64))) & 0xFFFFFFFF)
    return int(total)


def _on_host(x) -> bool:
    """NumPy can read `x` in place: a NumPy array, or a JAX array all on this process's
    CPU devices."""
    return isinstance(x, np.ndarray) or (
        isinstance(x, jax.Array) and x.is_fully_addressable
        and all(d.platform == "cpu" for d in x.devices()))


def _path(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def fingerprints(tree, *, on_device: bool | None = None) -> dict[str, int]:
    """{'/'-joined path: fingerprint} of every array of `tree`. On the CPU, NumPy reads the
    arrays in place (no compile); elsewhere a jitted reduction runs where they live (all
    processes must call it together). on_device forces one way (tests compare them)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [p for p, _ in flat]
    leaves = [jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
              for _, x in flat]
    if on_device is None:
        on_device = not all(_on_host(x) for x in leaves)
    if on_device:
        values = [int(v) for v in jax.device_get(_device_fingerprints(leaves))]
    else:
        values = [_host_fingerprint(np.asarray(x)) for x in leaves]
    return {_path(p): v for p, v in zip(paths, values)}


def _shapes(tree) -> dict[str, tuple[tuple, str]]:
    return {_path(p): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_config(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_differences(differences: list[tuple[str, object, object]]) -> list[str]:
    """'key: checkpoint value -> this run's value' for each (key, theirs, ours)."""
    return [f"{key}: {theirs!r} -> {ours!r}" for key, theirs, ours in differences]


def overrides_to_match(differences: list[tuple[str, object, object]]) -> str:
    """The command-line overrides that give a run the checkpoint's values."""
    return " ".join(f"--config.{key}={theirs}" for key, theirs, _ in differences)


def _os_reason(error: BaseException) -> str:
    """The operating-system cause of a failed write, e.g. 'No space left on device (errno 28)'."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            where = f": {seen.filename}" if seen.filename else ""
            return f"{seen.strerror} (errno {seen.errno}){where}"
        seen = seen.__cause__ or seen.__context__
    code = re.search(r"os_error_code='(\d+)'", str(error))  # TensorStore's errors
    if code:
        errno = int(code.group(1))
        return f"{os.strerror(errno)} (errno {errno})"
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{' ...' if len(text) > 300 else ''}"


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds on every process (collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


class Checkpoints:
    """The run's checkpoints in DIR/checkpoints. `config` (a JSON-able dict of the run's
    config) is stored in each checkpoint's manifest and shown when a restore mismatches."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True,
                 config: dict | None = None):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self._config = config
        self._pending: int | None = None  # the step whose background write may still run
        self._failed = False
        self._warn_unfinished()
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "manifest": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save))

    def _warn_unfinished(self) -> None:
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if _TMP_MARKER in name:
                logging.warning("ignoring unfinished checkpoint %s (its write never completed; "
                                "the run resumes from the newest complete checkpoint)",
                                os.path.join(self.directory, name))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def complete_steps(self) -> list[int]:
        """The steps with a complete checkpoint on disk (Orbax renames a write when done)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # --- saving -------------------------------------------------------------------------

    def save(self, step: int, state: dict, data_iterator, *, force: bool = False) -> bool:
        """Starts writing `state` (and the iterator position) as checkpoint `step`; the
        arrays are written in the background. Raises CheckpointWriteError if the previous
        write failed or this one cannot start."""
        if self._pending is not None:
            self.wait()
        self._check_writable(step)
        manifest = {"fingerprint": FINGERPRINT, "arrays": fingerprints(state),
                    "config": self._config}
        args = {"state": ocp.args.StandardSave(state), "manifest": ocp.args.JsonSave(manifest)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:
            self._failed = True
            raise CheckpointWriteError(self._write_failure(step, e)) from e
        if saved:
            self._pending = step
        return saved

    def _check_writable(self, step: int) -> None:
        """CheckpointWriteError now if DIR/checkpoints takes no new directory (read-only, no
        space): Orbax would find out in a background thread, and leave threads waiting on
        the directory for its 600 s timeout."""
        probe = os.path.join(self.directory, f".probe-{jax.process_index()}-{os.getpid()}")
        try:
            os.mkdir(probe)
            os.rmdir(probe)
            error = None
        except OSError as e:
            error = e
        if not _all_processes(error is None):
            self._failed = True
            raise CheckpointWriteError(self._write_failure(
                step, error or RuntimeError("another process cannot write there"))) from error

    def poll(self) -> None:
        """At a step boundary: raises CheckpointWriteError as soon as the background write
        has failed (reads a flag; never waits for a write still running)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the pending write is on disk; CheckpointWriteError if it failed."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._failed = True
            raise CheckpointWriteError(self._write_failure(step, e)) from e
        if step is not None and not os.path.isdir(self.step_dir(step)):
            self._failed = True
            raise CheckpointWriteError(self._write_failure(
                step, RuntimeError("Orbax did not finalize it (see the errors logged above)")))

    def _write_failure(self, step: int | None, error: BaseException) -> str:
        complete = [s for s in self.complete_steps() if s != step]
        if complete:
            kept = (f"The newest complete checkpoint, {self.step_dir(complete[-1])}, is "
                    "untouched")
            then = f"rerun the same command to resume from step {complete[-1]}"
        else:
            kept, then = "There is no earlier checkpoint", "rerun the same command"
        return (f"could not write checkpoint {step} to {self.directory}: {_os_reason(error)}. "
                f"{kept}; the run stops here. Free disk space or make {self.directory} "
                f"writable, then {then}.")

    def close(self) -> None:
        """Waits for the pending write (CheckpointWriteError if it failed) and releases the
        manager; after a failed write, only releases it."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # the failure was raised already; Orbax re-raises it here
                if not self._failed:
                    raise

    # --- restoring ----------------------------------------------------------------------

    def has_data_state(self, step: int) -> bool:
        """Whether `step` holds this process's iterator state: grain writes one file per
        process, named for the process count, so a checkpoint from a run on a different
        number of processes has none to give."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return os.path.exists(os.path.join(self.step_dir(step), "data", name))

    def check_compatible(self, step: int, abstract_state: dict) -> None:
        """CheckpointMismatchError unless checkpoint `step` holds exactly the arrays of
        `abstract_state` (same paths, shapes, dtypes); reads only metadata. Without its
        metadata (deleted) there is nothing to compare: the restore checks what it can.
        Run before every restore: it tells another config's checkpoint (an error) from a
        damaged one (a fallback), and a restore of the wrong tree is never started (Orbax's
        aborted reads printed thousands of lines of tracebacks around the report), nor one
        that Orbax would cast to the target's dtype without a word."""
        try:
            metadata = self.manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointDamagedError(f"the metadata of {self.step_dir(step)}/state "
                                         f"cannot be read: {_short(e)}") from e
        if metadata is None:
            logging.warning("%s/state has no metadata: its tree cannot be checked before "
                            "reading", self.step_dir(step))
            return
        have = _shapes(metadata.tree if hasattr(metadata, "tree") else metadata)
        want = _shapes(abstract_state)
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        differ = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        if not (missing or unexpected or differ):
            self._check_shapeless_fields(step)
            return
        lines = [f"checkpoint {self.step_dir(step)} does not fit this run's train state "
                 "(it was written with a different model or optimizer config): "
                 f"{len(missing)} missing, {len(unexpected)} unexpected, {len(differ)} with "
                 "another shape or dtype."]
        lines += [f"  missing (this run has it, the checkpoint not): {k} {want[k][0]} "
                  f"{want[k][1]}" for k in missing]
        lines += [f"  unexpected (the checkpoint has it, this run not): {k} {have[k][0]} "
                  f"{have[k][1]}" for k in unexpected]
        lines += [f"  differs: {k}: checkpoint {have[k][0]} {have[k][1]}, this run "
                  f"{want[k][0]} {want[k][1]}" for k in differ]
        lines += self._config_differences(step)
        lines.append("Nothing was restored. To train this config, use another --workdir; to "
                     "resume that run, pass the config it was written with.")
        raise CheckpointMismatchError("\n".join(lines))

    def _saved_config(self, step: int) -> dict | None:
        """The run config saved in checkpoint `step`'s manifest, if it can be read."""
        try:
            with open(os.path.join(self.step_dir(step), "manifest", "metadata")) as f:
                return json.load(f).get("config") or None
        except (OSError, ValueError):
            return None

    def _check_shapeless_fields(self, step: int) -> None:
        """CheckpointMismatchError if checkpoint `step` was written under model fields that
        change what its parameters compute but no shape (models/config.py SHAPELESS_FIELDS:
        an eps, an activation): the arrays fit, and would resume or evaluate differently."""
        saved = self._saved_config(step)
        if not saved or not self._config or "model" not in saved or "model" not in self._config:
            return
        differences = shapeless_differences(saved["model"], self._config["model"])
        if differences:
            raise CheckpointMismatchError("\n".join(
                [f"checkpoint {self.step_dir(step)} was written with a model config that "
                 "computes differently with the same parameters (checkpoint -> this run):"]
                + [f"  {line}" for line in describe_differences(differences)]
                + ["Nothing was restored. To resume or evaluate that run, pass the config it "
                   f"was written with ({overrides_to_match(differences)}); to train this "
                   "config, use another --workdir."]))

    def config_differences(self, step: int) -> list[tuple[str, object, object]]:
        """(dotted key, checkpoint value, this run's value) for every config value that
        differs from the one checkpoint `step` was written with ('(absent)' where one side
        lacks the key); [] when either config is unknown."""
        saved = self._saved_config(step)
        if not saved or not self._config:
            return []
        old, new = _flat_config(saved), _flat_config(self._config)
        return [(k, old.get(k, "(absent)"), new.get(k, "(absent)"))
                for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]

    def _config_differences(self, step: int) -> list[str]:
        differences = self.config_differences(step)
        if not differences:
            return []
        return ["Config values that differ (checkpoint -> this run):"] + [
            f"  {line}" for line in describe_differences(differences)]

    def _read(self, step: int, abstract_state: dict, data_iterator) -> tuple[dict, dict | None]:
        """(state, manifest) of `step` as stored; CheckpointDamagedError if unreadable."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if os.path.isdir(os.path.join(self.step_dir(step), "manifest")):
            args["manifest"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        self.check_compatible(step, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointDamagedError(f"{self.step_dir(step)} cannot be read: "
                                         f"{_short(e)}") from e
        return restored["state"], restored.get("manifest") if "manifest" in args else None

    def _verify(self, step: int, state: dict, manifest: dict | None) -> None:
        """CheckpointDamagedError unless every array reads back with its saved fingerprint."""
        if manifest is None:
            logging.warning("%s has no manifest (written before fingerprints were added): "
                            "its arrays cannot be verified", self.step_dir(step))
            return
        if manifest.get("fingerprint") != FINGERPRINT:
            raise CheckpointDamagedError(f"{self.step_dir(step)}/manifest has fingerprint "
                                         f"{manifest.get('fingerprint')!r}, expected "
                                         f"{FINGERPRINT!r}")
        saved, now = manifest.get("arrays", {}), fingerprints(state)
        wrong = sorted(k for k in now if saved.get(k) != now[k])
        if wrong:
            raise CheckpointDamagedError(
                f"{self.step_dir(step)}: {len(wrong)} arrays read back different from what "
                f"was saved (corrupt files): {', '.join(wrong)}")

    def restore(self, step: int, abstract_state: dict, data_iterator) -> dict:
        """The state at `step` onto the shardings of `abstract_state`, verified against its
        fingerprints; the iterator is moved to where it was at that step. Raises
        CheckpointMismatchError or CheckpointDamagedError."""
        state, manifest = self._read(step, abstract_state, data_iterator)
        self._verify(step, state, manifest)
        return state

    def restore_newest(self, abstract_state: dict,
                       make_iterator: Callable[[int], tuple] | None = None,
                       ) -> tuple[int, dict, object] | None:
        """(step, state, iterator) from the newest checkpoint that reads back intact, or
        None when DIR/checkpoints holds none. make_iterator(step) -> (iterator, whether the
        checkpoint restores its position); a fresh one is made for each attempt.

        Damaged checkpoints newer than the one restored are moved to DIR/damaged_checkpoints
        with a loud warning. If none reads back intact, raises CheckpointError and moves
        nothing (a rerun fails the same way instead of starting from scratch)."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            iterator, restore_position = make_iterator(step) if make_iterator else (None, False)
            try:
                state, manifest = self._read(step, abstract_state,
                                             iterator if restore_position else None)
                error = None
            except CheckpointDamagedError as e:
                state = manifest = None
                error = e
            if _all_processes(error is None):  # the same decision on every process
                try:
                    self._verify(step, state, manifest)  # collective
                except CheckpointDamagedError as e:
                    error = e
            elif error is None:
                error = CheckpointDamagedError(f"{self.step_dir(step)} cannot be read on "
                                               "another process")
            if error is None:
                self._move_damaged(failures)
                return step, state, iterator
            failures.append((step, str(error)))
            logging.error("CHECKPOINT %d IS DAMAGED: %s", step, error)
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self.directory} reads back intact:\n" + "\n".join(
                    f"  step {s}: {why}" for s, why in failures) +
                "\nNothing was moved. Inspect or delete them, or train into another "
                "--workdir.")
        return None

    def _move_damaged(self, failures: list[tuple[int, str]]) -> None:
        if not failures:
            return
        target = os.path.join(self.workdir, DAMAGED_DIR)
        if jax.process_index() == 0:
            os.makedirs(target, exist_ok=True)
            for step, why in failures:
                dest = os.path.join(target, str(step))
                n = 1
                while os.path.exists(dest):
                    dest, n = os.path.join(target, f"{step}.{n}"), n + 1
                shutil.move(self.step_dir(step), dest)
                logging.warning("MOVED DAMAGED CHECKPOINT %s -> %s (%s)", self.step_dir(step),
                                dest, why)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("mtower_jax: damaged checkpoints moved")
        self.manager.reload()
        logging.warning("RESUMING FROM AN OLDER CHECKPOINT: %d damaged newer checkpoint(s) "
                        "moved to %s; the steps after the restored one are trained again",
                        len(failures), target)


def latest_complete_step(workdir: str) -> int | None:
    """Newest complete checkpoint step in `workdir`, without building a manager."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    return max(steps) if steps else None
