"""Config files, typed arguments, the lock, and model-config validation."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

from conftest import tiny_config
from mtower_jax.config_args import parse_arg
from mtower_jax.models import build_model, validate

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
