"""PyTorch checkpoints <-> ours: numerical parity against `transformers` (random reference
models, built locally), exact round trips, safe loading, clear errors, and the CLI."""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shlex
import subprocess
import sys
import warnings
import zipfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from mtower_jax.convert import checkpoint_files, hf_bridgetower, hf_clip_vision, hf_roberta
from mtower_jax.convert import position_embeddings, to_hf_bridgetower
from mtower_jax.convert import __main__ as convert_cli
from mtower_jax.convert.keymap import ConversionError
from mtower_jax.models import build_model
from mtower_jax.models.text_encoder import TextEncoder
from mtower_jax.models.vision_encoder import VisionEncoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
B, L = 3, 12
TEXT = dict(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=40)
VISION = dict(hidden_size=64, num_hidden_layers=3, patch_size=8, image_size=32)


def perturb_norms(module: torch.nn.Module, seed: int) -> None:
    """LayerNorms away from 1/0 and learnable link scalars away from their init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            lowered = name.lower()
            if "layernorm" in lowered or "ln_" in lowered or "layer_norm" in lowered \
                    or "pre_layrnorm" in lowered:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            if name.endswith(("scaled_factor", "beta")):
                p.add_(0.3)


def text_batch(vocab: int, pad: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=gen)
    ids[:, 0] = 0
    mask = torch.ones(B, L, dtype=torch.long)
    for row, length in enumerate((L, 7, 4)):  # padded rows
        mask[row, length:] = 0
        ids[row, length:] = pad
    return ids, mask


def pixels(size: int, seed: int = 1):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def np_state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def assert_close(ours, theirs, what: str, mask=None):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if mask is not None:  # padded text positions are garbage on both sides
        ours, theirs = ours * mask, theirs * mask
    assert ours.shape == theirs.shape, what
    err = float(np.max(np.abs(ours - theirs)))
    assert err <= TOL, f"{what}: max abs difference {err:.2e}"


CASES = {
    "model-add": (transformers.BridgeTowerModel, dict(link_tower_type="add")),
    "mlm-scaled_add": (transformers.BridgeTowerForMaskedLM, dict(link_tower_type="scaled_add")),
    "itm-interpolate": (transformers.BridgeTowerForImageAndTextRetrieval,
                        dict(link_tower_type="interpolate")),
    "mlm-unshared-transforms": (transformers.BridgeTowerForMaskedLM,
                                dict(share_cross_modal_transformer_layers=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_bridgetower_parity_and_exact_round_trip(case, tmp_path):
    cls, extra = CASES[case]
    torch.manual_seed(0)
    config = transformers.BridgeTowerConfig(text_config=TEXT, vision_config=VISION, hidden_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, **extra)
    reference = cls(config).eval()
    perturb_norms(reference, seed=1)
    state_dict = np_state_dict(reference)
    model_cfg, variables = hf_bridgetower.convert(state_dict, config.to_dict())
    assert model_cfg.bridge.type == config.link_tower_type
    assert model_cfg.share_transform == config.share_cross_modal_transformer_layers

    ids, mask = text_batch(TEXT["vocab_size"])
    images = pixels(VISION["image_size"])
    backbone = getattr(reference, "bridgetower", reference)
    with torch.no_grad():
        theirs = backbone(input_ids=ids, attention_mask=mask, pixel_values=images,
                          output_hidden_states=True)
        head_out = reference(input_ids=ids, attention_mask=mask, pixel_values=images)
    model_cfg.max_text_len = L
    ours = build_model(model_cfg).apply(variables, input_ids=ids.numpy(),
                                        attention_mask=mask.numpy(),
                                        pixel_values=images.permute(0, 2, 3, 1).numpy())
    m = mask.numpy()[..., None]
    assert_close(ours["text_feats"], theirs.text_features, "text_feats", m)
    assert_close(ours["image_feats"], theirs.image_features, "image_feats")
    assert_close(ours["cls_feats"], theirs.pooler_output, "cls_feats")
    text_states, image_states, cross_states = theirs.hidden_states
    for i, state in enumerate(text_states[1:]):
        assert_close(ours["text_hidden_states"][i], state, f"text layer {i}", m)
    for i, state in enumerate(image_states[1:]):  # HF keeps the vision tower in [L, B, D]
        assert_close(ours["image_hidden_states"][i], state.permute(1, 0, 2), f"vision layer {i}")
    for i, (text_state, image_state) in enumerate(cross_states):
        assert_close(ours["cross_text_hidden_states"][i], text_state, f"cross text {i}", m)
        assert_close(ours["cross_image_hidden_states"][i], image_state, f"cross image {i}")
    if "mlm" in model_cfg.heads:
        assert_close(ours["mlm_logits"], head_out.logits, "mlm_logits", m)
    if "itm" in model_cfg.heads:
        assert_close(ours["itm_logits"], head_out.logits, "itm_logits")

    # Export: every key HF has, bit for bit, except its unused text pooler.
    exported, hf_config = to_hf_bridgetower.export(variables["params"], model_cfg)
    unused = {k for k in state_dict if "text_model.pooler." in k}
    assert set(exported) == set(state_dict) - unused
    for key, value in exported.items():
        # Shapes too: assert_array_equal broadcasts, and HF refuses a [1] for a 0-d tensor.
        assert value.shape == state_dict[key].shape, key
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
    # As a user loads it: from the files save() writes, through HF's own loader.
    to_hf_bridgetower.save(variables["params"], model_cfg, str(tmp_path))
    rebuilt = np_state_dict(cls.from_pretrained(str(tmp_path)))
    for key in exported:
        np.testing.assert_array_equal(rebuilt[key], state_dict[key], err_msg=key)


def test_hf_contrastive_heads_map_onto_our_itc_head():
    # HF's image ITC head reads transform(ln_post(x)) + E_type[1]: folded into our projection of
    # ln_post(x). The cross-modal ITC head has no counterpart and must be dropped explicitly.
    torch.manual_seed(0)
    # logit_scale_init_value: read by ForContrastiveLearning, absent from transformers 5's config.
    config = transformers.BridgeTowerConfig(text_config=TEXT, vision_config=VISION, hidden_size=64,
                                            num_hidden_layers=2, num_attention_heads=2,
                                            contrastive_hidden_size=16,
                                            logit_scale_init_value=2.6592)
    reference = transformers.BridgeTowerForContrastiveLearning(config).eval()
    perturb_norms(reference, seed=4)
    with torch.no_grad():
        reference.logit_scale.fill_(3.0)
        reference.bridgetower.token_type_embeddings.weight.mul_(10.0)
    state_dict = np_state_dict(reference)
    with pytest.raises(ConversionError, match="drop_itc_cross_modal_head=True"):
        hf_bridgetower.convert(state_dict, config.to_dict())
    model_cfg, variables = hf_bridgetower.convert(state_dict, config.to_dict(),
                                                  drop_itc_cross_modal_head=True)
    assert model_cfg.heads == ("itc",) and model_cfg.itc_dim == 16

    ids, mask = text_batch(TEXT["vocab_size"])
    images = pixels(VISION["image_size"])
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, pixel_values=images)
    model_cfg.max_text_len = L
    ours = build_model(model_cfg).apply(variables, input_ids=ids.numpy(),
                                        attention_mask=mask.numpy(),
                                        pixel_values=images.permute(0, 2, 3, 1).numpy())
    assert_close(ours["itc_text_embeds"], theirs.text_embeds, "itc text embeddings")
    assert_close(ours["itc_image_embeds"], theirs.image_embeds, "itc image embeddings")
    np.testing.assert_allclose(1 / ours["itc_temperature"], np.exp(3.0), rtol=1e-6)
    # The image projection was composed with the image transform: no way back to HF's.
    with pytest.raises(ValueError, match=r"cannot take back: \['itc'\].*drop_heads=True"):
        to_hf_bridgetower.export(variables["params"], model_cfg)
    exported, _ = to_hf_bridgetower.export(variables["params"], model_cfg, drop_heads=True)
    assert not [k for k in exported if k.startswith(("itc", "logit_scale", "bridgetower."))]


def test_hf_clip_vision_parity_and_position_resize():
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256,
                                           num_hidden_layers=3, num_attention_heads=2,
                                           image_size=32, patch_size=8)
    reference = transformers.CLIPVisionModel(config).eval()
    perturb_norms(reference, seed=2)
    model_cfg, variables = hf_clip_vision.convert(np_state_dict(reference), config.to_dict(),
                                                  _small_model(), image_size=32)
    images = pixels(32)
    with torch.no_grad():
        theirs = reference(pixel_values=images, output_hidden_states=True)
    ours = VisionEncoder(ml_collections.FrozenConfigDict(model_cfg.vision)).apply(
        {"params": variables["params"]["backbone"]["vision_encoder"]},
        images.permute(0, 2, 3, 1).numpy(), False, 1)
    # HF's hidden_states[i] is the input of layer i; its last one is the top layer's output.
    for i, state in enumerate(theirs.hidden_states[1:]):
        assert_close(ours["hidden_states"][i], state, f"vision layer {i}")
    # HF applies post_layernorm to the class token only (its pooler_output).
    assert_close(ours["outputs"][0][:, 0], theirs.pooler_output, "class token after ln_post")

    # 32 px -> 48 px: the grid goes 4x4 -> 6x6 like torch's bicubic interpolate.
    model_cfg, variables = hf_clip_vision.convert(np_state_dict(reference), config.to_dict(),
                                                  _small_model(), image_size=48)
    table = torch.from_numpy(np_state_dict(reference)["embeddings.position_embedding.weight"])
    grid = table[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic",
                                               align_corners=False)
    expected = torch.cat([table[:1], expected.permute(0, 2, 3, 1).reshape(36, 64)])
    resized = variables["params"]["backbone"]["vision_encoder"]["position_embedding"]
    np.testing.assert_allclose(resized, expected.numpy(), atol=1e-5)
    assert model_cfg.vision.image_size == 48


def clip_vision_in_both_layouts() -> tuple[dict, dict, transformers.CLIPVisionConfig]:
    """(HF CLIPVisionModel state dict, the same weights in OpenAI's layout, the config)."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256,
                                           num_hidden_layers=2, num_attention_heads=1,
                                           image_size=32, patch_size=8)
    sd = np_state_dict(transformers.CLIPVisionModel(config))
    v = ""  # transformers 5 keys CLIPVisionModel without the vision_model. prefix
    openai = {"visual.conv1.weight": sd[f"{v}embeddings.patch_embedding.weight"],
              "visual.class_embedding": sd[f"{v}embeddings.class_embedding"],
              "visual.positional_embedding": sd[f"{v}embeddings.position_embedding.weight"],
              "visual.proj": np.zeros((64, 32), np.float32)}
    for ours_name, theirs_name in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            openai[f"visual.{ours_name}.{p}"] = sd[f"{v}{theirs_name}.{p}"]
    for i in range(2):
        h, o = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            openai[f"{o}attn.in_proj_{p}"] = np.concatenate(
                [sd[f"{h}self_attn.{n}_proj.{p}"] for n in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                         ("ln_2", "layer_norm2")):
                openai[f"{o}{a}.{p}"] = sd[f"{h}{b}.{p}"]
    return sd, openai, config


def test_openai_clip_layout_matches_hf_layout():
    # The same weights in both layouts convert to the same parameters.
    sd, openai, config = clip_vision_in_both_layouts()
    _, from_hf = hf_clip_vision.convert(sd, config.to_dict(), _small_model(), 32)
    cfg, from_openai = hf_clip_vision.convert(openai, None, _small_model(), 32)
    assert cfg.vision.num_heads == 1 and cfg.vision.num_layers == 2
    jax.tree.map(np.testing.assert_array_equal, from_hf, from_openai)


def save_torchscript(state_dict: dict, path, dtype=torch.float16, edit=lambda module: None
                     ) -> dict:
    """Writes a TorchScript module whose state_dict is `state_dict`, as OpenAI's CLIP .pt
    files are (torch.jit.save archives of float16 weights), after `edit(module)`; returns the
    saved state dict as float32 numpy."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *parents, name = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value).to(dtype)))
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the archives remain
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(root)
        edit(module)
        torch.jit.save(module, str(path))
    return {k: v.float().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_openai_clip_torchscript_archive_reads_as_tensors_without_its_code(tmp_path, dtype):
    _, openai, _ = clip_vision_in_both_layouts()

    def strided(module):  # a view into a larger storage, with a stride: saved as such
        with torch.no_grad():
            getattr(module.visual.transformer.resblocks, "0").ln_1.weight.set_(
                torch.arange(192, dtype=dtype).reshape(64, 3)[:, 1])

    expected = save_torchscript(openai, tmp_path / "ViT-B-16.pt", dtype, strided)
    loaded = checkpoint_files.load_state_dict(str(tmp_path / "ViT-B-16.pt"))
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    _, converted = hf_clip_vision.convert(loaded, None, _small_model(), 32)
    _, direct = hf_clip_vision.convert(expected, None, _small_model(), 32)
    jax.tree.map(np.testing.assert_array_equal, converted, direct)


def test_a_torchscript_archive_whose_pickle_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    save_torchscript({"visual.proj": np.zeros((2, 2), np.float32)}, path)
    with zipfile.ZipFile(path) as archive:  # the same archive, its data.pkl replaced
        records = {n: archive.read(n) for n in archive.namelist()}
    data = next(n for n in records if n.endswith("/data.pkl"))
    records[data] = pickle.dumps(WritesMarker(marker), protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in records.items():
            archive.writestr(name, content)
    with pytest.raises(checkpoint_files.UnsafeCheckpointError,
                       match=r"TorchScript archive .*needs posix.system"):
        checkpoint_files.load_state_dict(str(path))
    assert not marker.exists()


def test_hf_roberta_parity():
    torch.manual_seed(0)
    config = transformers.RobertaConfig(**TEXT)
    reference = transformers.RobertaModel(config).eval()
    perturb_norms(reference, seed=3)
    model_cfg, variables = hf_roberta.convert(np_state_dict(reference), config.to_dict(),
                                              _small_model())
    ids, mask = text_batch(TEXT["vocab_size"])
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ours = TextEncoder(ml_collections.FrozenConfigDict(model_cfg.text)).apply(
        {"params": variables["params"]["backbone"]["text_encoder"]},
        ids.numpy(), mask.numpy(), False, 1)
    m = mask.numpy()[..., None]
    for i, state in enumerate(theirs.hidden_states[1:]):
        assert_close(ours["hidden_states"][i], state, f"text layer {i}", m)


def _small_model():
    """The tiny model, as the target of uni-modal conversions (its tower does not matter)."""
    from mtower_jax.models import model_config
    return model_config("tiny", "meter")


def test_mismatched_state_dict_lists_every_problem():
    torch.manual_seed(0)
    config = transformers.BridgeTowerConfig(text_config=TEXT, vision_config=VISION,
                                            hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=2)
    sd = np_state_dict(transformers.BridgeTowerModel(config))
    del sd["cross_modal_text_pooler.dense.bias"]
    del sd["vision_model.visual.ln_post.weight"]
    sd["surprise.weight"] = np.zeros(3, np.float32)
    sd["token_type_embeddings.weight"] = np.zeros((2, 32), np.float32)
    with pytest.raises(ConversionError) as info:
        hf_bridgetower.convert(sd, config.to_dict())
    message = str(info.value)
    for expected in ("missing keys (2)", "cross_modal_text_pooler.dense.bias",
                     "vision_model.visual.ln_post.weight", "unexpected keys (1)",
                     "surprise.weight", "shape mismatches (1)",
                     "token_type_embeddings.weight (2, 32)"):
        assert expected in message


class WritesMarker:
    """Unpickling this runs os.system, which creates `marker`: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("name, layout", [
    ("evil.ckpt", "lightning hparams"), ("evil.pt", "lightning extra"), ("evil.pth", "bare"),
    ("evil.bin", "bare"), ("hf_dir/pytorch_model.bin", "bare")])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path, capsys, name, layout):
    marker = tmp_path / "code_ran"
    payload, weights = WritesMarker(marker), {"w": torch.zeros(2)}
    content = {"lightning hparams": {"state_dict": weights, "hyper_parameters": {"c": payload}},
               "lightning extra": {"state_dict": weights, "payload": payload},
               "bare": dict(weights, payload=payload)}[layout]
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    torch.save(content, path)
    src = str(path.parent if name.startswith("hf_dir") else path)  # a directory is accepted
    for load in (checkpoint_files.load_state_dict, checkpoint_files.load_lightning_checkpoint):
        with pytest.raises(checkpoint_files.UnsafeCheckpointError,
                           match=r"it imports posix.system\), and checkpoints are never allowed"):
            load(src)
    for source_format in ("official_ckpt", "hf_roberta"):  # the converter CLI's entry point
        assert convert_cli.main([source_format, src, str(tmp_path / "out")]) == 1
        assert "never allowed to run code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load does run the payload
    assert marker.exists()


