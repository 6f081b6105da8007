"""model.scan_layers: the encoders' layers as one nn.scan give the unrolled model's outputs and
gradients from the same (stacked) parameters, with and without remat; the two layouts convert
exactly; stacked parameters shard like one layer's; the importers, exporters and init_from
handle both layouts; the FLOP counts agree; a train step matches the unrolled one."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from conftest import random_variables, tiny_config
from mtower_jax.models import build_model, example_inputs, parameter_shapes, random_inputs
from mtower_jax.models.layer_stack import (is_stacked, match_layout, stack_layers,
                                           unstack_layers)
from mtower_jax.models.partitioning import resolve_rules
from mtower_jax.models.text_encoder import TextEncoder
from mtower_jax.models.vision_encoder import VisionEncoder
from mtower_jax.train import flops

ENCODERS = ("text", "image")
ATOL = 1e-5  # XLA fuses a scan body differently: ~1e-6 apart in float32


def scanned(cfg):
    cfg = cfg.copy_and_resolve_references()
    cfg.scan_layers = True
    return cfg


def eval_outputs(cfg, variables, inputs):
    """The backbone's outputs, eager (op by op): cheaper here than compiling the model."""
    keys = ("text_feats", "image_feats", "cls_feats", "unimodal_text_feats",
            "unimodal_image_feats", "text_hidden_states", "image_hidden_states", "itm_logits")
    out = build_model(cfg).apply(variables, **inputs)
    return {k: out[k] for k in keys}


