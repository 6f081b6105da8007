"""The main job end to end, in subprocesses as users run it: outputs, exact resume after
SIGKILL, SIGTERM save-and-exit, the unfinished-checkpoint fallback, init_from."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtower_jax.train.checkpoints import latest_complete_step
from mtower_jax.train.metrics import read_metrics

# A shallower tiny model (compiles faster); dropout stays on: resume must replay its draws.
MODEL = ["--config.model.text.num_layers=2", "--config.model.vision.num_layers=2",
         "--config.model.manager.num_layers=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Shared synthetic data and a persistent XLA cache: the runs compile the same step."""
    root = tmp_path_factory.mktemp("main")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return dict(env=env, data_dir=str(root / "data"))


def command(env, workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "mtower_jax.main",
            "--config=configs/pretrain.py:model=tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={env['data_dir']}", "--config.batch_size=8",
            "--config.eval_every=-1", *MODEL, *extra]


def run(env, workdir, *extra, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(command(env, workdir, *extra), env=env["env"], capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(env, workdir, *extra) -> subprocess.Popen:
    return subprocess.Popen(command(env, workdir, *extra), env=env["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, workdir, step: int) -> None:
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


def final_params(workdir) -> dict:
    step = latest_complete_step(str(workdir))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import jax
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    assert all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(env, workdir, "--config.total_steps=40", "--config.checkpoint_every=10",
        "--config.log_every=5", "--config.eval_every=20", "--config.eval_steps=2")
    return workdir


def test_a_run_writes_config_metrics_tensorboard_and_checkpoints(uninterrupted):
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["total_steps"] == 40 and config["model"]["text"]["num_layers"] == 2
    records = read_metrics(str(uninterrupted))
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    for key in ("loss_mlm", "loss_itm", "acc_mlm", "acc_itm", "lr", "grad_norm",
                "examples_per_s", "tflops", "mfu"):
        assert all(np.isfinite(r[key]) for r in train), key
    evals = [r for r in records if "val/acc_itm" in r]
    assert [r["step"] for r in evals] == [20, 40]
    final = json.loads((uninterrupted / "eval_val.json").read_text())  # the whole split
    assert final["step"] == 40 and final["examples"] > evals[0]["val/examples"]
    assert final["acc_itm"] == evals[-1]["val/acc_itm"]
    assert os.listdir(uninterrupted / "tensorboard")
    steps = sorted(int(n) for n in os.listdir(uninterrupted / "checkpoints") if n.isdigit())
    assert steps == [20, 30, 40]  # keep_checkpoints=3


def test_resume_after_sigkill_is_bitwise_identical(env, uninterrupted, tmp_path):
    proc = start(env, tmp_path, "--config.total_steps=40", "--config.checkpoint_every=10",
                 "--config.log_every=5")
    wait_for_checkpoint(proc, tmp_path, 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_complete_step(str(tmp_path)) < 40, "the run finished before the kill"
    run(env, tmp_path, "--config.total_steps=40", "--config.checkpoint_every=10",
        "--config.log_every=5")
    assert_bitwise_equal(final_params(tmp_path), final_params(uninterrupted))


def test_sigterm_saves_and_exits_zero_then_resumes(env, tmp_path):
    # total_steps=40 like the other runs, so the persistent XLA cache serves the same step.
    proc = start(env, tmp_path, "--config.total_steps=40", "--config.checkpoint_every=1000",
                 "--config.log_every=1")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    stopped_at = latest_complete_step(str(tmp_path))
    assert 1 <= stopped_at < 40, "no checkpoint, or the run finished before SIGTERM"
    result = run(env, tmp_path, "--config.total_steps=40", "--config.checkpoint_every=1000",
                 "--config.log_every=10")
    assert f"resuming from {tmp_path}/checkpoints/{stopped_at}" in result.stderr
    assert latest_complete_step(str(tmp_path)) == 40


def test_unfinished_checkpoint_is_ignored_with_a_warning(env, uninterrupted, tmp_path):
    import shutil
    shutil.copytree(uninterrupted / "checkpoints" / "20", tmp_path / "checkpoints" / "20")
    partial = tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
    shutil.copytree(uninterrupted / "checkpoints" / "30", partial)
    shutil.rmtree(partial / "state")  # the write died half-way
    result = run(env, tmp_path, "--config.total_steps=40", "--config.log_every=10",
                 "--config.checkpoint_every=10")
    assert "ignoring unfinished checkpoint" in result.stderr
    assert f"resuming from {tmp_path}/checkpoints/20" in result.stderr
    assert latest_complete_step(str(tmp_path)) == 40


def test_init_from_loads_params_and_lists_fresh_heads(uninterrupted, caplog):
    """A run directory as init_from: its params replace the fresh ones; a head it lacks
    (ITC) keeps its initialisation and is listed; a head we lack would be ignored."""
    from flax import traverse_util

    from conftest import random_variables, tiny_config
    from mtower_jax.train.init_from import InitFromError, load_init_params

    cfg = tiny_config("manager", heads=("mlm", "itm", "itc"), **{
        "text.num_layers": 2, "vision.num_layers": 2, "manager.num_layers": 2})
    fresh = random_variables(cfg, seed=5)["params"]
    with caplog.at_level("INFO"):
        params = load_init_params(str(uninterrupted), fresh)
    assert "itc_head/text_proj/kernel" in caplog.text and "freshly initialised" in caplog.text
    flat, source = (traverse_util.flatten_dict(p, sep="/") for p in (
        params, final_params(uninterrupted)))
    assert np.array_equal(flat["mlm_head/decoder/kernel"], source["mlm_head/decoder/kernel"])
    assert np.array_equal(flat["itc_head/text_proj/kernel"],
                          traverse_util.flatten_dict(fresh, sep="/")["itc_head/text_proj/kernel"])
    wider = tiny_config("manager", **{"text.num_layers": 2, "vision.num_layers": 2,
                                      "manager.num_layers": 2, "text.mlp_dim": 128})
    with pytest.raises(InitFromError, match="intermediate/kernel"):
        load_init_params(str(uninterrupted), random_variables(wider)["params"])
