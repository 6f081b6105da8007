"""Ahead-of-time compile of the real train step for a TPU topology, on a machine without it.

    pip install -r requirements-tpu.txt          # libtpu, the TPU compiler (`make test` does)
    python -m mtower_jax.tools.aot --config=configs/pretrain.py:model=base --topology=v5p-64 \
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.logical_axis_rules=fsdp \
        --config.model.dtype=bfloat16 [--num_slices=2] [--json=runs/aot/base.json]

libtpu describes the topology's chips as compile-only devices
(`jax.experimental.topologies`); config.mesh is laid over them, and the train step of
config.task (train/step.py, the function a run jits) is lowered against the abstract state
(train/state.py) and an abstract batch (data/examples.batch_spec) and compiled by the TPU
compiler, as a run on those chips would compile it. It prints a report and one JSON line:

    memory      per device, from compiled.memory_analysis(): arguments (state + batch, in
                the TPU's tiled layouts, so small arrays are padded), outputs, aliased
                (donated state: outputs that reuse argument buffers), temporaries
                (activations, gradients, ...), generated code; total = arguments + outputs
                - aliased + temporaries + code, against the chip's HBM (HBM_GIB); and
                XLA's peak estimate (with grad_accum_steps > 1 the temporaries can exceed it)
    flops       cost_analysis()['flops'] (per device, as XLA counts) and the analytic
                matmul FLOPs of one step (train/flops.py) with the time of
                config.total_steps at 50% MFU on these chips
    collectives all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute
                instructions in the compiled HLO (static counts; an async -start/-done
                pair counts once; the TPU's fused reduce-scatter counts as one)

A program over the HBM fails to compile with RESOURCE_EXHAUSTED: the tool prints what was
compiled, the compiler's numbers and what to change, and exits with status 2.

Topologies: libtpu's `VERSION:SHAPE` (v5e:2x2, v5p:2x2x4, v6e:16x16, v4:2x2x2), or a Cloud
TPU accelerator type (TOPOLOGIES):

    v5e-N, v5litepod-N, v6e-N   N chips                    v5e-256 = v5e:16x16
    v5p-N, v4-N                 N TensorCores, 2 per chip  v5p-64 = v5p:2x4x4 (32 chips)

A v4 / v5p chip is one jax device (megacore), so devices = chips everywhere.
`--num_slices=K` compiles for K such slices joined by the data-center network (DCN);
config.mesh.dcn_data becomes K (data parallelism across slices: one gradient all-reduce per
step crosses the slow network) unless a dcn_* size is set already.

Caveats (docs/SCALING.md): trust these TPU temporaries, not a CPU-compiled program's (XLA:CPU
fuses and schedules differently; the tiny model's differ by up to 5x); cost_analysis counts
a loop body once, so with config.grad_accum_steps=k (a scan over micro-batches) XLA's flops
are about 1/k of the step's, and with model.scan_layers the encoders' layers count once.
`--hlo=PATH` writes the compiled program for a closer look.
"""
from __future__ import annotations

import os

# The compile needs no local accelerator: keep JAX's own backend on the CPU (on a TPU VM that
# leaves the chips to the job using them). libtpu is then only a compiler, so: tell it it is
# on one host (else loading the topology prints warnings about TPU-VM environment variables
# it cannot find), and let several processes load it at once (else a second one, e.g. a test
# running this tool while pytest holds libtpu, fails on /tmp/libtpu_lockfile). None of this
# changes the compiled program.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtower_jax import config_args  # noqa: E402
from mtower_jax.data.examples import batch_spec  # noqa: E402
from mtower_jax.models.partitioning import MESH_AXES, resolve_rules  # noqa: E402
from mtower_jax.train import flops as flops_lib  # noqa: E402
from mtower_jax.train import mesh as mesh_lib  # noqa: E402
from mtower_jax.train import run_checks  # noqa: E402
from mtower_jax.train.state import create_train_state  # noqa: E402
from mtower_jax.train.step import jit_train_step  # noqa: E402

def _define_flags() -> dict:
    """The command line, defined only when this module runs as a program: tests import the
    module beside other tools that define their own --config."""
    out = dict(
        config=config_flags.DEFINE_config_file("config", None, "Config file[:args].",
                                               lock_config=True),
        topology=flags.DEFINE_string("topology", None, "libtpu topology (v5e:2x2, v5p:2x2x4) "
                                     "or accelerator type (v5p-64, v5e-256); see the module "
                                     "docstring."),
        num_slices=flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined by DCN; "
                                        "> 1 sets config.mesh.dcn_data unless a dcn_* size is "
                                        "set."),
        json=flags.DEFINE_string("json", None, "Also write the report here (JSON)."),
        hlo=flags.DEFINE_string("hlo", None, "Also write the compiled program's HLO text here."))
    flags.mark_flags_as_required(["config", "topology"])
    return out

