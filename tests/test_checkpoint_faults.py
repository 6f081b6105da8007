"""Checkpoint faults, in-process with the real Orbax and grain (docs/RELIABILITY.md): a full
disk and a read-only directory during a save, damaged checkpoints (fall back to the previous
one, loudly), a checkpoint of another config (an error naming every difference), init_from
sources that do not fit or are corrupt. The SIGKILL / SIGTERM runs are in test_main.py."""
import contextlib
import glob
import os
import resource
import shutil
import signal
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtower_jax.train.checkpoints import (CheckpointDamagedError, CheckpointError,
                                          CheckpointMismatchError, Checkpoints,
                                          CheckpointWriteError)
from mtower_jax.train.init_from import InitFromError, load_init_params, merge_params, read_params

N = 300_000  # floats in the big array: 1.2 MB of random bytes, more than the limits below


def train_state(seed: int, n: int = N) -> dict:
    """A train-state-shaped tree: random, so that any mix-up shows."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal(n), jnp.float32),
              "layer": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                        "scale": jnp.asarray(rng.standard_normal(3), jnp.bfloat16)}}
    return {"step": jnp.int32(seed), "params": params,
            "opt_state": {"mu": jax.tree.map(lambda x: x * 0.5, params)},
            "rng": jax.random.PRNGKey(seed)}


def abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def assert_same(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def files_of(directory) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def write_run(workdir, steps=(1, 2, 3), data: bool = False) -> list[dict]:
    """Checkpoints `steps` of train_state(step) in workdir (with an iterator position)."""
    checkpoints = Checkpoints(str(workdir), keep=5, config={"model": {"width": 3}})
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset()) if data else None
    states = []
    for step in steps:
        if iterator is not None:
            next(iterator)
        states.append(train_state(step))
        checkpoints.save(step, states[-1], iterator, force=True)
    checkpoints.close()
    return states


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG, as on a full disk (SIGXFSZ, whose default
    kills the process, ignored)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _chmod_tree(path, dirs: int, files: int) -> None:
    for root, names, leaves in os.walk(path):
        os.chmod(root, dirs)
        for leaf in leaves:
            os.chmod(os.path.join(root, leaf), files)


@contextlib.contextmanager
def read_only(path):
    """`path` and everything under it unwritable. Root ignores permissions, so as root the
    process also runs as `nobody` meanwhile (effective ids; the kernel then enforces them)."""
    _chmod_tree(path, 0o555, 0o444)
    as_root = os.geteuid() == 0
    if as_root:
        os.setegid(65534)
        os.seteuid(65534)
    try:
        yield
    finally:
        if as_root:
            os.seteuid(0)
            os.setegid(0)
        _chmod_tree(path, 0o755, 0o644)


def wait_for_failure(checkpoints: Checkpoints) -> CheckpointWriteError:
    """Polls at 'step boundaries' until the background write's failure surfaces."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            checkpoints.poll()
        except CheckpointWriteError as e:
            return e
        time.sleep(0.01)
    raise AssertionError("the failed write never surfaced")


def test_a_full_disk_fails_the_save_clearly_and_leaves_the_previous_checkpoint(tmp_path,
                                                                               caplog):
    # keep=1: a completed save of step 2 would delete step 1.
    checkpoints = Checkpoints(str(tmp_path), keep=1)
    first = train_state(1)
    checkpoints.save(1, first, None, force=True)
    checkpoints.wait()
    before = files_of(checkpoints.step_dir(1))
    with file_size_limit(512 * 1024):
        checkpoints.save(2, train_state(2), None, force=True)  # the write runs in background
        error = wait_for_failure(checkpoints)
    message = str(error)
    assert f"could not write checkpoint 2 to {checkpoints.directory}" in message
    assert "File too large (errno 27)" in message
    assert f"{checkpoints.step_dir(1)}, is untouched" in message
    assert "Free disk space or make" in message and "resume from step 1" in message
    checkpoints.close()  # after the failure: releases the manager, raises nothing new
    assert files_of(checkpoints.step_dir(1)) == before
    with caplog.at_level("WARNING"):
        again = Checkpoints(str(tmp_path), keep=1)
    assert "ignoring unfinished checkpoint" in caplog.text and "2.orbax-checkpoint-tmp" in \
        caplog.text
    step, state, _ = again.restore_newest(abstract(first))
    again.close()
    assert step == 1
    assert_same(state, first)