def assert_trees_close(a, b, atol=ATOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("tower", ["manager", "bridge"])
def test_scanned_model_gives_the_unrolled_outputs(tower):
    cfg = tiny_config(tower)
    variables = random_variables(cfg)
    stacked = {"params": stack_layers(variables["params"])}
    inputs = random_inputs(cfg, 2)
    unrolled_out = eval_outputs(cfg, variables, inputs)
    scanned_out = eval_outputs(scanned(cfg), stacked, inputs)
    assert len(scanned_out["text_hidden_states"]) == cfg.text.num_layers
    assert len(scanned_out["image_hidden_states"]) == cfg.vision.num_layers
    assert_trees_close(scanned_out, unrolled_out)


def test_scan_layers_is_an_off_by_default_checked_config_field():
    from configs.pretrain import get_config
    from mtower_jax.models import validate

    model = get_config("model=tiny").model
    assert model.scan_layers is False
    bad = ml_collections.ConfigDict(dict(model.to_dict(), scan_layers=1))
    with pytest.raises(ValueError, match="model.scan_layers=1 must be a bool"):
        validate(bad)


def test_layouts_convert_exactly_and_stack_on_a_leading_layer_dim():
    cfg = tiny_config("manager")
    shapes, stacked_shapes = parameter_shapes(cfg), parameter_shapes(scanned(cfg))
    for encoder, depth in (("text_encoder", cfg.text.num_layers),
                           ("vision_encoder", cfg.vision.num_layers)):
        prefix = f"backbone/{encoder}/"
        layer0 = {p[len(prefix + "layer_0/"):]: s for p, s in shapes.items()
                  if p.startswith(prefix + "layer_0/")}
        stacked = {p[len(prefix + "layers/"):]: s for p, s in stacked_shapes.items()
                   if p.startswith(prefix + "layers/")}
        assert layer0 and stacked == {p: (depth, *s) for p, s in layer0.items()}
        assert not any(p.startswith(prefix + "layer_") for p in stacked_shapes)
    rest = {p: s for p, s in shapes.items() if not re.search(r"/layer_\d+/", p)}
    assert rest == {p: s for p, s in stacked_shapes.items() if "/layers/" not in p}

    params = random_variables(cfg)["params"]
    stacked = stack_layers(params)
    assert is_stacked(stacked) and not is_stacked(params)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
    np.testing.assert_array_equal(  # layer i is row i
        stacked["backbone"]["vision_encoder"]["layers"]["mlp"]["output"]["kernel"][2],
        params["backbone"]["vision_encoder"]["layer_2"]["mlp"]["output"]["kernel"])
    assert stack_layers(stacked) == stacked and unstack_layers(params) == params  # idempotent
    mixed = {"text_encoder": dict(params["backbone"]["text_encoder"],
                                  layers=stacked["backbone"]["text_encoder"]["layers"])}
    with pytest.raises(ValueError, match="holds both"):
        stack_layers(mixed)


def encoder(cls, part_cfg, scan: bool, remat: bool):
    return cls(ml_collections.FrozenConfigDict(part_cfg), remat=remat, scan_layers=scan)


@pytest.mark.parametrize("remat", [False, True])
def test_encoder_gradients_agree_and_remat_goes_inside_the_scan(remat):
    """Both encoders, a loss on every layer's output and the top layers sent across."""
    cfg = tiny_config("manager")
    params = stack_layers(random_variables(cfg)["params"])["backbone"]
    x = random_inputs(cfg, 2)
    streams = {"text_encoder": (TextEncoder, cfg.text, (x["input_ids"], x["attention_mask"])),
               "vision_encoder": (VisionEncoder, cfg.vision, (x["pixel_values"],))}
    for name, (cls, part, args) in streams.items():
        def loss(module, train=False):
            def f(p):
                out = module.apply({"params": p}, *args, train, 2,
                                   rngs={"dropout": jax.random.PRNGKey(3)})
                weights = jnp.arange(1.0, part.num_layers + 1)
                return (sum(w * jnp.mean(h ** 2) for w, h in zip(weights, out["hidden_states"]))
                        + jnp.mean(jnp.sin(out["outputs"])))
            return jax.jit(jax.value_and_grad(f))

        scan_module = encoder(cls, part, True, remat)
        jaxpr = str(jax.make_jaxpr(loss(scan_module))(params[name]))
        assert "scan[" in jaxpr and ("checkpoint" in jaxpr or "remat" in jaxpr) == remat
        value, grads = loss(encoder(cls, part, False, remat))(unstack_layers(params)[name])
        scan_value, scan_grads = loss(scan_module)(params[name])
        np.testing.assert_allclose(scan_value, value, rtol=1e-6)
        assert_trees_close(stack_layers({name: grads})[name], scan_grads, atol=1e-6)
        if remat and name == "text_encoder":  # training, dropout on: remat changes nothing
            assert_trees_close(loss(scan_module, train=True)(params[name]),
                               loss(encoder(cls, part, True, False), train=True)(params[name]),
                               atol=1e-6)


def test_stacked_parameters_keep_the_layer_dim_whole_and_shard_the_rest():
    cfg = tiny_config("manager")
    boxed = {}
    for name, c in (("unrolled", cfg), ("scanned", scanned(cfg))):
        model = build_model(c)
        boxed[name] = jax.eval_shape(lambda r, m=model, c=c: m.init(r, **example_inputs(c)),
                                     jax.random.PRNGKey(0))["params"]
    flat = {name: dict(jax.tree_util.tree_flatten_with_path(
        nn.get_partition_spec(tree), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]) for name, tree in boxed.items()}
    names = {name: {jax.tree_util.keystr(k): v for k, v in specs.items()}
             for name, specs in flat.items()}
    rules = resolve_rules("fsdp")
    checked = 0
    for path, spec in names["scanned"].items():
        if "['layers']" not in path:
            assert names["unrolled"][path] == spec
            continue
        one_layer = names["unrolled"][path.replace("['layers']", "['layer_0']")]
        assert tuple(spec) == ("layers", *one_layer), path
        mesh_axes = tuple(nn.logical_to_mesh_axes(tuple(spec), rules))
        assert mesh_axes[0] is None and mesh_axes[1:] == tuple(
            nn.logical_to_mesh_axes(tuple(one_layer), rules)), path
        checked += "fsdp" in mesh_axes
    assert checked >= 20  # every kernel and LayerNorm of both encoders' layers is split
    kernel = "['backbone']['text_encoder']['layers']['mlp']['intermediate']['kernel']"
    assert tuple(nn.logical_to_mesh_axes(tuple(names["scanned"][kernel]), rules)) == (
        None, "fsdp", None)


def test_flop_counts_are_the_same_scanned_or_unrolled():
    cfg = tiny_config("manager")
    passes = dict(text_encodes=1, image_encodes=1, fusions=1, mlm_positions=cfg.max_text_len,
                  itm=1)
    counts = []
    for c in (cfg, scanned(cfg)):
        model = build_model(c)
        inputs = example_inputs(c, 2)
        params = jax.eval_shape(lambda r, m=model, x=inputs: m.init(r, **x),
                                jax.random.PRNGKey(0))

        def loss(v, x, m=model):
            return jnp.sum(m.apply(v, **x, train=False)["itm_logits"])
        counts.append((flops.traced_matmul_flops(lambda v, x, m=model: m.apply(v, **x), params,
                                                 inputs),
                       flops.traced_matmul_flops(jax.grad(loss), params, inputs)))
        assert flops.forward_flops(c, passes=passes) == flops.forward_flops(cfg, passes=passes)
    assert counts[0] == counts[1]
    assert counts[0][0] == (2 * flops.forward_flops(cfg, passes=passes)
                            + flops.aaue_weight_product_flops(cfg))


def test_init_from_converts_either_layout():
    from mtower_jax.train.init_from import merge_params

    cfg = tiny_config("manager")
    unrolled = random_variables(cfg, seed=1)["params"]
    stacked = stack_layers(unrolled)
    fresh_unrolled = random_variables(cfg, seed=2)["params"]
    fresh_stacked = stack_layers(fresh_unrolled)
    for fresh, source, expected in ((fresh_stacked, unrolled, stacked),
                                    (fresh_unrolled, stacked, unrolled)):
        params, report = merge_params(fresh, source, "SRC")
        assert not report["fresh"] and not report["ignored"]
        assert len(report["adapted"]) == 2  # both encoders
        jax.tree.map(np.testing.assert_array_equal, params, expected)
    same, notes = match_layout(stacked, fresh_stacked)
    assert not notes and is_stacked(same)


def test_train_step_with_scan_layers_starts_from_the_unrolled_loss():
    """One step of the (shallow, dropout-free) tiny pretraining config with
    --config.model.scan_layers=True: its loss is the unrolled model's on the same weights.
    (The bridge tower with one cross-modal layer: the scan is in the encoders, and the
    smaller fusion halves the two compiles.)"""
    from test_train_step import make_batch, run, setup, small_config

    from mtower_jax.train.step import make_eval_step
    from mtower_jax.train.tasks import denominators, get_task

    config = small_config()
    config.model.tower, config.model.cross.num_layers = "bridge", 1
    params = random_variables(config.model, seed=0)["params"]
    batch = make_batch(config.model)
    terms, _ = jax.jit(make_eval_step(config, build_model(config.model)))(
        params, batch, jax.random.PRNGKey(0))
    counts = denominators(batch, tuple(config.losses), get_task(config))
    unrolled_loss = sum(float(terms[n][0] / counts[n]) for n in config.losses)

    config.model.scan_layers = True
    mesh, state, step = setup(config, stack_layers(params))
    new_state, metrics = run(mesh, step, state, batch)
    assert np.isfinite(float(metrics["loss"])) and not int(metrics["nonfinite"])
    np.testing.assert_allclose(float(metrics["loss"]), unrolled_loss, rtol=1e-5)
    new = jax.device_get(new_state["params"])
    assert int(new_state["step"]) == 1 and is_stacked(new)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(new))


