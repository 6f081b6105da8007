"""The main job end to end, in subprocesses as users run it: outputs; six SIGKILLs (one
in each phase, one at a seeded random moment), a SIGTERM and a full disk, each followed by
a resume, ending bitwise where an uninterrupted run ends; the SIGTERM watchdog; init_from.
(`python -m mtower_jax.tools.kill_resume` runs the full experiment, 10 kills by default.)"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mtower_jax.tools import kill_resume
from mtower_jax.train.metrics import read_metrics

# A shallower tiny model (compiles and loads faster: every run here starts a process);
# dropout stays on: resume must replay its draws.
MODEL = ["--config.model.text.num_layers=1", "--config.model.vision.num_layers=1",
         "--config.model.manager.num_layers=1"]
LAYERS = {"text.num_layers": 1, "vision.num_layers": 1, "manager.num_layers": 1}
KILLS = len(kill_resume.PHASES) + 1


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Shared synthetic data and a persistent XLA cache: the runs compile the same step."""
    root = tmp_path_factory.mktemp("main")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return dict(env=env, data_dir=str(root / "data"))


def main_args(env, *extra) -> list[str]:
    """`python -m mtower_jax.main` arguments (without --workdir) of every run here: the
    same total_steps and batch, so all of them compile the same train step."""
    return ["--config=configs/pretrain.py:model=tiny", f"--config.data.data_dir={env['data_dir']}",
            "--config.batch_size=8", "--config.total_steps=40", "--config.eval_every=-1",
            *MODEL, *extra]