def test_a_read_only_workdir_fails_the_save_clearly_and_leaves_the_previous_checkpoint():
    # Outside pytest's 0700 temp dirs, so that `nobody` can reach it when we are root.
    workdir = tempfile.mkdtemp(prefix="mtower-ro-")
    os.chmod(workdir, 0o755)
    try:
        checkpoints = Checkpoints(workdir, keep=1)
        first = train_state(1)
        checkpoints.save(1, first, None, force=True)
        checkpoints.wait()
        before = files_of(checkpoints.step_dir(1))
        second = train_state(2)
        with read_only(workdir):
            with pytest.raises(PermissionError):  # the mechanism works (also as root)
                open(os.path.join(checkpoints.directory, "probe"), "w")
            with pytest.raises(CheckpointWriteError) as info:  # before any write starts
                checkpoints.save(2, second, None, force=True)
        message = str(info.value)
        assert f"could not write checkpoint 2 to {checkpoints.directory}" in message
        assert "Permission denied (errno 13)" in message
        assert f"{checkpoints.step_dir(1)}, is untouched" in message
        checkpoints.close()
        assert files_of(checkpoints.step_dir(1)) == before
        again = Checkpoints(workdir, keep=1)
        step, state, _ = again.restore_newest(abstract(first))
        again.close()
        assert step == 1
        assert_same(state, first)
    finally:
        shutil.rmtree(workdir)


def _biggest_array_file(step_dir) -> str:
    return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
               key=os.path.getsize)