# HBM per chip in GiB (Cloud TPU system architecture pages), by flops.PEAK_TFLOPS key.
HBM_GIB = {"tpu_v4": 32, "tpu_v5e": 16, "tpu_v5p": 95, "tpu_v6e": 32}
MFU = 0.5  # the utilisation the time estimate assumes
COMPILER_STACK_BYTES = 1 << 30  # virtual: only the pages the compiler touches are used
# Cloud TPU slice shapes by chip count (the default shape of each accelerator type).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


def _accelerator_types() -> dict[str, str]:
    """Cloud TPU accelerator type ('v5p-64') -> libtpu topology name ('v5p:2x4x4')."""
    types = {}
    for prefix, version in (("v5e", "v5e"), ("v5litepod", "v5e"), ("v6e", "v6e")):
        types.update({f"{prefix}-{chips}": f"{version}:{shape}"
                      for chips, shape in _SHAPES_2D.items()})
    for version in ("v4", "v5p"):  # v4-N / v5p-N count TensorCores, 2 per chip
        types.update({f"{version}-{2 * chips}": f"{version}:{shape}"
                      for chips, shape in _SHAPES_3D.items()})
    return types


TOPOLOGIES = _accelerator_types()
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction's opcode follows whitespace and precedes its operands: `= f32[8] all-gather(`
# (names and called computations follow '%': `%all-gather.3 = ...`, `calls=%all-gather.3`).
_OPCODE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
# The TPU compiler emits a reduce-scatter as a fusion of all-reduces in a computation named
# all-reduce-scatter.N: count its call sites, not the all-reduces inside it.
_FUSED_REDUCE_SCATTER = "all-reduce-scatter"
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")


def topology_name(topology: str) -> str:
    """An accelerator type ('v5p-64') -> libtpu's topology name ('v5p:2x4x4'); a topology
    name passes through."""
    if ":" in topology:
        return topology
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}: give VERSION:SHAPE (v5e:2x2, "
                         f"v5p:2x2x4) or one of {sorted(TOPOLOGIES)}")
    return TOPOLOGIES[topology]


def compile_devices(topology: str, num_slices: int = 1) -> list:
    """The compile-only jax devices of `num_slices` slices of `topology` (libtpu)."""
    return topologies.get_topology_desc(platform="tpu", topology_name=topology_name(topology),
                                        num_slices=num_slices).devices


