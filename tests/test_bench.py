"""The benchmark scripts run end to end and report what BENCHMARKS.md quotes (their numbers
are measurements, not test assertions: this machine is shared and noisy)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST_COMPILE_XLA_FLAGS
from mtower_jax.bench.train_step import bench_config, synthetic_batch
from mtower_jax.data.masking import IGNORE

KEYS = ("ours_steps_per_s", "torch_steps_per_s", "ratio", "compile_s", "peak_mem_mb", "tflops",
        "mfu", "matmul_peak_tflops", "manager_over_bridge")


def test_synthetic_batch_follows_the_pipeline_contract():
    config = bench_config("small", "bridge", 16, "float32")
    batch = synthetic_batch(config)
    ids, labels = batch["input_ids"], batch["mlm_labels"]
    assert (ids[:, 0] == 0).all() and ((ids == 1) == (batch["attention_mask"] == 0)).all()
    selected = labels != IGNORE
    assert selected.any() and not selected[ids <= 2].any()
    assert (np.take_along_axis(labels, batch["mlm_positions"], -1) != IGNORE).sum() == \
        selected.sum()


def test_train_step_benchmark_prints_one_json_line_with_every_key():
    # This one-step run is compile-bound: 47 -> 35 s here with the cheapest codegen.
    result = subprocess.run(
        [sys.executable, "-m", "mtower_jax.bench.train_step", "--model=tiny", "--batch=8",
         "--rounds=1", "--steps=1", "--override=model.text.num_layers=1",
         "--override=model.vision.num_layers=1", "--override=model.cross.num_layers=1",
         "--override=model.manager.num_layers=1"], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS))
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert np.isfinite(line[key]) and line[key] > 0, key
    assert line["ratio"] == line["torch_step_s"][0] / line["ours_step_s"][0]
    assert line["manager_over_bridge"] == line["manager_step_s"][0] / line["ours_step_s"][0]
    assert line["overrides"] == ["model.text.num_layers=1", "model.vision.num_layers=1",
                                 "model.cross.num_layers=1", "model.manager.num_layers=1"]


@pytest.mark.parametrize("args", [[], ["bench"], ["probe", "cuda_dir"], ["base", "fast"]])
def test_the_gpu_script_refuses_a_stage_or_setting_it_does_not_have(args, tmp_path):
    """gpu_run.sh spends device time: a typo must stop it before any work, with the usage."""
    script = "mtower_jax/bench/gpu_run.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0  # it parses
    result = subprocess.run(["bash", script, *args], capture_output=True, text=True,
                            env=dict(os.environ, OUT=str(tmp_path / "out")), timeout=60)
    assert result.returncode == 2 and "usage: gpu_run.sh probe | base SETTING" in result.stderr
    assert not (tmp_path / "out").exists()


def test_overrides_are_typed_and_checked():
    config = bench_config("tiny", "manager", 8, "float32", ("model.manager.num_layers=2",
                                                            "model.manager.noise=false"))
    assert config.model.manager.num_layers == 2 and config.model.manager.noise is False
    with pytest.raises(ValueError, match="model.manager.layers"):
        bench_config("tiny", "manager", 8, "float32", ("model.manager.layers=2",))


def test_every_kernel_alternative_traces_forward_and_backward():
    """bench.kernels builds each alternative against the model's own functions, whose
    signatures move (the mix took its experts as a tuple and the script broke unnoticed).
    Traced, not timed: jax.eval_shape of each jitted function and its gradient."""
    import jax
    from mtower_jax.bench import kernels

    traced = []

    def trace(fn, *args):
        traced.append(jax.eval_shape(jax.jit(fn), *args))
        return 0.0
    result = kernels.measure(trace)
    names = {piece: sorted(alternatives) for piece, alternatives in result.items()}
    assert names["layer_norm"] == ["autodiff", "custom_vjp"]
    assert names["manager_mix"] == ["elementwise_custom_vjp", "elementwise_terms",
                                    "softmax_over_axis0"]
    assert len(traced) == sum(len(a) for a in names.values()) == 18
