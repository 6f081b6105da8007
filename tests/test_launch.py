"""launch/: the launchers' commands, checked through DRY_RUN=1 / --dry_run and through stub
`gcloud`, `srun`, `sbatch`, `scontrol` and venv `python` scripts on PATH. Nothing here reaches a
network, a cluster or the training code."""
from __future__ import annotations

import importlib.util
import itertools
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["launch/local.sh", "launch/gpu_node.sh", "launch/tpu_pod.sh", "launch/install.sh",
           "launch/slurm.sbatch"]
GRID = ["--grid", "model.manager.type=AAUE,SAUE",
        "--grid", "model.manager.weight_type=vector,scalar",
        "--grid", "model.manager.num_layers=3,6"]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("launch_sweep", REPO / "launch" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up by name
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


@pytest.fixture
def calls(tmp_path) -> Path:
    """The log that every stub appends its command line to."""
    return tmp_path / "calls.log"


@pytest.fixture
def stubs(tmp_path, calls) -> Path:
    """A PATH directory whose external commands only log themselves; scontrol lists 2 nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "sbatch", "make", "pip"):
        stub(bin_dir, name)
    stub(bin_dir, "scontrol", "printf 'gpu-a\\ngpu-b\\n'")
    return bin_dir


def stub(bin_dir: Path, name: str, body: str = "") -> None:
    path = bin_dir / name
    path.write_text(f'#!/usr/bin/env bash\n{{ printf %q {name}; printf " %q" "$@"; echo; }}'
                    f' >>"$CALLS"\n{body}\n')
    path.chmod(0o755)


def logged(calls: Path) -> list[list[str]]:
    return [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []


@pytest.fixture
def venv(tmp_path) -> Path:
    """A venv that launch/install.sh considers up to date for GPUs, whose python logs its
    arguments (with XLA_FLAGS, CUDA_VISIBLE_DEVICES and SLURM_PROCID) instead of training."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text('#!/usr/bin/env bash\n{ printf "%q " python "XLA_FLAGS=${XLA_FLAGS-}" '
                      '"CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}" '
                      '"SLURM_PROCID=${SLURM_PROCID-}" "$@"; echo; } >>"$CALLS"\n')
    python.chmod(0o755)
    stamp = subprocess.run(["cksum", "requirements.txt", "requirements-gpu.txt"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout
    (venv / ".launch-installed").write_text(stamp)
    return venv


def launch(script: str, stubs: Path, calls: Path, *args: str, dry: bool = True, **env: str):
    """Runs a launcher in a clean environment; returns (process, its "+ " trace as argv lists)."""
    environ = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"),
               "CALLS": str(calls), **env}
    if dry:
        environ["DRY_RUN"] = "1"
    proc = subprocess.run(["bash", script, *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=60)
    trace = [shlex.split(line[2:]) for line in proc.stderr.splitlines() if line.startswith("+ ")]
    return proc, trace


def option(argv: list[str], name: str) -> str:
    """The value of --name=value in argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_scripts_parse_and_are_executable():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
        assert os.access(REPO / script, os.X_OK), script
    subprocess.run(["bash", "-n", "launch/lib.sh"], cwd=REPO, check=True)


# -- tpu_pod.sh ------------------------------------------------------------------------------

TPU = dict(TPU_NAME="mt", ZONE="us-east5-a", PROJECT="proj", WORKDIR="gs://bucket/run",
           CONFIG="configs/pretrain.py:model=base")
WHERE = ["--zone=us-east5-a", "--project=proj"]


def test_tpu_pod_dry_run(stubs, calls):
    proc, trace = launch("launch/tpu_pod.sh", stubs, calls, "--config.total_steps=10", **TPU)
    assert proc.returncode == 0, proc.stderr
    describe, create, tar, scp, install, start = trace
    group = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert describe == [*group, "describe", "mt", *WHERE, "--format=value(state)"]
    assert create == [*group, "create", "mt", *WHERE, "--accelerator-type=v5p-64",
                      "--version=v2-alpha-tpuv5"]
    assert tar[:2] == ["tar", "-czf"]
    archive = tar[2]
    assert scp == [*group, "scp", archive, "mt:mtower_jax-code.tar.gz", "--worker=all", *WHERE]
    assert install[:len(group) + 3] == [*group, "ssh", "mt", "--worker=all"]
    assert "launch/install.sh tpu" in option(install, "command")
    assert start[:len(group) + 5] == [*group, "ssh", "mt", "--worker=all", *WHERE]
    assert shlex.split(option(start, "command")) == [
        "cd", "mtower_jax", "&&", "exec", ".venv/bin/python", "-m", "mtower_jax.main",
        "--config=configs/pretrain.py:model=base", "--workdir=gs://bucket/run",
        "--config.total_steps=10"]
    assert logged(calls) == []  # nothing external ran


def test_tpu_pod_multislice_dry_run(stubs, calls):
    proc, trace = launch("launch/tpu_pod.sh", stubs, calls, NUM_SLICES="2",
                         CREATE_FLAGS="--spot", **TPU)
    assert proc.returncode == 0, proc.stderr
    group = ["gcloud", "compute", "tpus", "queued-resources"]
    create = trace[1]
    assert create[:6] == [*group, "create", "mt"]
    assert {"--node-count=2", "--node-prefix=mt", "--runtime-version=v2-alpha-tpuv5",
            "--spot"} <= set(create)
    start = trace[-1]
    assert start[:4] == group and {"--worker=all", "--node=all"} <= set(start)
    assert "--config.mesh.dcn_data=2" in shlex.split(option(start, "command"))
    assert logged(calls) == []


def test_tpu_pod_reuses_a_ready_tpu_copies_the_checkout_and_starts_main(tmp_path, venv, stubs,
                                                                       calls):
    # describe says READY (so no create); scp keeps the archive it was given; the ssh that
    # starts main runs its --command in a worker's home whose code dir has the logging venv.
    home = tmp_path / "worker"
    (home / "mtower_jax").mkdir(parents=True)
    (home / "mtower_jax" / ".venv").symlink_to(venv)
    stub(stubs, "gcloud", f"""case $4 in
  describe) echo READY ;;
  scp) cp "$5" {tmp_path}/code.tgz ;;
  ssh) command=${{@: -1}}
       if [[ $command == *mtower_jax.main* ]]; then
         cd {home} && bash -c "${{command#--command=}}"
       fi