def test_plain_checkpoints_load_and_garbage_is_a_clear_error(tmp_path):
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, plain)
    np.testing.assert_array_equal(checkpoint_files.load_state_dict(str(plain))["w"], [1.0, 1.0])
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    safetensors = tmp_path / "model.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(safetensors))
    for path in (plain, legacy, safetensors):
        valid = path.read_bytes()
        for damaged in (b"", b"garbage", valid[:len(valid) // 2], valid[:60] + b"\xff" * 16
                        + valid[76:]):
            path.write_bytes(damaged)
            # A damaged legacy (bare pickle) file may name a global the reader refuses.
            error = (ValueError if path == legacy else checkpoint_files.UnreadableCheckpointError)
            with pytest.raises(error, match=f"{re.escape(str(path))} (is not a readable "
                                            f"checkpoint: truncated, damaged|needs pickled code)"):
                checkpoint_files.load_state_dict(str(path))


def test_bicubic_resize_matches_torch():
    grid = np.random.default_rng(0).standard_normal((7, 7, 5)).astype(np.float32)
    for size in (4, 7, 12, 18):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(grid).permute(2, 0, 1)[None], size=(size, size), mode="bicubic",
            align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(position_embeddings.bicubic_resize(grid, size), expected,
                                   atol=1e-5)


def test_convert_cli_writes_orbax_params_and_config(tmp_path):
    import orbax.checkpoint as ocp

    torch.manual_seed(0)
    config = transformers.BridgeTowerConfig(text_config=TEXT, vision_config=VISION,
                                            hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=2)
    reference = transformers.BridgeTowerForMaskedLM(config)
    reference.save_pretrained(tmp_path / "hf")
    result = subprocess.run([sys.executable, "-m", "mtower_jax.convert", "hf_bridgetower",
                             str(tmp_path / "hf"), str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved_cfg = ml_collections.ConfigDict(
        __import__("json").loads((tmp_path / "out" / "model_config.json").read_text()))
    assert saved_cfg.tower == "bridge" and list(saved_cfg.heads) == ["mlm"]
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "out" / "params")
    _, direct = hf_bridgetower.convert(np_state_dict(reference), config.to_dict())
    jax.tree.map(np.testing.assert_array_equal, restored, direct["params"])

    missing = subprocess.run([sys.executable, "-m", "mtower_jax.convert", "hf_roberta",
                              str(tmp_path / "nowhere.safetensors"), str(tmp_path / "o2")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_towers_converted_apart_initialise_one_model_and_out_is_never_overwritten(tmp_path,
                                                                                  capsys):
    """The README's recipe for a fresh model: RoBERTa and CLIP converted into two
    directories, loaded together by init_from=DIR1,DIR2; a converter refuses an OUT that
    already holds params, and a config.json of another model type."""
    import flax.linen as nn

    from mtower_jax.models import model_config
    from mtower_jax.models.inputs import random_inputs
    from mtower_jax.train.init_from import InitFromError, load_init_params

    torch.manual_seed(0)
    transformers.RobertaModel(transformers.RobertaConfig(**TEXT)).save_pretrained(
        tmp_path / "hf_roberta")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1,
        image_size=32, patch_size=8)).save_pretrained(tmp_path / "hf_clip")
    roberta, clip = tmp_path / "roberta", tmp_path / "clip"
    assert convert_cli.main(["hf_roberta", str(tmp_path / "hf_roberta"), str(roberta),
                             "--model=tiny"]) == 0
    assert convert_cli.main(["hf_clip_vision", str(tmp_path / "hf_clip"), str(clip),
                             "--model=tiny"]) == 0
    capsys.readouterr()

    # A second conversion into the same OUT is refused before anything is read or written.
    before = sorted(p.name for p in (roberta / "params").iterdir())
    assert convert_cli.main(["hf_clip_vision", str(tmp_path / "hf_clip"), str(roberta),
                             "--model=tiny"]) == 1
    assert "already holds converted params" in capsys.readouterr().err
    assert sorted(p.name for p in (roberta / "params").iterdir()) == before
    (tmp_path / "a_file").write_text("")
    assert convert_cli.main(["hf_roberta", str(tmp_path / "hf_roberta"),
                             str(tmp_path / "a_file"), "--model=tiny"]) == 1
    assert "is a file" in capsys.readouterr().err
    # The wrong converter for a checkpoint names its model type and the right one.
    assert convert_cli.main(["hf_bridgetower", str(tmp_path / "hf_roberta"),
                             str(tmp_path / "x")]) == 1
    assert "is a 'roberta' model, and hf_bridgetower reads 'bridgetower'; convert it with " \
           "hf_roberta" in capsys.readouterr().err

    # One model: the text tower from one directory, the vision tower from the other.
    cfg = model_config("tiny")
    cfg.text = ml_collections.ConfigDict(json.loads((roberta / "model_config.json").read_text())
                                         )["text"]
    cfg.vision = ml_collections.ConfigDict(json.loads((clip / "model_config.json").read_text())
                                           )["vision"]
    fresh = jax.device_get(nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0),
                                                          **random_inputs(cfg, 2))["params"]))
    params = load_init_params(f"{roberta},{clip}", fresh)
    with ocp.StandardCheckpointer() as checkpointer:
        for directory, tower in ((roberta, "text_encoder"), (clip, "vision_encoder")):
            saved = checkpointer.restore(directory / "params")["backbone"][tower]
            jax.tree.map(np.testing.assert_array_equal, params["backbone"][tower], saved)
    jax.tree.map(np.testing.assert_array_equal, params["backbone"]["text_inputs"],
                 fresh["backbone"]["text_inputs"])  # the managers start fresh
    with pytest.raises(InitFromError, match="text_encoder/.* is in both .*roberta and "
                                            ".*roberta; give each parameter one source"):
        load_init_params(f"{roberta},{roberta}", fresh)
