"""Scale-out on CPU host devices: the same losses on every mesh and set of rules, and real
multi-process runs (two `jax.distributed` processes over loopback, 4 devices each) that
match one process with 8 devices, read disjoint examples, and hand checkpoints to runs on
another process count and mesh."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST_COMPILE_XLA_FLAGS
from mtower_jax.train import example_log
from mtower_jax.train.metrics import read_metrics

# One layer per stack, and (cpu_env) XLA:CPU's cheapest codegen: these runs are compile-bound.
SHALLOW = ["--config.model.text.num_layers=1", "--config.model.vision.num_layers=1",
           "--config.model.cross.num_layers=1", "--config.model.manager.num_layers=1"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Synthetic data and a persistent XLA cache shared by every run here: the runs
    compile the same few programs (the cache key ignores which devices and processes)."""
    root = tmp_path_factory.mktemp("scale_out")
    return dict(data_dir=str(root / "data"), base=dict(
        os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0"))


def cpu_env(env, devices: int) -> dict:
    return dict(env["base"], XLA_FLAGS=(
        f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_XLA_FLAGS}"))


def run_config(env, total_steps: int = 5) -> list[str]:
    return ["--config=configs/pretrain.py:model=tiny", f"--config.data.data_dir={env['data_dir']}",
            "--config.batch_size=16", f"--config.total_steps={total_steps}", *SHALLOW]


MESHES = {"data=8": "data", "data=2,fsdp=4": "fsdp", "data=2,fsdp=2,tensor=2": "fsdp_tensor",
          "data=1": "data"}


@pytest.fixture(scope="module")
def mesh_losses(env) -> dict[str, dict]:
    """mesh_check's rows by mesh spec: 5 steps of the run config on each of MESHES."""
    result = subprocess.run(
        [sys.executable, "-m", "mtower_jax.tools.mesh_check", "--steps=5", f"--rtol={RTOL}",
         *[f"--mesh={m}:{rules}" for m, rules in MESHES.items()], *run_config(env)],
        env=cpu_env(env, 8), capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(MESHES) + 1, result.stdout + result.stderr[-3000:]
    return dict(zip(MESHES, rows[:-1])) | {"summary": rows[-1], "returncode": result.returncode}


def test_meshes_and_rules_give_the_same_losses(mesh_losses):
    """Issue 7's meshes: data=8; data=2 x fsdp=4 (ZeRO-3); data=2 x fsdp=2 x tensor=2; one
    device. Five steps each from the same parameters and batches."""
    assert mesh_losses["returncode"] == 0 and mesh_losses["summary"]["ok"] is True
    sizes = [mesh_losses[m]["mesh"] for m in MESHES]
    assert sizes == [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1},
                     {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 1, "tensor": 1}]
    for m in MESHES:
        assert set(mesh_losses[m]["losses"]) == {"loss", "loss_mlm", "loss_itm"}
        assert len(mesh_losses[m]["losses"]["loss"]) == 5
        assert mesh_losses[m]["max_rel_diff"] <= RTOL
    assert len(set(mesh_losses["data=8"]["losses"]["loss"])) == 5  # it trains
    # ZeRO-3 shards all but small vectors; pure data parallelism shards nothing.
    assert mesh_losses["data=2,fsdp=4"]["replicated"] < 0.01
    assert mesh_losses["data=2,fsdp=2,tensor=2"]["replicated"] < 0.01
    assert mesh_losses["data=8"]["replicated"] == 1.0


def test_shard_negatives_follow_the_shards_not_the_mesh(env, mesh_losses):
    """data.itm_negatives='shard': data=8 and data=2 x fsdp=4 split the batch into the same
    8 shards, so they draw the same negatives and losses; batch negatives draw others."""
    result = subprocess.run(
        [sys.executable, "-m", "mtower_jax.tools.mesh_check", "--steps=3", f"--rtol={RTOL}",
         "--mesh=data=8:data", "--mesh=data=2,fsdp=4:fsdp", *run_config(env, 3),
         "--config.data.itm_negatives=shard"],
        env=cpu_env(env, 8), capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and rows[-1]["ok"] is True, result.stderr[-3000:]
    shard = rows[0]["losses"]
    batch = mesh_losses["data=8"]["losses"]
    assert shard["loss_mlm"][0] == pytest.approx(batch["loss_mlm"][0], rel=RTOL)  # same params
    assert not np.allclose(shard["loss_itm"], batch["loss_itm"][:3], rtol=RTOL, atol=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(env, workdir, mesh: dict, rules: str, processes: int) -> list:
    """Starts a 5-step run of the run config on 8 CPU devices in all (checkpoints at step 3,
    example ids logged); returns its processes."""
    command = [sys.executable, "-m", "mtower_jax.main", f"--workdir={workdir}",
               *run_config(env), "--config.data.log_example_ids=True", "--config.log_every=1",
               "--config.eval_every=-1", "--config.checkpoint_every=3",
               f"--config.logical_axis_rules={rules}",
               *[f"--config.mesh.{axis}={size}" for axis, size in mesh.items()]]
    if processes == 1:
        return [subprocess.Popen(command, env=cpu_env(env, 8), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)]
    port = free_port()
    return [subprocess.Popen(command + [f"--coordinator_address=127.0.0.1:{port}",
                                        f"--num_processes={processes}", f"--process_id={i}"],
                             env=cpu_env(env, 8 // processes), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def finish(procs: list) -> None:
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]


def losses(workdir) -> dict[int, float]:
    return {int(r["step"]): r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def assert_close(a: dict, b: dict, steps) -> None:
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=RTOL)


def examples_by_step(workdir) -> dict[int, list[set]]:
    """{step: [the (record, text) pairs each process read]}."""
    out = {}
    for _, rows in sorted(example_log.read(str(workdir)).items()):
        for row in rows:
            out.setdefault(row["step"], []).append(
                set(zip(row["record_index"], row["text_index"])))
    return out


def resume_from(source, workdir, step: int) -> None:
    """A new workdir holding only `source`'s checkpoint of `step`."""
    os.makedirs(os.path.join(workdir, "checkpoints"))
    shutil.copytree(os.path.join(source, "checkpoints", str(step)),
                    os.path.join(workdir, "checkpoints", str(step)))


def test_two_processes_match_one_and_checkpoints_cross_process_counts(env, mesh_losses,
                                                                      tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # 2 processes x 4 devices: data parallel across the processes (dcn_data, the hybrid
    # mesh), ZeRO-3 inside each; and 1 process x 8 devices with the same mesh shape.
    finish(launch(env, two, dict(data=1, fsdp=4, dcn_data=2), "fsdp", processes=2))
    finish(launch(env, one, dict(data=2, fsdp=4), "fsdp", processes=1))
    steps = [1, 2, 3, 4, 5]
    reference = dict(zip(steps, mesh_losses["data=2,fsdp=4"]["losses"]["loss"]))
    assert_close(losses(one), reference, steps)  # mesh_check's numbers are a real run's
    assert_close(losses(two), losses(one), steps)

    read_two, read_one = examples_by_step(two), examples_by_step(one)
    for step in steps:
        first, second = read_two[step]
        assert len(first) == len(second) == 8 and not first & second
        assert first | second == read_one[step][0]  # one process: the whole global batch
    every = [pair for step in steps for pair in read_one[step][0]]
    assert len(every) == len(set(every)) == 80  # no example twice within the epoch

    # The 2-process checkpoint on 1 process and a replicated mesh; the 1-process checkpoint
    # on 2 processes and a 3-axis mesh. Both go on exactly as the uninterrupted runs did.
    to_one, to_two = tmp_path / "to_one", tmp_path / "to_two"
    resume_from(two, to_one, 3)
    resume_from(one, to_two, 3)
    procs = launch(env, to_one, dict(data=8), "data", processes=1)
    procs += launch(env, to_two, dict(data=2, fsdp=2, tensor=2), "fsdp_tensor", processes=2)
    finish(procs)
    for resumed in (to_one, to_two):
        assert sorted(losses(resumed)) == [4, 5]  # resumed at step 3, not from scratch
        assert_close(losses(resumed), reference, steps=[4, 5])
        assert [set().union(*examples_by_step(resumed)[s]) for s in (4, 5)] == [
            read_one[4][0], read_one[5][0]]


def test_process_start_up_choices(monkeypatch):
    from mtower_jax.train import distributed
    with pytest.raises(ValueError, match="also pass --coordinator_address, --process_id"):
        distributed.initialize(num_processes=2)
    with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    for name in ("SLURM_STEP_NODELIST", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() == "single"  # this machine: no TPU, no srun
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed._in_slurm_step()  # one task: a plain single-process job
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed._in_slurm_step()
