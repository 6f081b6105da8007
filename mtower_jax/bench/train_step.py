"""Training-step benchmark: ours against the PyTorch reference, on the same machine, in one run.

    python -m mtower_jax.bench.train_step --model=small --vs=torch
    python -m mtower_jax.bench.train_step --model=base --batch=64 --dtype=bfloat16 --vs=none
    python -m mtower_jax.bench.train_step --model=small --override=model.manager.num_layers=2

Both sides train the `bridge` tower of `configs/pretrain.py:model=M` (torch: HF
`BridgeTowerForMaskedLM` + ITM head, bench/torch_reference.py) with the same dimensions,
batch, text length and image size, AdamW, and MLM + ITM work per step. Our `manager` tower is
timed too. After one warm-up step each, the runners take turns, `--rounds` times `--steps`
steps; each round times every runner's steps back to back (the device is drained before the
clock stops), so a noisy machine slows neighbours alike and the per-round ratios stay honest.
Prints one JSON line:

    ours_steps_per_s, torch_steps_per_s   median over rounds
    ratio                                 median over rounds of ours / torch steps/s
    manager_over_bridge                   median over rounds of manager / bridge step time
    compile_s                             our bridge step's lower + compile
    peak_mem_mb                           device peak bytes in use when the device reports
                                          it (GPU / TPU), else XLA's buffer plan of the step
                                          (arguments + outputs + temporaries - aliased)
    tflops                                analytic step FLOPs (train/flops.py) / step time
    mfu                                   median over rounds of that round's TFLOP/s over
                                          the peak measured in the same round
    matmul_peak_tflops                    a dense matmul in --dtype ([2048]^2 on a CPU,
                                          [8192]^2 on an accelerator), measured once per
                                          round (median)
and what was run: model, batch, dtype, device, overrides, the per-round step times.

On a GPU, `bash mtower_jax/bench/gpu_run.sh probe` then `... base SETTING` runs issue 9's
measurements in two device calls (BENCHMARKS.md, "GPU").
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags

from configs import pretrain
from mtower_jax.data import masking
from mtower_jax.data.examples import mlm_max_predictions
from mtower_jax.models.partitioning import resolve_rules
from mtower_jax.train import flops
from mtower_jax.train import mesh as mesh_lib
from mtower_jax.train.state import create_train_state
from mtower_jax.train.step import jit_train_step

DEFAULT_BATCH = {"tiny": 32, "small": 32}  # base / large: give --batch for the accelerator


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """'model.text.num_layers=2' -> config.model.text.num_layers = 2, typed as the field is."""
    path, sep, text = override.partition("=")
    parent, *_, key = [config, *path.split(".")]
    for part in path.split(".")[:-1]:
        parent = parent[part]
    if not sep or key not in parent:
        raise ValueError(f"--override={override!r}: expected KEY=VALUE with KEY a config "
                         f"field (e.g. model.text.num_layers=2)")
    old = parent[key]
    if isinstance(old, bool):
        parent[key] = text.lower() in ("1", "true", "yes")
    else:
        parent[key] = type(old)(text)


def bench_config(model: str, tower: str, batch: int, dtype: str,
                 overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    config = pretrain.get_config(f"model={model},tower={tower}")
    config.batch_size = batch
    config.model.dtype = dtype
    config.total_steps = 10_000  # the learning rate stays warm; it does not change the work
    # HF's CLIP tower has hidden // 64 heads (as small and up already do; tiny has 2 of 32).
    config.model.vision.num_heads = max(1, config.model.vision.hidden_size // 64)
    for override in overrides:
        apply_override(config, override)
    return config


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict:
    """A pretraining batch with real structure: captions of random length (6 tokens to
    max_text_len) framed by <s> ... </s> and padded, BERT masking at mlm_probability (capped
    at config.mlm_max_predictions, as the pipeline does), one record per example. RoBERTa's ids: <s> 0, <pad> 1, </s> 2, <mask> = vocab - 1."""
    rng = np.random.default_rng(seed)
    m, batch = config.model, config.batch_size
    length, vocab, size = m.max_text_len, m.text.vocab_size, m.vision.image_size
    lengths = rng.integers(6, length + 1, size=batch)
    positions = np.arange(length)[None, :]
    input_ids = rng.integers(3, vocab - 1, size=(batch, length))
    input_ids[:, 0] = 0
    input_ids[positions == lengths[:, None] - 1] = 2
    input_ids[positions >= lengths[:, None]] = 1
    attention_mask = (positions < lengths[:, None]).astype(np.int32)
    special = (input_ids <= 2)
    k = mlm_max_predictions(config)
    mlm_input_ids, mlm_labels = masking.mask_tokens(
        input_ids, special, mask_id=vocab - 1, ordinary_ids=np.arange(3, vocab - 1),
        probability=config.mlm_probability, rng=rng, max_predictions=k)
    out = {"pixel_values": rng.standard_normal((batch, size, size, 3)).astype(np.float32),
           "input_ids": input_ids.astype(np.int32), "attention_mask": attention_mask,
           "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels,
           "record_index": np.arange(batch, dtype=np.int32)}
    if k is not None:
        out["mlm_positions"] = masking.selected_positions(mlm_labels, k)
    return out