def run(env, workdir, *extra) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "mtower_jax.main", *main_args(env, *extra),
                             f"--workdir={workdir}"], env=env["env"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(env, workdir, "--config.checkpoint_every=10", "--config.log_every=5",
        "--config.eval_every=20", "--config.eval_steps=2")
    return workdir


def test_a_run_writes_config_metrics_tensorboard_and_checkpoints(uninterrupted):
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["total_steps"] == 40 and config["model"]["text"]["num_layers"] == 1
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
    manifest = json.loads((uninterrupted / "checkpoints/40/manifest/metadata").read_text())
    assert manifest["config"]["total_steps"] == 40 and len(manifest["arrays"]) > 100


def test_kills_a_sigterm_and_a_full_disk_each_resume_to_the_same_params(env, uninterrupted,
                                                                         tmp_path):
    """6 SIGKILLs (one per phase of kill_resume.PHASES, one drawn at random; each process
    costs ~20 s here), a SIGTERM and a run on a full disk, in a seeded order, each followed
    by the next run's resume; every resume must load the newest complete checkpoint, and
    the end must be bitwise the uninterrupted run's."""
    events = kill_resume.schedule(seed=0, kills=KILLS)
    assert set(kill_resume.PHASES) <= {e.phase for e in events if e.kind == "sigkill"}
    experiment = kill_resume.KillResume(
        main_args(env, "--config.checkpoint_every=4", "--config.log_every=1"), str(tmp_path),
        seed=0, checkpoint_every=4, total_steps=40, grace_s=25.0, env=env["env"],
        run_timeout_s=300, say=lambda line: None)
    events = experiment.run(events)
    report = "\n".join(json.dumps(kill_resume.summary_row(e)) for e in events)
    assert not [e for e in events if e.problems], report
    assert [e.kind for e in events].count("sigkill") == KILLS and events[-1].kind == "finish"
    # At least one kill cut a checkpoint write short, and the next run, where it got as far
    # as resuming (a start-up kill may come first), skipped the partial write.
    cut = [i for i, e in enumerate(events) if e.kind == "sigkill" and e.interrupted_write]
    resumed_after_cut = [events[i + 1] for i in cut if events[i + 1].resumed_from is not None]
    assert resumed_after_cut, report
    assert all(e.partial_before and e.resumed_from == e.complete_before[-1]
               for e in resumed_after_cut), report
    sigterm = next(e for e in events if e.kind == "sigterm")
    assert sigterm.returncode == 0 and sigterm.exit_seconds < 25.0, report
    disk = next(e for e in events if e.kind == "disk_full")
    assert disk.returncode == 1, report
    assert kill_resume.params_differ(kill_resume.final_params(str(tmp_path)),
                                     kill_resume.final_params(str(uninterrupted))) == []


PREEMPTED_PROCESS = """
import sys, time
from absl import logging
from mtower_jax.train.preemption import Preemption
logging.set_verbosity(logging.INFO)
p = Preemption(grace_s=float(sys.argv[1]))
p.step, p.saved_step = 7, int(sys.argv[2])
print("ready", flush=True)
time.sleep(60)  # a step that never ends: only the watchdog can end the process
"""


@pytest.mark.parametrize("saved_step, code", [(7, 0), (4, 1)])
def test_sigterm_watchdog_ends_a_stuck_run_within_the_grace_period(saved_step, code):
    """Exit 0 if the newest checkpoint holds the current step, else 1 naming the lost
    steps, in both cases at the grace period, not at the end of the stuck step."""
    proc = subprocess.Popen([sys.executable, "-c", PREEMPTED_PROCESS, "1.0", str(saved_step)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    start = time.monotonic()
    proc.terminate()  # SIGTERM
    _, stderr = proc.communicate(timeout=30)
    seconds = time.monotonic() - start
    assert proc.returncode == code, stderr
    assert 0.9 < seconds < 10, seconds
    assert "grace period of 1 s over" in stderr
    if code:
        assert "steps 5..7 are lost, the next run resumes from step 4" in stderr


def test_init_from_loads_params_and_lists_fresh_heads(uninterrupted, caplog):
    """A run directory as init_from: its params replace the fresh ones; a head it lacks
    (ITC) keeps its initialisation and is listed; a head we lack would be ignored."""
    from flax import traverse_util

    from conftest import random_variables, tiny_config
    from mtower_jax.train.init_from import InitFromError, load_init_params

    cfg = tiny_config("manager", heads=("mlm", "itm", "itc"), **LAYERS)
    fresh = random_variables(cfg, seed=5)["params"]
    with caplog.at_level("INFO"):
        params = load_init_params(str(uninterrupted), fresh)
    assert "itc_head/text_proj/kernel" in caplog.text and "freshly initialised" in caplog.text
    flat, source = (traverse_util.flatten_dict(p, sep="/") for p in (
        params, kill_resume.final_params(str(uninterrupted))))
    assert np.array_equal(flat["mlm_head/decoder/kernel"], source["mlm_head/decoder/kernel"])
    assert np.array_equal(flat["itc_head/text_proj/kernel"],
                          traverse_util.flatten_dict(fresh, sep="/")["itc_head/text_proj/kernel"])
    wider = tiny_config("manager", **LAYERS, **{"text.mlp_dim": 128})
    with pytest.raises(InitFromError, match="intermediate/kernel"):
        load_init_params(str(uninterrupted), random_variables(wider)["params"])


def test_a_rejected_or_finished_resume_changes_nothing_in_the_run(env, uninterrupted, tmp_path,
                                                                  caplog):
    """Another config's run into an existing workdir stops with the mismatch report, and
    the run's config.json and checkpoints stay as they were; so do they when the run is
    started again past its end. In-process: the restore is all there is to run."""
    import shutil

    from configs.pretrain import get_config
    from mtower_jax.train import loop
    from mtower_jax.train.checkpoints import CheckpointMismatchError

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    config = get_config("model=tiny")
    config.data.data_dir, config.batch_size, config.eval_every = env["data_dir"], 8, -1
    for key, value in LAYERS.items():
        part, leaf = key.split(".")
        config.model[part][leaf] = value
    wider = config.copy_and_resolve_references()
    wider.model.text.mlp_dim = 128
    with pytest.raises(CheckpointMismatchError, match=r"(?s)does not fit this run's train "
                                                      r"state.*model.text.mlp_dim: 256 -> 128"):
        loop.train(wider, str(workdir))
    # Started again past its end (a scheduler's relaunch, a smaller total_steps).
    config.total_steps = 30
    with caplog.at_level("WARNING"):
        assert loop.train(config, str(workdir)) == {}
    assert "the newest checkpoint is at step 40, config.total_steps=30: nothing to train" \
        in caplog.text
    after = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    assert after == before