# ---- the checkpoint converters ------------------------------------------------------------------
def test_hf_imports_and_export_with_scan_layers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mtower_jax.convert import __main__ as convert_cli
    from mtower_jax.convert import hf_bridgetower, hf_roberta, to_hf_bridgetower
    from mtower_jax.models import model_config

    text = dict(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=128, max_position_embeddings=40)
    vision = dict(hidden_size=64, num_hidden_layers=3, patch_size=8, image_size=32)
    torch.manual_seed(0)
    config = transformers.BridgeTowerConfig(text_config=text, vision_config=vision,
                                            hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=2)
    reference = transformers.BridgeTowerForMaskedLM(config).eval()
    state_dict = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    cfg, variables = hf_bridgetower.convert(state_dict, config.to_dict())
    scan_cfg, scan_variables = hf_bridgetower.convert(state_dict, config.to_dict(),
                                                      scan_layers=True)
    assert scan_cfg.scan_layers and not cfg.scan_layers
    jax.tree.map(np.testing.assert_array_equal, scan_variables["params"],
                 stack_layers(variables["params"]))
    assert set(parameter_shapes(scan_cfg)) == set(
        traverse_util.flatten_dict(scan_variables["params"], sep="/"))
    exported, _ = to_hf_bridgetower.export(scan_variables["params"], scan_cfg)
    unused = {k for k in state_dict if "text_model.pooler." in k}
    assert set(exported) == set(state_dict) - unused
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)

    roberta = transformers.RobertaModel(transformers.RobertaConfig(**text))
    roberta_sd = {k: v.detach().numpy() for k, v in roberta.state_dict().items()}
    target = model_config("tiny", "meter")
    _, plain = hf_roberta.convert(roberta_sd, roberta.config.to_dict(), target)
    target.scan_layers = True
    _, stacked = hf_roberta.convert(roberta_sd, roberta.config.to_dict(), target)
    assert "layers" in stacked["params"]["backbone"]["text_encoder"]
    jax.tree.map(np.testing.assert_array_equal, stacked, stack_layers(plain))
    roberta.save_pretrained(tmp_path)  # the CLI's --scan_layers
    cli_cfg, cli = convert_cli.convert("hf_roberta", str(tmp_path), None, "tiny",
                                       scan_layers=True)
    assert cli_cfg.scan_layers
    jax.tree.map(np.testing.assert_array_equal, cli, stacked)


def test_official_checkpoint_round_trip_with_scan_layers():
    from mtower_jax.convert import official_ckpt

    cfg = tiny_config("manager")
    params = random_variables(cfg, seed=4)["params"]
    state_dict = official_ckpt.export(params, cfg)
    np.testing.assert_equal(official_ckpt.export(stack_layers(params), cfg), state_dict)
    scan_cfg, variables = official_ckpt.convert(state_dict, cfg, scan_layers=True)
    assert scan_cfg.scan_layers
    jax.tree.map(np.testing.assert_array_equal, variables["params"], stack_layers(params))
