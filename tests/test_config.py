"""Config files, typed arguments, the lock, command-line overrides checked against it, and
model-config validation."""
from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import tiny_config
from mtower_jax import config_args
from mtower_jax.config_args import parse_arg
from mtower_jax.models import build_model, validate
from mtower_jax.train import run_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_parse_arg_types_and_errors():
    arg = parse_arg("model=base,steps=10,lr=0.5,flag=false", model="tiny", steps=1, lr=1.0,
                    flag=True)
    assert (arg.model, arg.steps, arg.lr, arg.flag) == ("base", 10, 0.5, False)
    assert parse_arg(None, model="tiny").model == "tiny"
    with pytest.raises(ValueError, match="unknown config argument 'modle'"):
        parse_arg("modle=base", model="tiny")
    with pytest.raises(ValueError, match="steps='ten' is not a int"):
        parse_arg("steps=ten", steps=1)
    with pytest.raises(ValueError, match="not of the form name=value"):
        parse_arg("base", model="tiny")
    with pytest.raises(ValueError, match=r"model='huge' is not one of \('tiny', 'base'\)"):
        parse_arg("model=huge", choices=dict(model=("tiny", "base")), model="tiny")


@pytest.mark.parametrize("arg", ["model=tiny", "model=small,tower=bridge", "model=base,tower=meter",
                                 "model=large,tower=manager,data=real"])
def test_pretrain_config_variants_are_valid(arg):
    config = load_config("pretrain", arg)
    validate(config.model)
    for key in ("total_steps", "batch_size", "grad_accum_steps", "checkpoint_every",
                "keep_checkpoints", "log_every", "eval_every", "seed", "init_from"):
        assert key in config
    assert dict(config.mesh) == {"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1,
                                 "dcn_fsdp": 1, "dcn_tensor": 1}
    assert config.logical_axis_rules == "data"


@pytest.mark.parametrize("name,arg", [
    ("pretrain", "model=tiny"), ("pretrain", "model=base,data=real"),
    *[(task, f"model={m},data={d}") for task in ("vqav2", "nlvr2", "snli_ve", "irtr")
      for m, d in (("tiny", "synthetic"), ("base", "real"))]])
def test_every_shipped_config_passes_the_run_checks(name, arg):
    run_checks.validate(load_config(name, arg))


def test_run_checks_list_every_value_out_of_range():
    config = load_config("pretrain", "model=tiny")
    with config.unlocked():
        config.grad_accum_steps, config.optimizer.lr, config.optimizer.warmup_fraction = 3, -1.0, 2.0
        config.optimizer.b2, config.optimizer.lr_multipliers.heads = 1.0, 0.0
        config.mlm_probability, config.log_every, config.checkpoint_every = 1.5, 0, 0
        config.keep_checkpoints, config.eval_every, config.eval_batch_size = 0, -2, -1
        config.seed = -1
    with pytest.raises(ValueError) as error:
        run_checks.validate(config)
    lines = str(error.value).splitlines()[1:]
    assert [line.split("=")[0].strip() for line in lines] == [
        "config.grad_accum_steps", "config.optimizer.lr", "config.optimizer.warmup_fraction",
        "config.optimizer.b2", "config.optimizer.lr_multipliers.heads", "config.seed",
        "config.mlm_probability", "config.log_every", "config.checkpoint_every",
        "config.keep_checkpoints", "config.eval_every", "config.eval_batch_size"]
    assert "must divide config.batch_size=32" in lines[0]
    config = load_config("pretrain", "model=tiny")
    config.batch_size = 0
    with pytest.raises(ValueError, match=r"config.batch_size=0 must be > 0"):
        run_checks.validate(config)


def test_small_is_the_benchmark_size():
    m = load_config("pretrain", "model=small").model
    assert (m.text.hidden_size, m.text.num_layers, m.vision.num_layers, m.cross.num_layers) == \
        (256, 4, 4, 2)
    assert (m.vision.image_size, m.vision.patch_size, m.max_text_len) == (128, 16, 40)


def test_config_is_locked():
    config = load_config("pretrain", "model=tiny")
    with pytest.raises(AttributeError, match="tower_type"):
        config.model.tower_type = "bridge"
    with pytest.raises(KeyError):
        config["totl_steps"] = 5
    config.model.tower = "bridge"  # existing keys stay writable
    with pytest.raises(TypeError):
        config.total_steps = "many"


def test_bad_config_arguments():
    with pytest.raises(ValueError, match="tower='tall' is not one of"):
        load_config("pretrain", "tower=tall")
    with pytest.raises(ValueError, match="unknown config argument"):
        load_config("pretrain", "size=base")


