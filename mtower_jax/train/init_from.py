"""`config.init_from`: start a run from the params of a converted or an earlier checkpoint.

    DIR/params                          written by `python -m mtower_jax.convert`
    DIR/checkpoints/<step>/state        a training run's workdir (its newest checkpoint)

Params only: the optimizer starts fresh. Parameters this model has and the source lacks
(e.g. a task head after pretraining) keep their fresh initialisation and are listed in the
log; source parameters this model lacks (e.g. the MLM head when fine-tuning) are listed
and ignored. A shape mismatch is an error that lists every mismatched parameter.
"""
import logging
import os

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from mtower_jax.train.checkpoints import latest_complete_step


class InitFromError(ValueError):
    """The init_from source cannot initialise this model (all problems listed)."""


def _source_params(directory: str) -> dict:
    """The params pytree (numpy) stored under `directory`, either layout above."""
    directory = os.path.abspath(os.path.expanduser(directory))
    params_dir = os.path.join(directory, "params")
    with ocp.StandardCheckpointer() as ckptr:
        if os.path.isdir(params_dir):
            return ckptr.restore(params_dir)
        step = latest_complete_step(directory)
        if step is None:
            raise InitFromError(
                f"config.init_from={directory!r} holds neither params/ (written by "
                "`python -m mtower_jax.convert`) nor checkpoints/<step>/ of a training run")
        state_dir = os.path.join(directory, "checkpoints", str(step), "state")
        return ckptr.restore(state_dir)["params"]


def merge_params(fresh: dict, source: dict, what: str) -> tuple[dict, dict]:
    """(params, report): `fresh` with every leaf that `source` has replaced by it.

    report = {'loaded': [...], 'fresh': [...], 'ignored': [...]} as '/'-joined paths.
    """
    fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
    source_flat = traverse_util.flatten_dict(source, sep="/")
    mismatched = [f"  {k}: {what} has {tuple(np.shape(source_flat[k]))}, the model "
                  f"{tuple(np.shape(v))}" for k, v in fresh_flat.items()
                  if k in source_flat and tuple(np.shape(source_flat[k])) != tuple(np.shape(v))]
    if mismatched:
        raise InitFromError(f"{len(mismatched)} parameters of {what} do not fit the model "
                            "(is model config the one the checkpoint was made with?):\n"
                            + "\n".join(mismatched))
    merged = {k: np.asarray(source_flat[k], np.asarray(v).dtype) if k in source_flat else v
              for k, v in fresh_flat.items()}
    report = dict(loaded=sorted(k for k in fresh_flat if k in source_flat),
                  fresh=sorted(k for k in fresh_flat if k not in source_flat),
                  ignored=sorted(k for k in source_flat if k not in fresh_flat))
    return traverse_util.unflatten_dict(merged, sep="/"), report


def load_init_params(directory: str, fresh_params: dict) -> dict:
    """`fresh_params` (host numpy tree) overwritten from `directory`; the report is logged."""
    params, report = merge_params(fresh_params, _source_params(directory), directory)
    logging.info("init_from %s: loaded %d parameters", directory, len(report["loaded"]))
    for kind in ("fresh", "ignored"):
        if report[kind]:
            logging.warning("init_from %s: %s %d parameters: %s", directory,
                            "freshly initialised" if kind == "fresh" else "ignored (not in "
                            "this model)", len(report[kind]), ", ".join(report[kind]))
    return params
