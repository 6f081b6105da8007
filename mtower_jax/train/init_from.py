"""`config.init_from`: start a run from the params of a converted or an earlier checkpoint.

    DIR/params                          written by `python -m mtower_jax.convert`
    DIR/checkpoints/<step>/state        a training run's workdir (its newest checkpoint)
    DIR1,DIR2,...                       several, each giving the parameters it has (the
                                        uni-modal towers converted apart: runs/clip,runs/roberta);
                                        a parameter in two of them is an error

Params only: the optimizer starts fresh. Parameters this model has and the source lacks
(e.g. a task head after pretraining) keep their fresh initialisation and are listed in the
log; source parameters this model lacks (e.g. the MLM head when fine-tuning) are listed
and ignored. A shape mismatch is an error that lists every mismatched parameter, and the
missing and unexpected ones too; so is a source that shares no parameter with the model.
A training checkpoint's params are checked against the fingerprints saved with them
(train/checkpoints.py): a corrupt file is an error, not a silent mix.

Some model fields change what loaded parameters compute without changing a shape (an
encoder's LayerNorm eps or activation; HF BridgeTower's cross-modal eps is 1e-5, our
presets' 1e-12). Where a source records its model config (a conversion's
DIR/model_config.json, a run's DIR/config.json), those fields of every part whose
parameters it gives must equal the run's (models/config.py SHAPELESS_FIELDS), else
InitFromError names each with the override that matches the source.

The encoder layers of a source in the other layout (`layer_{i}/...` vs model.scan_layers'
stacked `layers/...`, models/layer_stack.py) are converted to the model's first. Two shapes
legitimately change from pretraining to fine-tuning and are adapted too:
  - the ViT position table follows the image size (288 -> 384 / 576): the class row is
    kept, the grid resized bicubically (convert/position_embeddings.py);
  - NLVR2's third token type (its second image) starts as a copy of the image row.
"""
import json
import logging
import os

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from mtower_jax.convert.position_embeddings import resize
from mtower_jax.models.config import shapeless_differences
from mtower_jax.models.layer_stack import match_layout
from mtower_jax.train.checkpoints import FINGERPRINT, fingerprints, latest_complete_step

VISION_POSITIONS = "backbone/vision_encoder/position_embedding"
TOKEN_TYPES = "backbone/token_type_embeddings/embedding"


class InitFromError(ValueError):
    """The init_from source cannot initialise this model (all problems listed)."""


def read_params(directory: str) -> dict:
    """The params pytree (numpy) stored under `directory`, either layout above."""
    directory = os.path.abspath(os.path.expanduser(directory))
    params_dir = os.path.join(directory, "params")
    step = None
    if not os.path.isdir(params_dir):
        step = latest_complete_step(directory)
        if step is None:
            raise InitFromError(
                f"config.init_from={directory!r} holds neither params/ (written by "
                "`python -m mtower_jax.convert`) nor checkpoints/<step>/ of a training run")
        params_dir = os.path.join(directory, "checkpoints", str(step), "state")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(params_dir)
    except Exception as e:
        raise InitFromError(f"config.init_from: {params_dir} cannot be read (damaged or "
                            f"incomplete?): {type(e).__name__}: {str(e)[:300]}") from e
    if step is None:
        return tree
    _verify(os.path.join(directory, "checkpoints", str(step)), tree["params"])
    return tree["params"]


def _verify(step_dir: str, params: dict) -> None:
    """InitFromError unless `params` match the fingerprints saved with the checkpoint."""
    try:
        with open(os.path.join(step_dir, "manifest", "metadata")) as f:
            manifest = json.load(f)
    except OSError:
        logging.warning("init_from: %s has no manifest; its params are not verified", step_dir)
        return
    except ValueError as e:
        raise InitFromError(f"config.init_from: {step_dir}/manifest is corrupt: {e}") from e
    if manifest.get("fingerprint") != FINGERPRINT:
        raise InitFromError(f"config.init_from: {step_dir}/manifest has fingerprint "
                            f"{manifest.get('fingerprint')!r}, expected {FINGERPRINT!r}")
    saved = manifest.get("arrays", {})
    wrong = sorted(k for k, v in fingerprints(params).items() if saved.get(f"params/{k}") != v)
    if wrong:
        raise InitFromError(f"config.init_from: {len(wrong)} params of {step_dir} read back "
                            f"different from what was saved (corrupt files): "
                            f"{', '.join(wrong)}")


def adapt_source(source_flat: dict, fresh_flat: dict) -> tuple[dict, list[str]]:
    """The source's position table and token types reshaped to the model's (see the module
    docstring); returns (adapted flat source, what was changed)."""
    out, notes = dict(source_flat), []
    if VISION_POSITIONS in out and VISION_POSITIONS in fresh_flat:
        have, want = np.shape(out[VISION_POSITIONS]), np.shape(fresh_flat[VISION_POSITIONS])
        if have[0] != want[0] and have[1:] == want[1:]:
            grid = int(round((want[0] - 1) ** 0.5))
            out[VISION_POSITIONS] = resize(np.asarray(out[VISION_POSITIONS]), grid)
            notes.append(f"{VISION_POSITIONS} resized {have} -> {want}")
    if TOKEN_TYPES in out and TOKEN_TYPES in fresh_flat:
        table = np.asarray(out[TOKEN_TYPES])
        rows = np.shape(fresh_flat[TOKEN_TYPES])[0]
        if table.shape[0] == 2 and rows == 3 and table.shape[1:] == np.shape(
                fresh_flat[TOKEN_TYPES])[1:]:
            out[TOKEN_TYPES] = np.concatenate([table, table[1:2]])
            notes.append(f"{TOKEN_TYPES}: row 2 (second image) copied from row 1 (image)")
    return out, notes