esac""")
    proc, _ = launch("launch/tpu_pod.sh", stubs, calls, "--config.data.tokenizer_dir=a b'c",
                     dry=False, **TPU)
    assert proc.returncode == 0, proc.stderr
    gcloud, python = logged(calls)[:4], logged(calls)[4:]
    assert [argv[4] for argv in gcloud] == ["describe", "scp", "ssh", "ssh"]
    assert python == [["python", "XLA_FLAGS=", "CUDA_VISIBLE_DEVICES=", "SLURM_PROCID=", "-m",
                       "mtower_jax.main", "--config=configs/pretrain.py:model=base",
                       "--workdir=gs://bucket/run", "--config.data.tokenizer_dir=a b'c"]]
    with tarfile.open(tmp_path / "code.tgz") as archive:
        names = set(archive.getnames())
    assert {"launch/tpu_pod.sh", "mtower_jax/main.py", "requirements.txt"} <= names
    assert not any(name.startswith((".venv", "runs/", "data/")) for name in names)


def test_tpu_pod_refuses_a_broken_tpu(stubs, calls):
    stub(stubs, "gcloud", "echo PREEMPTED")
    proc, _ = launch("launch/tpu_pod.sh", stubs, calls, dry=False, **TPU)
    assert proc.returncode != 0 and "mt is PREEMPTED" in proc.stderr
    assert [argv[4] for argv in logged(calls)] == ["describe"]


# -- gpu_node.sh, local.sh, install.sh -------------------------------------------------------

def test_gpu_node_dry_run_installs_a_missing_venv(tmp_path, stubs, calls):
    venv = tmp_path / "new-venv"
    proc, trace = launch("launch/gpu_node.sh", stubs, calls, "--config.total_steps=5",
                         VENV=str(venv), WORKDIR="runs/x", GPUS="0,1")
    assert proc.returncode == 0, proc.stderr
    *install, start = trace
    assert install[0][1:] == ["-m", "venv", str(venv)]
    assert install[-1] == [f"{venv}/bin/python", "-m", "pip", "install", "-q",
                           "-r", "requirements.txt", "-r", "requirements-gpu.txt"]
    assert start == ["env", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
                     "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "CUDA_VISIBLE_DEVICES=0,1",
                     f"{venv}/bin/python", "-m", "mtower_jax.main",
                     "--config=configs/pretrain.py:model=base", "--workdir=runs/x",
                     "--config.total_steps=5"]
    assert not venv.exists() and logged(calls) == []


def test_gpu_node_runs_main_with_the_gpu_environment(venv, stubs, calls):
    proc, trace = launch("launch/gpu_node.sh", stubs, calls, "--config.batch_size=64", dry=False,
                         VENV=str(venv), WORKDIR="runs/x", XLA_FLAGS="--xla_dump_to=/tmp/d")
    assert proc.returncode == 0, proc.stderr
    assert len(trace) == 1  # the venv is up to date: no install
    (python,) = logged(calls)
    assert python == ["python", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true "
                      "--xla_dump_to=/tmp/d", "CUDA_VISIBLE_DEVICES=", "SLURM_PROCID=",
                      "-m", "mtower_jax.main", "--config=configs/pretrain.py:model=base",
                      "--workdir=runs/x", "--config.batch_size=64"]


def test_install_skips_an_up_to_date_venv_and_completes_a_cpu_one(venv, stubs, calls):
    proc, trace = launch("launch/install.sh", stubs, calls, "gpu", dry=False, VENV=str(venv))
    assert proc.returncode == 0 and trace == [] and logged(calls) == []
    stamp = (venv / ".launch-installed").read_text()
    (venv / ".launch-installed").unlink()  # e.g. a venv from `make install`: no CUDA wheels
    proc, trace = launch("launch/install.sh", stubs, calls, "gpu", dry=False, VENV=str(venv))
    assert proc.returncode == 0, proc.stderr
    assert logged(calls) == [["python", "XLA_FLAGS=", "CUDA_VISIBLE_DEVICES=", "SLURM_PROCID=",
                              "-m", "pip", "install", "-q", "-r", "requirements.txt",
                              "-r", "requirements-gpu.txt"]]
    assert (venv / ".launch-installed").read_text() == stamp  # the next launch skips it


def test_local_dry_run(venv, tmp_path, stubs, calls):
    proc, trace = launch("launch/local.sh", stubs, calls, "summary", "--config=c.py:model=base",
                         VENV=str(venv), DEVICES="4")
    assert proc.returncode == 0, proc.stderr
    assert trace == [["env", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
                      f"{venv}/bin/python", "-m", "mtower_jax.summary",
                      "--config=c.py:model=base"]]
    proc, trace = launch("launch/local.sh", stubs, calls, "summary", VENV=str(tmp_path / "none"))
    assert trace[0] == ["make", "install"]
    assert logged(calls) == []


# -- slurm.sbatch ----------------------------------------------------------------------------

def slurm_env(venv: Path, **env: str) -> dict[str, str]:
    return dict(SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NTASKS="2", SLURM_JOB_ID="77",
                SLURM_SUBMIT_DIR=str(REPO), VENV=str(venv), **env)


def srun_command(srun: list[str]) -> list[str]:
    """The python command line after srun's options, env's assignments and the bash -c."""
    start = srun.index("bash")
    assert srun[start + 1:start + 4] == ["-c", 'exec "$@" --process_id="$SLURM_PROCID"', "bash"]
    return srun[start + 4:]


def test_slurm_dry_run(venv, stubs, calls):
    proc, trace = launch("launch/slurm.sbatch", stubs, calls, "--config.total_steps=3",
                         **slurm_env(venv, WORKDIR="runs/s", PORT="29500"))
    assert proc.returncode == 0, proc.stderr
    (srun,) = trace
    assert srun[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun_command(srun) == [
        f"{venv}/bin/python", "-m", "mtower_jax.main", "--config=configs/pretrain.py:model=base",
        "--workdir=runs/s", "--config.total_steps=3", "--coordinator_address=gpu-a:29500",
        "--num_processes=2"]
    assert logged(calls) == [["scontrol", "show", "hostnames", "gpu-[a-b]"]]


def test_slurm_gives_each_task_its_process_id(venv, stubs, calls):
    # srun: drop its options, run the command once per task, as SLURM does on the nodes.
    stub(stubs, "srun", 'while [[ $1 == --* ]]; do shift; done\n'
                        'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done')
    proc, _ = launch("launch/slurm.sbatch", stubs, calls, dry=False,
                     **slurm_env(venv, WORKDIR="runs/s"))
    assert proc.returncode == 0, proc.stderr
    pythons = [argv for argv in logged(calls) if argv[0] == "python"]
    assert [option(argv, "process_id") for argv in pythons] == ["0", "1"]
    for argv in pythons:
        assert option(argv, "coordinator_address") == "gpu-a:20077"  # 20000 + job id
        assert option(argv, "num_processes") == "2"
        assert argv[1].startswith("XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler")


def test_slurm_array_task_runs_its_line_of_commands(venv, tmp_path, stubs, calls):
    commands = tmp_path / "commands.txt"
    lines = [["--config=configs/pretrain.py:model=tiny", f"--workdir=runs/{i} x",
              f"--config.seed={i}"] for i in range(3)]
    commands.write_text("".join(shlex.join(line) + "\n" for line in lines))
    env = slurm_env(venv, COMMANDS=str(commands), WORKDIR="ignored")
    proc, trace = launch("launch/slurm.sbatch", stubs, calls, SLURM_ARRAY_TASK_ID="1", **env)
    assert proc.returncode == 0, proc.stderr
    assert srun_command(trace[-1])[3:6] == lines[1]
    proc, trace = launch("launch/slurm.sbatch", stubs, calls, SLURM_ARRAY_TASK_ID="3", **env)
    assert proc.returncode != 0 and "has no line 4 for array task 3" in proc.stderr
    assert trace == []


# -- sweep.py --------------------------------------------------------------------------------

def test_sweep_expands_the_grid(tmp_path, capsys):
    root = str(tmp_path / "sweep")
    assert sweep.main(["--config=configs/pretrain.py:model=base", *GRID, "--set",
                       "total_steps=1000", f"--workdir_root={root}", "--dry_run"]) == 0
    commands = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 8
    assert len({option(argv, "workdir") for argv in commands}) == 8
    seen = set()
    for argv in commands:
        assert argv[:3] == ["launch/local.sh", "main", "--config=configs/pretrain.py:model=base"]
        values = tuple(option(argv, f"config.model.manager.{key}")
                       for key in ("type", "weight_type", "num_layers"))
        assert option(argv, "workdir") == (f"{root}/manager.type={values[0]},"
                                           f"manager.weight_type={values[1]},"
                                           f"manager.num_layers={values[2]}")
        assert option(argv, "config.total_steps") == "1000"
        seen.add(values)
    assert seen == set(itertools.product(("AAUE", "SAUE"), ("vector", "scalar"), ("3", "6")))
    assert not (tmp_path / "sweep").exists()


def test_sweep_tpu_pod_sets_config_and_workdir_per_run(capsys):
    assert sweep.main(["--config=configs/pretrain.py:model=base",
                       "--grid", "optimizer.lr=1e-5,2e-5", "--workdir_root=gs://bucket/lr",
                       "--launcher=tpu_pod", "--dry_run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"+ CONFIG=configs/pretrain.py:model=base WORKDIR=gs://bucket/lr/optimizer.lr={lr} "
        f"launch/tpu_pod.sh --config.optimizer.lr={lr}" for lr in ("1e-5", "2e-5")]


def test_sweep_slurm_writes_commands_that_the_array_job_runs(venv, tmp_path, stubs, calls,
                                                             capsys, monkeypatch):
    commands = tmp_path / "sweep" / "commands.txt"
    args = ["--config=configs/pretrain.py:model=base", *GRID, f"--workdir_root={tmp_path}/sweep",
            "--launcher=slurm"]
    assert sweep.main([*args, "--dry_run"]) == 0
    out = capsys.readouterr().out.splitlines()
    sbatch = ["sbatch", "--array=0-7", f"--export=ALL,COMMANDS={commands}", "launch/slurm.sbatch"]
    assert shlex.split(out[-1][2:]) == sbatch
    lines = commands.read_text().splitlines()
    assert len(lines) == 8 and out[1:-1] == lines
    # The array job's task 7 runs the last line.
    proc, trace = launch("launch/slurm.sbatch", stubs, calls, SLURM_ARRAY_TASK_ID="7",
                         **slurm_env(venv, COMMANDS=str(commands)))
    assert proc.returncode == 0, proc.stderr
    assert srun_command(trace[-1])[3:-2] == shlex.split(lines[7])
    # Without --dry_run, sbatch itself is called.
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.setenv("CALLS", str(calls))
    calls.unlink()
    assert sweep.main(args) == 0
    assert logged(calls) == [sbatch]


def test_sweep_rejects_bad_overrides_and_launches_nothing(tmp_path, stubs, calls):
    proc = subprocess.run(
        [sys.executable, "launch/sweep.py", "--config=configs/pretrain.py:model=base",
         "--grid", "model.manager.typo=AAUE,SAUE", "--grid", "model.manager.num_layers=3,six",
         "--set", "optimizer.lr=fast", "--set", "model.remat=maybe",
         f"--workdir_root={tmp_path}/sweep", "--launcher=slurm"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "CALLS": str(calls)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown config key model.manager.typo; did you mean model.manager.type" in proc.stderr
    assert "model.manager.num_layers='six' does not parse as int" in proc.stderr
    assert "optimizer.lr='fast' does not parse as float" in proc.stderr
    assert "model.remat='maybe' does not parse as bool" in proc.stderr
    assert logged(calls) == [] and not (tmp_path / "sweep").exists()


def test_sweep_rejects_groups_and_repeated_keys():
    config = sweep.load_config("configs/pretrain.py:model=tiny")
    (problem,) = sweep.check(config, [("model.manager", ["1"])])
    assert problem.startswith("model.manager is a group of fields")
    assert "model.manager.type" in problem
    args = sweep.parse_args(["--config=configs/pretrain.py:model=tiny", "--grid", "seed=1,2",
                             "--set", "config.seed=3", "--workdir_root=runs/x"])
    with pytest.raises(sweep.SweepError, match="more than once.*seed"):
        sweep.plan(args)


def test_run_names_are_safe_file_names():
    assert sweep.run_name([("data.tokenizer_dir", "/data/rob erta")]) == \
        "data.tokenizer_dir=_data_rob_erta"
    long = sweep.run_name([("init_from", "x" * 300)])
    assert len(long) <= 200 and long != sweep.run_name([("init_from", "x" * 299)])


def test_sweep_takes_tuple_fields_and_checks_every_run_as_the_run_would(capsys):
    """An ablation over the losses (tuples, their grid values separated by '|'), and a grid
    with values each run would refuse at start: nothing launches, every such run named."""
    tiny = "--config=configs/pretrain.py:model=tiny"
    assert sweep.main([tiny, "--set", "model.heads=('mlm','itm','itc')",
                       "--grid", "losses=('mlm','itm')|('mlm','itm','itc')",
                       "--workdir_root=runs/x", "--dry_run"]) == 0
    commands = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines()]
    assert [option(argv, "config.losses") for argv in commands] == [
        "('mlm','itm')", "('mlm','itm','itc')"]
    assert [option(argv, "workdir") for argv in commands] == [
        "runs/x/losses=mlm+itm", "runs/x/losses=mlm+itm+itc"]

    assert sweep.main([tiny, "--set", "losses=mlm,itm", "--workdir_root=runs/x",
                       "--dry_run"]) == 2  # not a Python literal
    assert "losses='mlm,itm' does not parse as tuple" in capsys.readouterr().err
    assert sweep.main([tiny, "--grid", "model.manager.num_layers=3,9",
                       "--grid", "optimizer.lr=-1,1e-4", "--workdir_root=runs/x",
                       "--dry_run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "3 of 4 runs would stop at start" in err
    assert "run manager.num_layers=9,optimizer.lr=1e-4: invalid model config" in err
    assert "run manager.num_layers=3,optimizer.lr=-1: the run config has invalid values" in err
    assert "manager.num_layers=3,optimizer.lr=1e-4:" not in err