def count_collectives(hlo_text: str) -> dict[str, int]:
    """{kind: instructions} over COLLECTIVES in an HLO module's text (compiled.as_text())."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
        if computation.startswith(_FUSED_REDUCE_SCATTER):
            continue
        for kind, _ in _OPCODE.findall(line):
            counts[kind] += 1
        counts["reduce-scatter"] += line.count(f"calls=%{_FUSED_REDUCE_SCATTER}")
    return counts


@dataclasses.dataclass
class CompiledStep:
    """The compiled train step and what it was compiled for (all per-device shapes come
    from these shardings)."""
    compiled: jax.stages.Compiled
    mesh: jax.sharding.Mesh
    abstract_state: dict  # ShapeDtypeStructs with shardings: step, params, opt_state, rng
    batch: dict  # ShapeDtypeStructs [batch_size, ...] split along the batch
    rng: jax.ShapeDtypeStruct  # uint32 [2], replicated
    seconds: float  # lowering + compilation


def with_slices(config: ml_collections.ConfigDict, num_slices: int) -> ml_collections.ConfigDict:
    """A copy of `config` whose mesh spans `num_slices` slices: dcn_data = num_slices unless
    the config already sets a dcn_* size."""
    config = config.copy_and_resolve_references()
    dcn = [config.mesh.get(f"dcn_{axis}", 1) for axis in MESH_AXES]
    if num_slices > 1 and math.prod(dcn) == 1:
        config.mesh.dcn_data = num_slices
    return config


def compile_train_step(config: ml_collections.ConfigDict, devices: list) -> CompiledStep:
    """Lowers and compiles the train step of `config` for `devices` (compile-only ones)."""
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    run_checks.check_mesh(config, mesh, evaluates=False)  # only the train step compiles
    rules = resolve_rules(config.logical_axis_rules)
    # create_train_state runs a few eager ops (PRNGKey); under the concrete mesh they would
    # be sent to the compile-only devices, so build the abstract state under the abstract mesh.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        model, tx, abstract_state, _ = create_train_state(config, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = batch_spec(config, config.batch_size, mesh_lib.batch_sharding(mesh))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    start = time.perf_counter()
    # The concrete mesh in context while tracing, as in a run: the model's activation
    # constraints (with_logical_constraint) resolve against it.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jit_train_step(config, model, tx, abstract_state, mesh)
        lowered = step.lower(abstract_state, batch, rng)
    compiled = _with_large_stack(lowered.compile)
    return CompiledStep(compiled, mesh, abstract_state, batch, rng, time.perf_counter() - start)


def _with_large_stack(fn):
    """fn() in a thread with a COMPILER_STACK_BYTES stack. The TPU compiler recurses deeply
    on the base / large programs: compiling base with remat for v5e-256 segfaulted after 7
    minutes in the main thread's default 8 MB stack (`ulimit -s`), twice; with an unlimited
    stack the same compile ran past that point."""
    previous = threading.stack_size(COMPILER_STACK_BYTES)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(fn).result()
    finally:
        threading.stack_size(previous)


def hbm_bytes(device) -> int | None:
    """HBM of one chip of `device`'s kind (HBM_GIB), None for a kind the table lacks."""
    gib = HBM_GIB.get(flops_lib.device_table_key(device.device_kind))
    return None if gib is None else gib * 2 ** 30


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (no layout padding)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def report(config: ml_collections.ConfigDict, topology: str, num_slices: int,
           result: CompiledStep) -> dict:
    """The JSON-able report of one compile (see the module docstring)."""
    memory = result.compiled.memory_analysis()
    device = result.mesh.devices.flat[0]
    num_devices = result.mesh.devices.size
    cost = result.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per program
    analytic = flops_lib.train_step_flops(config)
    peak = flops_lib.peak_tflops(device, config.model.dtype)
    step_seconds = analytic / (num_devices * peak * 1e12 * MFU)
    sizes = dict(argument=memory.argument_size_in_bytes, output=memory.output_size_in_bytes,
                 alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes,
                 generated_code=memory.generated_code_size_in_bytes)
    total = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
             + sizes["generated_code"])
    hbm = hbm_bytes(device)
    rules = config.logical_axis_rules
    return dict(
        topology=topology, topology_name=topology_name(topology), num_slices=num_slices,
        device_kind=device.device_kind, devices=num_devices, mesh=dict(result.mesh.shape),
        rules=rules if isinstance(rules, str) else [list(pair) for pair in rules],
        task=config.get("task", "pretrain"), batch_size=config.batch_size,
        per_device_batch=config.batch_size // mesh_lib.batch_shards(result.mesh.shape),
        itm_negatives=config.data.get("itm_negatives", "batch"),
        grad_accum_steps=config.grad_accum_steps, dtype=config.model.dtype,
        param_dtype=config.model.param_dtype, remat=config.model.remat,
        scan_layers=bool(config.model.get("scan_layers", False)),
        **{f"{name}_bytes": size for name, size in sizes.items()},
        total_bytes=total, peak_bytes=memory.peak_memory_in_bytes, hbm_bytes=hbm,
        fits=None if hbm is None else total <= hbm,
        params_bytes=_shard_bytes(result.abstract_state["params"]),
        opt_state_bytes=_shard_bytes(result.abstract_state["opt_state"]),
        xla_flops_per_device=cost.get("flops"),
        analytic_flops_per_step=analytic,
        analytic_flops_per_device=analytic / num_devices,
        collectives=count_collectives(result.compiled.as_text()),
        compile_seconds=round(result.seconds, 1),
        peak_tflops_per_device=peak, total_steps=config.total_steps,
        step_seconds_at_50pct_mfu=step_seconds,
        total_hours_at_50pct_mfu=step_seconds * config.total_steps / 3600,
    )