def merge_params(fresh: dict, source: dict, what: str) -> tuple[dict, dict]:
    """(params, report): `fresh` with every leaf that `source` has replaced by it.

    report = {'loaded': [...], 'fresh': [...], 'ignored': [...], 'adapted': [...]} as
    '/'-joined paths (adapted: notes on re-laid-out encoders and reshaped leaves).
    """
    fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
    source, relaid = match_layout(source, fresh)
    source_flat, adapted = adapt_source(traverse_util.flatten_dict(source, sep="/"), fresh_flat)
    adapted = relaid + adapted
    mismatched = [f"  {k}: {what} has {tuple(np.shape(source_flat[k]))}, the model "
                  f"{tuple(np.shape(v))}" for k, v in sorted(fresh_flat.items())
                  if k in source_flat and tuple(np.shape(source_flat[k])) != tuple(np.shape(v))]
    missing = sorted(k for k in fresh_flat if k not in source_flat)
    unexpected = sorted(k for k in source_flat if k not in fresh_flat)
    if mismatched or len(missing) == len(fresh_flat):
        problem = (f"{len(mismatched)} parameters of {what} do not fit the model" if mismatched
                   else f"{what} shares no parameter with the model")
        raise InitFromError(
            f"{problem} (is the model config the one the checkpoint was made with?):\n"
            + "\n".join(mismatched)
            + f"\n{len(missing)} parameters of the model are not in {what}:"
            + "".join(f"\n  {k}" for k in missing)
            + f"\n{len(unexpected)} parameters of {what} are not in the model:"
            + "".join(f"\n  {k}" for k in unexpected))
    merged = {k: np.asarray(source_flat[k], np.asarray(v).dtype) if k in source_flat else v
              for k, v in fresh_flat.items()}
    report = dict(loaded=sorted(k for k in fresh_flat if k in source_flat),
                  fresh=sorted(k for k in fresh_flat if k not in source_flat),
                  ignored=sorted(k for k in source_flat if k not in fresh_flat),
                  adapted=adapted)
    return traverse_util.unflatten_dict(merged, sep="/"), report


def recorded_model_config(directory: str) -> tuple[str, dict] | None:
    """(file, model config) a source was made with: a conversion's model_config.json, or
    the model of a training run's config.json; None where it records neither."""
    directory = os.path.abspath(os.path.expanduser(directory))
    for name, key in (("model_config.json", None), ("config.json", "model")):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    recorded = json.load(f)
            except ValueError as e:
                raise InitFromError(f"config.init_from: {path} is not valid JSON: {e}") from e
            recorded = recorded.get(key) if key else recorded
            if isinstance(recorded, dict):
                return path, recorded
    return None


def config_mismatches(directory: str, source_keys, model_cfg) -> list[str]:
    """The SHAPELESS_FIELDS (models/config.py) of the parts whose parameters `source_keys`
    ('/'-joined paths) hold, where the config `directory` records differs from `model_cfg`
    (= config.model); one line each, with the override that matches the source."""
    recorded = recorded_model_config(directory)
    if recorded is None:
        return []
    path, source_cfg = recorded
    return [f"  {key}: {theirs!r} in {path}, {ours!r} in this run (--config.{key}={theirs})"
            for key, theirs, ours in shapeless_differences(source_cfg, model_cfg, source_keys)]


def read_sources(init_from: str, model_cfg=None) -> dict:
    """The params of config.init_from: one directory, or several joined by commas, whose
    params are united (InitFromError if two hold the same parameter). With `model_cfg`
    (config.model), a source's recorded config must agree on SHAPELESS_FIELDS."""
    directories = [d.strip() for d in init_from.split(",") if d.strip()]
    sources = [(d, read_params(d)) for d in directories]  # a directory named twice stays twice
    if model_cfg is not None:
        lines = [line for d, params in sources for line in config_mismatches(
            d, traverse_util.flatten_dict(params, sep="/"), model_cfg)]
        if lines:
            raise InitFromError(
                f"config.init_from={init_from!r}: the source was made with a model config that "
                "computes differently with the same parameters:\n" + "\n".join(lines)
                + "\nRun with the source's values (the overrides above), or init from a "
                "source made with this run's.")
    if len(sources) == 1:
        return sources[0][1]
    united, owner = {}, {}
    for directory, params in sources:
        for key, value in traverse_util.flatten_dict(params, sep="/").items():
            if key in owner:
                raise InitFromError(f"config.init_from: {key} is in both {owner[key]} and "
                                    f"{directory}; give each parameter one source")
            united[key], owner[key] = value, directory
    return traverse_util.unflatten_dict(united, sep="/")


def load_init_params(directory: str, fresh_params: dict, model_cfg=None) -> dict:
    """`fresh_params` (host numpy tree) overwritten from `directory` (config.init_from: one
    or several, see read_sources; checked against `model_cfg`, config.model, if given);
    the report is logged."""
    params, report = merge_params(fresh_params, read_sources(directory, model_cfg), directory)
    logging.info("init_from %s: loaded %d parameters", directory, len(report["loaded"]))
    for note in report["adapted"]:
        logging.info("init_from %s: %s", directory, note)
    for kind in ("fresh", "ignored"):
        if report[kind]:
            logging.warning("init_from %s: %s %d parameters: %s", directory,
                            "freshly initialised" if kind == "fresh" else "ignored (not in "
                            "this model)", len(report[kind]), ", ".join(report[kind]))
    return params
