"""Orbax checkpoints of the whole run: train state + the grain iterator position.

    DIR/checkpoints/<step>/state   params, opt_state, step, rng   (StandardSave, sharded)
    DIR/checkpoints/<step>/data    grain iterator state, one JSON per process
                                   (process_<i>-of-<n>.json)

Saves are asynchronous: the arrays are copied off the devices, then written in the
background while training goes on. Orbax writes into a temporary directory and renames it
when complete, so a run killed mid-write leaves a `*.orbax-checkpoint-tmp*` directory that
is never taken for a checkpoint; we warn about it and resume from the previous complete one.
Restoring uses the abstract train state (shapes + shardings of *this* run) as the target,
so a checkpoint restores onto a different mesh.
"""
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

_TMP_MARKER = ".orbax-checkpoint-tmp"


class _IteratorSnapshot:
    """The iterator state captured at save time (the async write happens later, and the
    live iterator will have moved on by then)."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpoints:
    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._warn_unfinished()
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
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

    def save(self, step: int, state: dict, data_iterator, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def has_data_state(self, step: int) -> bool:
        """Whether `step` holds this process's iterator state: grain writes one file per
        process, named for the process count, so a checkpoint from a run on a different
        number of processes has none to give."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return os.path.exists(os.path.join(self.directory, str(step), "data", name))

    def restore(self, step: int, abstract_state: dict, data_iterator) -> dict:
        """The state at `step` onto the shardings of `abstract_state`; the iterator is
        moved to where it was at that step."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def wait(self) -> None:
        """Blocks until the pending async save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_complete_step(workdir: str) -> int | None:
    """Newest complete checkpoint step in `workdir`, without building a manager."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    return max(steps) if steps else None