def _truncate(path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_a_bit(path) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


DAMAGE = {
    "truncated array file": lambda d: _truncate(_biggest_array_file(d)),
    "flipped bit in an array file": lambda d: _flip_a_bit(_biggest_array_file(d)),
    "deleted array index": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "empty tree metadata": lambda d: open(os.path.join(d, "state", "_METADATA"), "w").close(),
    "truncated iterator state": lambda d: _truncate(
        os.path.join(d, "data", "process_0-of-1.json")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_loudly(damage, tmp_path,
                                                                           caplog):
    states = write_run(tmp_path, data=True)
    DAMAGE[damage](tmp_path / "checkpoints" / "3")
    checkpoints = Checkpoints(str(tmp_path), keep=5)

    def make_iterator(step):
        return iter(grain.MapDataset.range(100).to_iter_dataset()), True

    with caplog.at_level("WARNING"):
        step, state, iterator = checkpoints.restore_newest(abstract(states[0]), make_iterator)
    assert step == 2
    assert_same(state, states[1])
    assert next(iterator) == 2  # where the data was at step 2, not at step 3
    assert "CHECKPOINT 3 IS DAMAGED" in caplog.text and "RESUMING FROM AN OLDER" in caplog.text
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert os.listdir(tmp_path / "damaged_checkpoints") == ["3"]  # kept for inspection
    checkpoints.save(3, states[2], None, force=True)  # the step number is free again
    checkpoints.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]


@pytest.mark.parametrize("deleted", ["_CHECKPOINT_METADATA", "commit_success.txt",
                                     "state/_METADATA", "state/_sharding",
                                     "state/array_metadatas"])
def test_metadata_the_arrays_do_not_need_may_go_missing(deleted, tmp_path):
    """Deleted, these files change nothing: the arrays still read back to their saved
    fingerprints, so the newest checkpoint is used."""
    states = write_run(tmp_path)
    path = tmp_path / "checkpoints" / "3" / deleted
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    checkpoints = Checkpoints(str(tmp_path), keep=5)
    step, state, _ = checkpoints.restore_newest(abstract(states[0]))
    checkpoints.close()
    assert step == 3
    assert_same(state, states[2])


def test_when_no_checkpoint_reads_back_it_is_an_error_and_nothing_moves(tmp_path):
    states = write_run(tmp_path, steps=(1, 2))
    _flip_a_bit(_biggest_array_file(tmp_path / "checkpoints" / "2"))
    _truncate(_biggest_array_file(tmp_path / "checkpoints" / "1"))
    checkpoints = Checkpoints(str(tmp_path), keep=5)
    with pytest.raises(CheckpointError, match="no checkpoint in .* reads back intact") as info:
        checkpoints.restore_newest(abstract(states[0]))
    checkpoints.close()
    assert "step 2: " in str(info.value) and "corrupt files): " in str(info.value)
    assert "step 1: " in str(info.value) and "cannot be read" in str(info.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # a rerun fails alike
    assert not (tmp_path / "damaged_checkpoints").exists()


def test_restore_of_one_damaged_step_names_the_corrupt_arrays(tmp_path):
    states = write_run(tmp_path, steps=(1,))
    _flip_a_bit(_biggest_array_file(tmp_path / "checkpoints" / "1"))
    checkpoints = Checkpoints(str(tmp_path), keep=5)
    with pytest.raises(CheckpointDamagedError, match="1 arrays read back different"):
        checkpoints.restore(1, abstract(states[0]), None)
    checkpoints.close()


def test_a_checkpoint_of_another_config_is_an_error_naming_every_difference(tmp_path):
    states = write_run(tmp_path, steps=(1, 2))
    other = train_state(0)
    other["params"]["layer"]["bias"] = jnp.zeros(3)  # missing from the checkpoint
    del other["opt_state"]["mu"]["layer"]  # unexpected in the checkpoint
    other["params"]["w"] = jnp.zeros(N + 1)  # another shape
    other["params"]["layer"]["scale"] = jnp.zeros(3, jnp.float32)  # another dtype
    checkpoints = Checkpoints(str(tmp_path), keep=5, config={"model": {"width": 4}})
    read = []  # no read of the wrong tree is started (its aborted reads flood the log)
    checkpoints.manager.restore = lambda *args, **kw: read.append(args)
    with pytest.raises(CheckpointMismatchError) as info:
        checkpoints.restore_newest(abstract(other))
    checkpoints.close()
    assert read == []
    message = str(info.value)
    assert "1 missing, 2 unexpected, 2 with another shape or dtype" in message
    assert "missing (this run has it, the checkpoint not): params/layer/bias (3,) float32" \
        in message
    for key in ("opt_state/mu/layer/kernel (4, 3)", "opt_state/mu/layer/scale (3,) bfloat16"):
        assert f"unexpected (the checkpoint has it, this run not): {key}" in message
    assert f"differs: params/w: checkpoint ({N},) float32, this run ({N + 1},) float32" \
        in message
    assert "differs: params/layer/scale: checkpoint (3,) bfloat16, this run (3,) float32" \
        in message
    assert "model.width: 3 -> 4" in message
    assert "use another --workdir" in message and "pass the config it was written with" \
        in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # not taken for damage
    del states


def test_a_checkpoint_of_another_dtype_is_an_error_not_a_cast(tmp_path):
    """Orbax would cast float32 into a bfloat16 target without a word; the fingerprints
    catch it, and the metadata then names it."""
    states = write_run(tmp_path, steps=(1,))
    target = abstract(states[0])
    target["params"]["w"] = jax.ShapeDtypeStruct((N,), jnp.bfloat16,
                                                 sharding=target["params"]["w"].sharding)
    checkpoints = Checkpoints(str(tmp_path), keep=5)
    with pytest.raises(CheckpointMismatchError) as info:
        checkpoints.restore_newest(target)
    checkpoints.close()
    assert "0 missing, 0 unexpected, 1 with another shape or dtype." in str(info.value)
    assert f"differs: params/w: checkpoint ({N},) float32, this run ({N},) bfloat16" in \
        str(info.value)


def test_a_checkpoint_of_a_deeper_tiny_model_names_its_extra_layers(tmp_path):
    """The real train state: a 2-layer text encoder's checkpoint, restored by a 1-layer run."""
    import flax.linen as nn

    from configs.pretrain import get_config
    from mtower_jax.models.partitioning import resolve_rules
    from mtower_jax.train import mesh as mesh_lib
    from mtower_jax.train.state import create_train_state

    def abstract_state(text_layers: int):
        config = get_config("model=tiny")
        config.model.text.num_layers = text_layers
        config.model.manager.num_layers = 1
        mesh, rules = mesh_lib.make_mesh(config.mesh), resolve_rules(config.logical_axis_rules)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return config, create_train_state(config, mesh, rules)[2]

    config2, deeper = abstract_state(2)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), deeper)
    checkpoints = Checkpoints(str(tmp_path), keep=1, config=config2.to_dict())
    checkpoints.save(7, zeros, None, force=True)
    checkpoints.close()
    config1, shallower = abstract_state(1)
    checkpoints = Checkpoints(str(tmp_path), keep=1, config=config1.to_dict())
    with pytest.raises(CheckpointMismatchError) as info:
        checkpoints.restore_newest(shallower)
    checkpoints.close()
    message = str(info.value)
    layer = [line for line in message.splitlines() if "unexpected" in line and "layer_1" in line]
    assert layer and all("text_encoder" in line for line in layer), message
    assert "0 missing" in message and "model.text.num_layers: 2 -> 1" in message


def test_a_resume_under_another_layer_norm_eps_is_refused_and_dropout_may_change(tmp_path):
    """The arrays fit either way; an eps changes what they compute, a dropout rate does not."""
    from mtower_jax.models import model_config

    state = train_state(3, n=10)
    written = {"model": model_config("tiny").to_dict()}
    checkpoints = Checkpoints(str(tmp_path), keep=1, config=written)
    checkpoints.save(3, state, None, force=True)
    checkpoints.close()

    def restore(**changes):
        config = {"model": model_config("tiny").to_dict()}
        for key, value in changes.items():
            part, field = key.split("__")
            config["model"][part][field] = value
        checkpoints = Checkpoints(str(tmp_path), keep=1, config=config)
        try:
            return checkpoints.restore_newest(abstract(state))
        finally:
            checkpoints.close()

    with pytest.raises(CheckpointMismatchError) as info:
        restore(cross__layer_norm_eps=1e-5, vision__activation="gelu")
    message = str(info.value)
    assert "model.cross.layer_norm_eps: 1e-12 -> 1e-05" in message
    assert "model.vision.activation: 'quick_gelu' -> 'gelu'" in message
    assert ("--config.model.vision.activation=quick_gelu "
            "--config.model.cross.layer_norm_eps=1e-12") in message
    assert os.listdir(tmp_path / "checkpoints") == ["3"]  # nothing moved
    step, restored, _ = restore(text__dropout=0.0)
    assert step == 3
    assert_same(restored, state)


def test_init_from_lists_every_mismatched_missing_and_unexpected_parameter(caplog):
    fresh = {"enc": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}, "head": np.zeros(4),
             "new_head": np.zeros(5)}
    source = {"enc": {"kernel": np.ones((2, 4)), "bias": np.ones(3)}, "head": np.ones(5),
              "old_head": np.ones(1)}
    with pytest.raises(InitFromError) as info:
        merge_params(fresh, source, "SRC")
    message = str(info.value)
    assert "2 parameters of SRC do not fit the model" in message
    assert "enc/kernel: SRC has (2, 4), the model (2, 3)" in message
    assert "head: SRC has (5,), the model (4,)" in message
    assert "1 parameters of the model are not in SRC:\n  new_head" in message
    assert "1 parameters of SRC are not in the model:\n  old_head" in message
    with pytest.raises(InitFromError, match="SRC shares no parameter with the model"):
        merge_params(fresh, {"other": np.ones(1)}, "SRC")
    fitting = {"enc": {"kernel": np.ones((2, 3))}, "extra": {"a": np.ones(1), "b": np.ones(2)}}
    params, report = merge_params(fresh, fitting, "SRC")
    assert report["fresh"] == ["enc/bias", "head", "new_head"]
    assert report["ignored"] == ["extra/a", "extra/b"]
    assert np.array_equal(params["enc"]["kernel"], np.ones((2, 3)))