def median_seconds(fn: Callable, args: tuple, repeats: int) -> float:
    """Median seconds of fn(*args) over `repeats` calls after one warm-up (compile) call,
    each drained with block_until_ready (profile_step.py and kernels.py time parts this way)."""
    jax.block_until_ready(fn(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _progress(line: str) -> None:
    """A progress line on stderr (the JSON result is stdout's only line)."""
    print(f"[bench] {line}", file=sys.stderr, flush=True)


class OursRunner:
    """Our jitted train step (as train/loop.py builds it) on a fixed device batch."""

    def __init__(self, config: ml_collections.ConfigDict, batch: dict):
        self.config = config
        self.mesh = mesh_lib.make_mesh(config.mesh)
        self.rules = resolve_rules(config.logical_axis_rules)
        with self.context():
            self.model, self.tx, abstract_state, init = create_train_state(
                config, self.mesh, self.rules)
            step = jit_train_step(config, self.model, self.tx, abstract_state, self.mesh)
            self.batch = mesh_lib.global_batch(batch, self.mesh)
            self.state = init()
            self.rng = jax.random.PRNGKey(0)
            start = time.perf_counter()
            self.step_fn = step.lower(self.state, self.batch, self.rng).compile()
            self.compile_s = time.perf_counter() - start
        _progress(f"{config.model.tower}: compiled in {self.compile_s:.1f} s")
        self.steps_done = 0

    def context(self) -> contextlib.ExitStack:
        """The run's mesh and logical axis rules, as the loop sets them."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def run(self, n: int) -> float:
        """Seconds for n steps, the device drained at the end."""
        start = time.perf_counter()
        for _ in range(n):
            rng = jax.random.fold_in(self.rng, self.steps_done)
            self.state, metrics = self.step_fn(self.state, self.batch, rng)
            self.steps_done += 1
        jax.block_until_ready((self.state, metrics))
        self.last_loss = float(metrics["loss"])
        return time.perf_counter() - start

    def peak_memory_mb(self) -> tuple[float, str]:
        stats = jax.local_devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
        m = self.step_fn.memory_analysis()
        planned = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
        return planned / 2**20, "XLA buffer plan (arguments + outputs + temps - aliased)"


class TorchRunner:
    def __init__(self, config: ml_collections.ConfigDict, batch: dict):
        import torch

        from mtower_jax.bench.torch_reference import TorchReference
        self.reference = TorchReference(config.model, batch, lr=config.optimizer.lr)
        self.threads = torch.get_num_threads()

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.last_loss = self.reference.step()
        return time.perf_counter() - start


def benchmark(model: str, batch: int, dtype: str, vs: str, rounds: int, steps: int,
              manager: bool = True, overrides: tuple[str, ...] = ()) -> dict:
    """Builds the runners, warms each up with one step, then alternates them; returns the
    result dict (see the module docstring)."""
    bridge_config = bench_config(model, "bridge", batch, dtype, overrides)
    host_batch = synthetic_batch(bridge_config)
    runners = {"bridge": OursRunner(bridge_config, host_batch)}
    if manager:
        runners["manager"] = OursRunner(bench_config(model, "manager", batch, dtype, overrides),
                                        host_batch)
    if vs == "torch":
        runners["torch"] = TorchRunner(bridge_config, host_batch)
    for runner in runners.values():
        runner.run(1)
    seconds, peaks = {name: [] for name in runners}, []
    for _ in range(rounds):
        for name, runner in runners.items():
            seconds[name].append(runner.run(steps) / steps)
        peaks.append(flops.measure_matmul_peak_tflops(dtype, repeats=3))
        _progress("round: " + ", ".join(f"{name} {times[-1]:.4f} s"
                                        for name, times in seconds.items()))

    bridge = runners["bridge"]
    step_s = statistics.median(seconds["bridge"])
    step_flops = flops.train_step_flops(bridge_config)
    # MFU per round against that round's peak: both measured under the same machine load.
    mfu = statistics.median(step_flops / s / 1e12 / (p * jax.device_count())
                            for s, p in zip(seconds["bridge"], peaks))
    memory_mb, memory_source = bridge.peak_memory_mb()
    device = jax.local_devices()[0]
    result = {
        "model": model, "batch": batch, "dtype": dtype, "device": device.device_kind,
        "devices": jax.device_count(), "overrides": list(overrides), "rounds": rounds,
        "steps_per_round": steps,
        "ours_steps_per_s": 1.0 / step_s,
        "compile_s": bridge.compile_s,
        "peak_mem_mb": memory_mb, "peak_mem_source": memory_source,
        "tflops": step_flops / step_s / 1e12,
        "mfu": mfu,
        "matmul_peak_tflops": statistics.median(peaks),
        "step_gflop": step_flops / 1e9,
        "ours_step_s": seconds["bridge"],
    }
    spec_key = flops.device_table_key(device.device_kind)
    if spec_key:
        result["mfu_vs_spec"] = flops.mfu(step_flops, step_s, jax.device_count(),
                                          flops.PEAK_TFLOPS[spec_key][dtype])
    if manager:
        result["manager_over_bridge"] = statistics.median(
            m / b for m, b in zip(seconds["manager"], seconds["bridge"]))
        result["manager_step_s"] = seconds["manager"]
    if vs == "torch":
        result["torch_steps_per_s"] = 1.0 / statistics.median(seconds["torch"])
        result["ratio"] = statistics.median(t / o for o, t in zip(seconds["bridge"],
                                                                   seconds["torch"]))
        result["torch_step_s"] = seconds["torch"]
        result["torch_threads"] = runners["torch"].threads
    return result


def _define_flags() -> dict:
    """Flags exist only when this is the program (profile_step imports this module)."""
    return dict(
        model=flags.DEFINE_enum("model", "small", ["tiny", "small", "base", "large"],
                                "Model size."),
        batch=flags.DEFINE_integer("batch", 0, "Global batch (0: 32 for tiny / small)."),
        dtype=flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                                "Our compute dtype (the torch reference is float32)."),
        vs=flags.DEFINE_enum("vs", "torch", ["torch", "none"], "Also time the PyTorch reference."),
        rounds=flags.DEFINE_integer("rounds", 5, "Alternating rounds."),
        steps=flags.DEFINE_integer("steps", 3, "Steps per runner per round."),
        manager=flags.DEFINE_boolean("manager", True, "Also time our manager tower."),
        override=flags.DEFINE_multi_string("override", [], "KEY=VALUE of the config (both "
                                           "sides), e.g. model.manager.num_layers=6."))


def main(argv: list[str], args: dict) -> None:
    del argv
    a = {name: flag.value for name, flag in args.items()}
    batch = a["batch"] or DEFAULT_BATCH.get(a["model"], 0)
    if batch <= 0:
        sys.exit(f"--model={a['model']} needs --batch=N (the global batch)")
    if a["vs"] == "torch" and a["dtype"] != "float32":
        sys.exit("--vs=torch compares float32 steps; use --dtype=float32 or --vs=none")
    result = benchmark(a["model"], batch, a["dtype"], a["vs"], a["rounds"], a["steps"],
                       a["manager"], tuple(a["override"]))
    print(json.dumps(result))


if __name__ == "__main__":
    _args = _define_flags()
    app.run(lambda argv: main(argv, _args))