def _gib(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def format_report(r: dict) -> str:
    """The human-readable lines of a report."""
    hbm = (f"{_gib(r['hbm_bytes'])} HBM: {'fits' if r['fits'] else 'does NOT fit'} "
           f"({r['total_bytes'] / r['hbm_bytes']:.0%})" if r["hbm_bytes"] else "HBM unknown")
    collectives = ", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v) or "none"
    return "\n".join([
        f"{r['topology']} ({r['topology_name']} x {r['num_slices']} slice(s)): "
        f"{r['devices']} x {r['device_kind']}; mesh {r['mesh']}, rules {r['rules']}",
        f"task {r['task']}: batch {r['batch_size']} ({r['per_device_batch']} per device, "
        f"grad_accum_steps {r['grad_accum_steps']}, ITM negatives "
        f"{r.get('itm_negatives', 'batch')}), dtype {r['dtype']} (params "
        f"{r['param_dtype']}), remat {r['remat']}, scan_layers {r.get('scan_layers', False)}; "
        f"compiled in {r['compile_seconds']} s",
        "per device:",
        f"  arguments  {_gib(r['argument_bytes'])} (params {_gib(r['params_bytes'])} + "
        f"optimizer {_gib(r['opt_state_bytes'])} unpadded, + batch)",
        f"  outputs    {_gib(r['output_bytes'])} (aliased to arguments "
        f"{_gib(r['alias_bytes'])})",
        f"  temporary  {_gib(r['temp_bytes'])}",
        f"  code       {_gib(r['generated_code_bytes'])}",
        f"  total      {_gib(r['total_bytes'])} of {hbm}",
        f"  peak       {_gib(r['peak_bytes'])} (XLA's estimate of the bytes live at once)",
        f"flops: XLA {r['xla_flops_per_device']:.3e} per device; analytic "
        f"{r['analytic_flops_per_step']:.3e} per step ({r['analytic_flops_per_device']:.3e} "
        f"per device)",
        f"at {MFU:.0%} MFU of {r['peak_tflops_per_device']:g} TFLOP/s per device: "
        f"{r['step_seconds_at_50pct_mfu']:.3g} s per step, {r['total_steps']} steps in "
        f"{r['total_hours_at_50pct_mfu']:.1f} h ({r['total_hours_at_50pct_mfu'] / 24:.1f} days)",
        f"collectives: {collectives}",
    ])


def out_of_memory_message(config: ml_collections.ConfigDict, topology: str, num_slices: int,
                          devices: list, error: Exception) -> str:
    """What did not fit, the compiler's numbers, and the changes that shrink the program."""
    inner, dcn = mesh_lib.mesh_shape(config.mesh, len(devices))
    mesh = dict(zip(MESH_AXES, inner))
    hints = []
    shards = mesh_lib.batch_shards({a: n * d for a, n, d in zip(MESH_AXES, inner, dcn)})
    if (config.data.get("itm_negatives", "batch") == "batch" and shards > 1
            and config.get("task", "pretrain") in ("pretrain", "retrieval")):
        hints.append("draw ITM negatives within each device's shard of the batch, not from "
                     "the all-gathered global batch: --config.data.itm_negatives=shard")
    if mesh["fsdp"] == 1 or config.logical_axis_rules == "data":
        hints.append("shard the parameters and optimizer state: --config.mesh.fsdp=N "
                     "--config.logical_axis_rules=fsdp")
    if not config.model.remat:
        hints.append("recompute activations in the backward pass: --config.model.remat=True")
    if config.model.dtype == "float32":
        hints.append("compute in bfloat16: --config.model.dtype=bfloat16")
    hints += [f"split the batch into micro-batches: --config.grad_accum_steps="
              f"{2 * config.grad_accum_steps}",
              f"a smaller batch: --config.batch_size={config.batch_size // 2}",
              "more chips: a larger --topology or --num_slices"]
    numbers = str(error).strip().splitlines()[0]
    return "\n".join([
        f"RESOURCE_EXHAUSTED: the train step does not fit {topology} x {num_slices} slice(s) "
        f"({len(devices)} x {devices[0].device_kind}, {_gib(hbm_bytes(devices[0]))} HBM each)",
        f"  mesh {mesh} dcn {dcn}, rules "
        f"{config.logical_axis_rules}, batch {config.batch_size} (grad_accum_steps "
        f"{config.grad_accum_steps}, ITM negatives {config.data.get('itm_negatives', 'batch')}), "
        f"dtype {config.model.dtype}, remat {config.model.remat}, "
        f"scan_layers {config.model.get('scan_layers', False)}",
        f"  compiler: {numbers}",
        "  try: " + "\n       ".join(hints),
    ])


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str], cli: dict) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    topology, num_slices = cli["topology"].value, cli["num_slices"].value
    config = with_slices(cli["config"].value, num_slices)
    if config.total_steps <= 0:
        raise app.UsageError("config.total_steps is resolved from the data set at run time; "
                             "pass --config.total_steps=N")
    devices = compile_devices(topology, num_slices)
    try:
        result = compile_train_step(config, devices)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(out_of_memory_message(config, topology, num_slices, devices, e), file=sys.stderr)
        sys.exit(2)
    memory = result.compiled.memory_analysis()
    # Printed now: cost_analysis and as_text read the whole compiled program back (minutes
    # and several GB for base / large), so these are the numbers to have if that fails.
    print(f"compiled in {result.seconds:.0f} s; per device: arguments "
          f"{_gib(memory.argument_size_in_bytes)}, temporaries {_gib(memory.temp_size_in_bytes)}",
          flush=True)
    r = report(config, topology, num_slices, result)
    print(format_report(r))
    print(json.dumps(r), flush=True)
    if cli["json"].value:
        _write(cli["json"].value, json.dumps(r, indent=1))
    if cli["hlo"].value:
        _write(cli["hlo"].value, result.compiled.as_text())


if __name__ == "__main__":
    _cli = _define_flags()
    app.run(lambda argv: main(argv, _cli), flags_parser=config_args.parse_flags)