def test_init_from_a_corrupt_or_truncated_training_checkpoint_is_an_error(tmp_path):
    state = train_state(1)
    state["opt_state"] = {}  # params/w is then the biggest array, in the biggest file
    checkpoints = Checkpoints(str(tmp_path), keep=1)
    checkpoints.save(1, state, None, force=True)
    checkpoints.close()
    fresh = jax.tree.map(np.zeros_like, jax.device_get(state["params"]))
    assert_same(load_init_params(str(tmp_path), fresh), state["params"])  # intact
    array_file = _biggest_array_file(tmp_path / "checkpoints" / "1")
    intact = open(array_file, "rb").read()
    _flip_a_bit(array_file)
    with pytest.raises(InitFromError, match="1 params of .* read back different from what "
                                            "was saved \\(corrupt files\\): w"):
        read_params(str(tmp_path))
    with open(array_file, "wb") as f:
        f.write(intact[: len(intact) // 2])
    with pytest.raises(InitFromError, match="checkpoints/1/state cannot be read"):
        read_params(str(tmp_path))


def test_init_from_refuses_a_source_made_with_other_layer_norm_eps_or_activation(tmp_path):
    """Same shapes, other numerics: HF BridgeTower's cross-modal eps (1e-5) under our
    preset's 1e-12 would load silently. Only the parts the source gives are compared."""
    import json

    from mtower_jax.convert.__main__ import save
    from mtower_jax.models import model_config

    params = {"backbone": {"text_cross_layers_0": {"mlp_norm": {"scale": np.ones(4)}},
                           "text_encoder": {"embeddings_norm": {"scale": np.ones(4)}}}}
    fresh = jax.tree.map(np.zeros_like, params)
    run_cfg = model_config("tiny")
    made_with = model_config("tiny")
    made_with.cross.layer_norm_eps = 1e-5
    made_with.vision.activation = "gelu"  # no vision parameters in the source: not compared
    save(str(tmp_path / "converted"), made_with, {"params": params})
    with pytest.raises(InitFromError) as info:
        load_init_params(str(tmp_path / "converted"), fresh, run_cfg)
    message = str(info.value)
    assert (f"model.cross.layer_norm_eps: 1e-05 in {tmp_path}/converted/model_config.json, "
            "1e-12 in this run (--config.model.cross.layer_norm_eps=1e-05)") in message
    assert "vision" not in message and message.count("\n  model.") == 1
    run_cfg.cross.layer_norm_eps = 1e-5  # the override it names
    assert_same(load_init_params(str(tmp_path / "converted"), fresh, run_cfg), params)

    # A training run records its model in config.json.
    state = {"step": jnp.int32(1), "params": params, "opt_state": {}, "rng": jax.random.key_data(
        jax.random.PRNGKey(0))}
    checkpoints = Checkpoints(str(tmp_path / "run"), keep=1)
    checkpoints.save(1, state, None, force=True)
    checkpoints.close()
    made_with.text.pad_token_id = 0
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": made_with.to_dict()}))
    with pytest.raises(InitFromError, match=r"model.text.pad_token_id: 0 in .*run/config.json, 1 "
                                            r"in this run \(--config.model.text.pad_token_id=0\)"):
        load_init_params(str(tmp_path / "run"), fresh, run_cfg)


def test_host_and_device_fingerprints_agree_and_see_a_one_bit_change():
    """The CPU reads arrays with NumPy, accelerators with a jitted reduction: one value."""
    from mtower_jax.train.checkpoints import fingerprints

    rng = np.random.default_rng(0)
    tree = {"f32": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
            "bf16": jnp.asarray(rng.standard_normal(7), jnp.bfloat16),
            "i32": jnp.arange(-4, 4, dtype=jnp.int32), "u8": jnp.arange(9, dtype=jnp.uint8),
            "bool": jnp.asarray([True, False, True]), "scalar": jnp.float32(2.5),
            "key": jax.random.key(3), "raw_key": jax.random.PRNGKey(4)}
    host, device = fingerprints(tree, on_device=False), fingerprints(tree, on_device=True)
    assert host == device and len(set(host.values())) == len(host)
    flipped = dict(tree, f32=tree["f32"].at[1, 2].set(np.nextafter(tree["f32"][1, 2], 9)))
    assert fingerprints(flipped)["f32"] != host["f32"]
    swapped = dict(tree, i32=tree["i32"][::-1])  # same values, other places
    assert fingerprints(swapped)["i32"] != host["i32"]