@pytest.mark.parametrize("overrides, message", [
    ({"text.num_heads": 3}, r"model.text.hidden_size=64 is not divisible by model.text.num_heads=3"),
    ({"cross.hidden_size": 99}, r"model.cross.hidden_size=99 is not divisible"),
    ({"manager.num_layers": 5}, r"model.manager.num_layers=5 \(N managed layers\) must be in \[1, 4\]"),
    ({"manager.num_layers": 0}, r"must be in \[1, 4\]"),
    ({"vision.num_layers": 2, "manager.num_layers": 3}, r"must be in \[1, 2\]"),
    ({"manager.type": "MAUE"}, r"model.manager.type='MAUE' is not one of \('AAUE', 'SAUE'\)"),
    ({"manager.weight_type": "matrix"}, r"model.manager.weight_type='matrix'"),
    ({"tower": "tall"}, r"model.tower='tall'"),
    ({"bridge.type": "concat"}, r"model.bridge.type='concat'"),
    ({"vision.patch_size": 5}, r"image_size=32 is not a multiple of model.vision.patch_size=5"),
    ({"max_text_len": 40}, r"model.max_text_len=40 needs 42 position rows"),
    ({"heads": ("mlm", "captioning")}, r"model.heads='captioning'"),
    ({"heads": ("nlvr2",)}, r"nlvr2 head needs model.num_token_types=3"),
    ({"heads": ("vqa",), "vqa_num_answers": 0}, r"model.vqa_num_answers=0 must be a positive"),
    ({"text.activation": "swish"}, r"model.text.activation='swish'"),
    ({"cross.dropout": 1.5}, r"model.cross.dropout=1.5 must be in \[0, 1\)"),
    ({"dtype": "float64"}, r"model.dtype='float64'"),
])
def test_invalid_model_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_config("manager", **overrides))


def test_bridge_needs_a_uni_modal_layer_per_cross_layer():
    with pytest.raises(ValueError, match="at most 4"):
        build_model(tiny_config("bridge", **{"cross.num_layers": 5}))
    build_model(tiny_config("meter", **{"cross.num_layers": 5}))  # METER has no such limit


def test_all_errors_are_reported_together():
    with pytest.raises(ValueError) as info:
        build_model(tiny_config("manager", **{"text.num_heads": 3, "manager.num_layers": 9}))
    assert "num_heads=3" in str(info.value) and "num_layers=9" in str(info.value)


# --- command-line overrides (--config.KEY=VALUE) -------------------------------------------

CONFIG_ARG = f"--config={ROOT / 'configs' / 'pretrain.py'}:model=tiny"


def config_flag(argv: list[str]) -> flags.FlagValues:
    """Fresh flags with main.py's config flag (a locked config file) reading `argv`."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    return flag_values


@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=abc", "--config.batch_size=abc: expected an int (config.batch_size "
                                "is 32), got 'abc'"),
    ("--config.optimizer.lr=fast", "--config.optimizer.lr=fast: expected a float "
                                   "(config.optimizer.lr is 0.0001), got 'fast'"),
    ("--config.mesh.fsdp=1.5", "expected an int (config.mesh.fsdp is 1), got '1.5'"),
    ("--config.data.log_example_ids=maybe", "expected a bool, true or false"),
    ("--config.losses=(1,2)", "--config.losses=(1,2): expected a tuple of str (config.losses is "
                              "('mlm', 'itm')), got (1, 2): 1 is an int"),
    ("--config.nonexistent=1", "--config.nonexistent=1: config has no key 'nonexistent'; its "
                               "keys: batch_size, "),
    ("--config.optimizr.lr=1", "config has no key 'optimizr' (did you mean 'optimizer'?)"),
    ("--config.model.text.nope=1", "config.model.text has no key 'nope'"),
    ("--config.seed.x=1", "config.seed is an int, it has no key 'x'"),
    ("--config.optimizer={'lr': 1}", "config.optimizer is a sub-config; set its fields one by "
                                     "one (--config.optimizer.KEY=VALUE): b1, b2, eps"),
    ("--config.batch_size", "--config.batch_size: needs a value, an int"),
])
def test_a_bad_command_line_override_names_key_value_and_type(override, message):
    argv = ["main", CONFIG_ARG, "--workdir=x", override]
    with pytest.raises(flags.Error, match=re.escape(message)):
        config_args.check_overrides(argv, config_flag(argv))


def test_good_overrides_pass_the_check_and_absl_applies_them():
    argv = ["main", CONFIG_ARG, "--config.batch_size", "64", "--config.optimizer.lr=1e-3",
            "--config.losses=mlm", "--noconfig.data.log_example_ids", "--config.mesh.fsdp=2",
            "--config.data.eval_splits=('val', 'test')",
            "--config.optimizer.lr_multipliers.heads=1"]
    flag_values = config_flag(argv)
    config_args.check_overrides(argv, flag_values)
    flag_values(argv)
    config = flag_values.config
    assert (config.batch_size, config.optimizer.lr, config.losses, config.mesh.fsdp) == (
        64, 1e-3, ("mlm",), 2)
    assert config.data.eval_splits == ("val", "test") and not config.data.log_example_ids
    assert config.optimizer.lr_multipliers.heads == 1.0
    # Without the check, absl / ml_collections take a tuple of ints for one of strings.
    argv = ["main", CONFIG_ARG, "--config.losses=(1,2)"]
    flag_values = config_flag(argv)
    flag_values(argv)
    assert flag_values.config.losses == (1, 2)


def test_the_cli_refuses_a_bad_override_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mtower_jax.main", CONFIG_ARG,
                           f"--workdir={workdir}", "--config.mesh.fsdp=1.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert ("FATAL Flags parsing error: --config.mesh.fsdp=1.5: expected an int "
            "(config.mesh.fsdp is 1), got '1.5'") in done.stderr
    assert not workdir.exists() and time.monotonic() - start < 60
    # A well-typed value out of range: refused by the run checks, before the workdir exists.
    done = subprocess.run([sys.executable, "-m", "mtower_jax.main", CONFIG_ARG,
                           f"--workdir={workdir}", "--config.log_every=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "config.log_every=0 must be > 0 (steps)" in done.stderr
    assert not workdir.exists()
