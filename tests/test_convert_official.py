"""The official ManagerTower / BridgeTower Lightning checkpoints -> ours.

The reference is a small torch replica of the official model, transcribed from the official code
(LooperXX/ManagerTower src/modules/{mt_module,heads,bert_model}.py, microsoft/BridgeTower
src/modules/{bt_module,heads,clip_model}.py) with HF's RobertaModel as its text tower, so
its `state_dict()` has the official key names and its forward the official math. Checked: every
key maps (or is on the documented drop list), problems are reported together by name, official ->
ours -> official is exact, the managers and the whole forward agree, and the CLI reads a .ckpt.
"""
from __future__ import annotations

import collections
import functools
import json
import math
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from torch import nn

from mtower_jax.convert import official_ckpt
from mtower_jax.convert.keymap import ConversionError
from mtower_jax.models import build_model
from mtower_jax.models.heads import HEADS
from mtower_jax.models.layers import standardise
from mtower_jax.models.managers import make_manager

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, L, D, N = 2, 12, 64, 3  # batch, text length, width of every tower, managed layers
TEXT_LAYERS, VISION_LAYERS, CROSS_LAYERS, PATCH, IMAGE, VOCAB = 4, 4, 3, 8, 32, 120
HPARAMS = dict(tokenizer="roberta-base", vit="CLIP-ViT-B/16", hidden_size=D, num_heads=2,
               num_layers=CROSS_LAYERS, mlp_ratio=2, max_text_len=L, drop_rate=0.1,
               temperature=0.07, contrastive_hidden_size=16, vqav2_label_size=7,
               head_hidden_scale=2, managed_layers_text=N, managed_layers_image=N,
               manager_softmax_temperature=1.0, manager_softmax_temperature_learnable=True)


# ---- the official modules, transcribed --------------------------------------------------------
class LayerAttention(nn.Module):  # bert_model.LayerAttention, one head
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, query, key):
        return self.q_proj(query) @ self.k_proj(key).transpose(-1, -2) / math.sqrt(D)


class _Aggregate(nn.Module):
    def aggregate_reps(self, layer_scores, reps):  # eval: no noise
        layer_scores = torch.cat((
            torch.softmax(layer_scores[:, :N] / self.softmax_temperature, dim=1),
            layer_scores[:, N:]), dim=1)
        return torch.sum(layer_scores * reps, dim=1)

    def norm_all(self, hidden_states):
        return torch.stack([self.LayerNorm[i](hidden_states[:, i]) for i in range(N)], dim=1)


class SAUE(_Aggregate):
    def __init__(self, layer_index, vector):
        super().__init__()
        self.layer_index = layer_index
        previous = 0 if layer_index == 0 else 1
        scores = torch.full((N + previous,), 1 / N)
        scores[N:] = 1.0
        scores = scores[None, :, None, None]
        self.layer_scores = nn.Parameter(scores.repeat(1, 1, 1, D) if vector else scores)
        self.LayerNorm = nn.ModuleList([nn.LayerNorm(D) for _ in range(N + previous)])
        self.softmax_temperature = nn.Parameter(torch.ones(1))
        self.softmax_temperature_cross = nn.Parameter(torch.ones(1))

    def forward(self, hidden_states, cross_modal_hidden_states, extra_query=None):
        hidden_states = self.norm_all(hidden_states)
        if self.layer_index == 0:
            return self.aggregate_reps(self.layer_scores, hidden_states)
        cross = self.LayerNorm[N](cross_modal_hidden_states).unsqueeze(1)
        return self.aggregate_reps(self.layer_scores, torch.cat((hidden_states, cross), dim=1))


class AAUE(_Aggregate):
    def __init__(self, vector):
        super().__init__()
        self.vector = vector
        cross = torch.ones(1, 1, 1, 1)
        self.layer_scores_cross = nn.Parameter(cross.repeat(1, 1, 1, D) if vector else cross)
        self.linear_controller = nn.Linear(2 * D, N)
        self.fusion_attention = LayerAttention()
        self.LayerNorm = nn.ModuleList([nn.LayerNorm(D) for _ in range(N + 1)])
        self.extra_query_LayerNorm = nn.LayerNorm(D)
        self.softmax_temperature = nn.Parameter(torch.ones(1))
        self.softmax_temperature_cross = nn.Parameter(torch.ones(1))

    def forward(self, hidden_states, cross_modal_hidden_states, extra_query):
        hidden_states = self.norm_all(hidden_states)
        extra_query = self.extra_query_LayerNorm(extra_query)
        c = self.LayerNorm[N](cross_modal_hidden_states)
        fused_query = torch.cat((torch.softmax(self.fusion_attention(c, extra_query), dim=-1)
                                 @ extra_query, c), dim=-1)
        scores = self.linear_controller(fused_query).transpose(1, 2).unsqueeze(-1)
        if self.vector:
            scores = scores.expand(-1, -1, -1, D)
        scores = torch.cat((scores, self.layer_scores_cross.expand(
            scores.shape[0], -1, scores.shape[2], -1)), dim=1)
        return self.aggregate_reps(scores, torch.cat((hidden_states, c.unsqueeze(1)), dim=1))


class Manager(nn.Module):
    def __init__(self, manager_type, layer_index, vector):
        super().__init__()
        aaue = manager_type == "AAUE" and layer_index > 0
        self.manager_layer = AAUE(vector) if aaue else SAUE(layer_index, vector)

    def forward(self, *args):
        return self.manager_layer(*args)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):  # clip_model.py
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, D // 64)
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mlp = nn.Sequential(collections.OrderedDict([
            ("c_fc", nn.Linear(D, 4 * D)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * D, D))]))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, D, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((IMAGE // PATCH) ** 2 + 1, D) * 0.1)
        self.ln_pre, self.ln_post = nn.LayerNorm(D), nn.LayerNorm(D)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ResidualAttentionBlock()
                                                     for _ in range(VISION_LAYERS)])

    def forward_pre(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, D)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding).permute(1, 0, 2)

    def forward_post(self, x):
        return self.ln_post(x.permute(1, 0, 2))


class CLIP(nn.Module):  # what the official build_model keeps: the visual tower + 2 text leftovers
    def __init__(self):
        super().__init__()
        self.visual = VisualTransformer()
        self.positional_embedding = nn.Parameter(torch.randn(7, D) * 0.01)
        self.ln_final = nn.LayerNorm(D)


class BertAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self, self.output = nn.Module(), nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.self, name, nn.Linear(D, D))
        self.output.dense, self.output.LayerNorm = nn.Linear(D, D), nn.LayerNorm(D, eps=1e-12)

    def forward(self, x, kv, additive_mask):
        heads = HPARAMS["num_heads"]
        split = lambda t: t.view(t.shape[0], -1, heads, D // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.self.query(x)), split(self.self.key(kv)), split(self.self.value(kv))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads) + additive_mask, -1)
        context = (probs @ v).transpose(1, 2).reshape(x.shape)
        return self.output.LayerNorm(self.output.dense(context) + x)


class BertCrossLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.crossattention = BertAttention(), BertAttention()
        self.intermediate, self.output = nn.Module(), nn.Module()
        self.intermediate.dense = nn.Linear(D, 2 * D)
        self.output.dense, self.output.LayerNorm = nn.Linear(2 * D, D), nn.LayerNorm(D, eps=1e-12)

    def forward(self, x, other, mask, other_mask):
        x = self.crossattention(self.attention(x, x, mask), other, other_mask)
        h = nn.functional.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


def linear_head(name, d_in, d_out):
    head = nn.Module()
    setattr(head, name, nn.Linear(d_in, d_out))
    return head


def classifier(d_in, classes):
    hidden = int(2 * D * HPARAMS["head_hidden_scale"])
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, classes))


class Official(nn.Module):
    """MTTransformer / BTTransformer, the parameters of their __init__ and the eval `infer`."""

    def __init__(self, tower, heads, manager_type="AAUE", vector=True, link="add"):
        super().__init__()
        self.tower = tower
        self.text_transformer = transformers.RobertaModel(transformers.RobertaConfig(
            vocab_size=VOCAB, hidden_size=D, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
            intermediate_size=2 * D, max_position_embeddings=40, layer_norm_eps=1e-5))
        self.vit_model = CLIP()
        self.cross_modal_text_transform = nn.Linear(D, D)
        self.cross_modal_image_transform = nn.Linear(D, D)
        self.token_type_embeddings = nn.Embedding(3 if "nlvr2" in heads else 2, D)
        for stream in ("text", "image"):
            setattr(self, f"cross_modal_{stream}_layers",
                    nn.ModuleList([BertCrossLayer() for _ in range(CROSS_LAYERS)]))
            setattr(self, f"cross_modal_{stream}_pooler", linear_head("dense", D, D))
            if tower == "manager":
                setattr(self, f"layer_embeddings_{stream}", nn.Embedding(TEXT_LAYERS, D))
                setattr(self, f"cross_modal_{stream}_manager_tower", nn.ModuleList(
                    [Manager(manager_type, i, vector) for i in range(CROSS_LAYERS)]))
            else:
                setattr(self, f"cross_modal_{stream}_layernorm", nn.LayerNorm(D))
                towers = nn.ModuleList([nn.Module() for _ in range(CROSS_LAYERS - 1)])
                for t in towers:  # heads.LinkTower (+ an HF-style scalar for the other types)
                    t.LayerNorm = nn.LayerNorm(D)
                    if link == "scaled_add":
                        t.scaled_factor = nn.Parameter(torch.tensor(1.0))
                setattr(self, f"cross_modal_{stream}_link_tower", towers)
        self.temperature = nn.Parameter(torch.ones([]) * HPARAMS["temperature"])
        if "mlm" in heads:
            self.mlm_score = nn.Module()
            self.mlm_score.transform = linear_head("dense", D, D)
            self.mlm_score.transform.LayerNorm = nn.LayerNorm(D, eps=1e-12)
            self.mlm_score.decoder = nn.Linear(D, VOCAB, bias=False)
            self.mlm_score.bias = nn.Parameter(torch.zeros(VOCAB))
        if "itm" in heads:
            self.itm_score = linear_head("fc", 2 * D, 2)
        if "itc" in heads:
            itc = "cross_modal_itc_" if tower == "manager" else "itc_"
            for stream in ("text", "image"):
                setattr(self, f"{itc}{stream}_head",
                        linear_head("fc", D, HPARAMS["contrastive_hidden_size"]))
        if "vqa" in heads:
            self.vqa_classifier = classifier(2 * D, HPARAMS["vqav2_label_size"])
        if "snli_ve" in heads:
            self.snli_classifier = classifier(2 * D, 3)
        if "nlvr2" in heads:
            self.nlvr2_classifier = classifier(4 * D, 2)

    def infer(self, ids, mask, pixels):
        """mt_module.infer (eval): the manager tower's cross-modal forward, and the ITC features."""
        text = self.text_transformer(input_ids=ids, attention_mask=mask,
                                     output_hidden_states=True).hidden_states[1:]
        visual = self.vit_model.visual
        x, image = visual.forward_pre(pixels), []
        for block in visual.transformer.resblocks:
            x = block(x)
            image.append(visual.forward_post(x))
        types = self.token_type_embeddings.weight
        texts = (self.cross_modal_text_transform(torch.stack(text[-N:], dim=1)) + types[0]
                 + self.layer_embeddings_text.weight[TEXT_LAYERS - N:][None, :, None, :])
        images = (self.cross_modal_image_transform(torch.stack(image[-N:], dim=1)) + types[1]
                  + self.layer_embeddings_image.weight[VISION_LAYERS - N:][None, :, None, :])
        text_mask = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        image_mask = torch.zeros(1)
        for i in range(CROSS_LAYERS):
            tm, im = self.cross_modal_text_manager_tower[i], self.cross_modal_image_manager_tower[i]
            if i == 0:
                x_, y_ = tm(texts, 0), im(images, 0)
            else:
                x_, y_ = tm(texts, x, y), im(images, y, x)
            x = self.cross_modal_text_layers[i](x_, y_, text_mask, image_mask)
            y = self.cross_modal_image_layers[i](y_, x_, image_mask, text_mask)
        pool = lambda p, f: torch.tanh(p.dense(f[:, 0]))  # noqa: E731
        cls = torch.cat([pool(self.cross_modal_text_pooler, x),
                         pool(self.cross_modal_image_pooler, y)], dim=-1)
        itc = lambda h, f: nn.functional.normalize(h.fc(f[:, 0]), dim=-1)  # noqa: E731
        return dict(text_feats=x, image_feats=y, cls_feats=cls,
                    mlm_logits=self.mlm_score.decoder(self.mlm_score.transform.LayerNorm(
                        nn.functional.gelu(self.mlm_score.transform.dense(x))))
                    + self.mlm_score.bias,
                    itm_logits=self.itm_score.fc(cls),
                    itc_text_embeds=itc(self.cross_modal_itc_text_head, text[-1]),
                    itc_image_embeds=itc(self.cross_modal_itc_image_head, image[-1]))


def official_state_dict(module: nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Every parameter off its init (a round trip or parity check could not tell a LayerNorm
    scale from a bias otherwise), plus the position_ids buffer older transformers saved."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    sd = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    sd["text_transformer.embeddings.position_ids"] = np.arange(40)[None]
    return sd


CASES = {  # name: (Official arguments, heads)
    "manager-AAUE-vector": (dict(tower="manager"), ("mlm", "itm", "itc")),
    "manager-AAUE-scalar": (dict(tower="manager", vector=False), ("nlvr2", "snli_ve")),
    "manager-SAUE-vector": (dict(tower="manager", manager_type="SAUE"), ("itm",)),
    "manager-SAUE-scalar": (dict(tower="manager", manager_type="SAUE", vector=False), ("vqa",)),
    "bridge-add": (dict(tower="bridge"), ("mlm", "itm", "itc")),
    "bridge-scaled_add": (dict(tower="bridge", link="scaled_add"), ()),
}


@functools.cache
def case(name: str):
    """(official module, its state dict, model_cfg, variables) of a CASES entry."""
    kwargs, heads = CASES[name]
    torch.manual_seed(0)
    module = Official(heads=heads, **kwargs).eval()
    sd = official_state_dict(module, seed=1)
    model_cfg, variables = official_ckpt.convert(sd, hparams={"config": HPARAMS})
    return module, sd, model_cfg, variables


def dropped(sd: dict) -> set[str]:
    """The keys the converter is documented to drop, named here independently."""
    leftovers = {"text_transformer.embeddings.position_ids", "vit_model.positional_embedding",
                 "vit_model.ln_final.weight", "vit_model.ln_final.bias",
                 "text_transformer.pooler.dense.weight", "text_transformer.pooler.dense.bias"}
    return (leftovers | {k for k in sd if k.endswith("softmax_temperature_cross")}
            | ({"temperature"} if not any("itc_text_head" in k for k in sd) else set()))


@pytest.mark.parametrize("name", list(CASES))
def test_config_from_the_tensors_and_exact_round_trip(name):
    kwargs, heads = CASES[name]
    _, sd, model_cfg, variables = case(name)
    c = model_cfg
    assert c.tower == kwargs["tower"] and set(c.heads) == set(heads)
    assert (c.text.num_layers, c.vision.num_layers, c.cross.num_layers) == (4, 4, 3)
    assert c.text.num_heads == D // 64 and c.vision.num_heads == D // 64  # official defaults
    assert c.cross.num_heads == HPARAMS["num_heads"] and c.max_text_len == L
    assert c.vision.image_size == IMAGE and c.vision.patch_size == PATCH
    assert c.num_token_types == (3 if "nlvr2" in heads else 2)
    if c.tower == "manager":
        assert c.manager.type == kwargs.get("manager_type", "AAUE")
        assert c.manager.weight_type == ("vector" if kwargs.get("vector", True) else "scalar")
        assert c.manager.num_layers == N
    else:
        assert c.bridge.type == kwargs.get("link", "add")
    if "vqa" in heads:
        assert c.vqa_num_answers == HPARAMS["vqav2_label_size"]
    if heads and set(heads) & {"vqa", "snli_ve", "nlvr2"}:
        assert c.head_hidden_scale == HPARAMS["head_hidden_scale"]
    if "itc" in heads:
        assert c.itc_dim == HPARAMS["contrastive_hidden_size"]
        assert float(variables["params"]["itc_head"]["temperature"]) == sd["temperature"]

    exported = official_ckpt.export(variables["params"], model_cfg)
    assert set(exported) == set(sd) - dropped(sd)
    for key, value in exported.items():
        assert value.shape == sd[key].shape, key
        np.testing.assert_array_equal(value, sd[key], err_msg=key)
    # The exported dict loads into the official module with only the dropped keys missing.
    missing, unexpected = case(name)[0].load_state_dict(
        {k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)
    assert set(missing) == dropped(sd) - {"text_transformer.embeddings.position_ids"}
    assert not unexpected


def test_every_problem_is_reported_together():
    _, sd, _, _ = case("manager-AAUE-vector")
    broken = dict(sd)
    m = "cross_modal_image_manager_tower.2.manager_layer."
    del broken[f"{m}LayerNorm.1.bias"]
    del broken["cross_modal_text_pooler.dense.weight"]
    broken["rank_output.weight"] = np.zeros((1, 2 * D), np.float32)
    broken["vit_model.visual.ln_separate.0.weight"] = np.ones(D, np.float32)
    broken[f"{m}linear_controller.weight"] = np.zeros((N + 1, 2 * D), np.float32)
    broken["cross_modal_text_manager_tower.1.manager_layer.layer_scores_cross"] = np.ones(
        (1, 2, 1, D), np.float32)
    with pytest.raises(ConversionError) as info:
        official_ckpt.convert(broken, hparams={"config": HPARAMS})
    message = str(info.value)
    for expected in ("missing keys (2)", f"{m}LayerNorm.1.bias",
                     "cross_modal_text_pooler.dense.weight", "unexpected keys (2)",
                     "rank_output.weight", "vit_model.visual.ln_separate.0.weight",
                     "shape mismatches (2)", f"{m}linear_controller.weight (4, 128)",
                     "layer_scores_cross (1, 2, 1, 64)", "rank_output"):
        assert expected in message
    with pytest.raises(ConversionError, match="not an official ManagerTower / BridgeTower"):
        official_ckpt.convert({k: v for k, v in sd.items() if "manager_tower" not in k})
    with pytest.raises(ValueError, match="BERT text towers are not supported"):
        official_ckpt.convert(sd, hparams={"config": dict(HPARAMS, tokenizer="bert-base-uncased")})


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("manager")])
def test_managers_match_the_official_code(name):
    module, _, model_cfg, variables = case(name)
    rng = np.random.default_rng(0)
    for stream in ("text", "image"):
        tower = getattr(module, f"cross_modal_{stream}_manager_tower")
        params = variables["params"]["backbone"][f"{stream}_inputs"]
        for layer in range(CROSS_LAYERS):
            experts = rng.standard_normal((N, B, 5, D)).astype(np.float32)
            previous = rng.standard_normal((B, 5, D)).astype(np.float32)
            other = rng.standard_normal((B, 7, D)).astype(np.float32)
            # Our managers take the experts standardised (ManagerInputs.prepare does it once
            # for all of them); theirs apply whole LayerNorms.
            standardised = standardise(experts, model_cfg.manager.layer_norm_eps)
            ours, _ = make_manager(ml_collections.FrozenConfigDict(model_cfg.manager), layer).apply(
                {"params": params[f"managers_{layer}"]}, standardised, previous, other, False)
            with torch.no_grad():
                theirs = tower[layer](torch.from_numpy(experts).transpose(0, 1),
                                      torch.from_numpy(previous), torch.from_numpy(other))
            err = float(np.max(np.abs(np.asarray(ours) - theirs.numpy())))
            assert err <= 1e-5, f"{stream} manager {layer}: max abs difference {err:.2e}"


@pytest.mark.parametrize("name", ["manager-AAUE-scalar", "manager-SAUE-scalar"])
def test_classifier_heads_match_the_official_code(name):
    module, _, model_cfg, variables = case(name)
    frozen = ml_collections.FrozenConfigDict(model_cfg)
    for head, theirs in official_ckpt.CLASSIFIERS.items():
        if head not in model_cfg.heads:
            continue
        key = "cls_feats_pair" if head == "nlvr2" else "cls_feats"
        x = np.random.default_rng(1).standard_normal((B, 4 * D if head == "nlvr2" else 2 * D))
        x = x.astype(np.float32)
        ours = HEADS[head](frozen).apply({"params": variables["params"][f"{head}_head"]},
                                         {key: x}, False)
        with torch.no_grad():
            expected = getattr(module, theirs)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(next(iter(ours.values())), expected, atol=1e-5)


def test_manager_tower_forward_matches_the_official_code():
    module, sd, _, _ = case("manager-AAUE-vector")
    # The official text tower is RoBERTa's own (2 heads here; converting assumes hidden // 64).
    model_cfg, variables = official_ckpt.convert(sd, hparams={"config": HPARAMS},
                                                 **{"text.num_heads": 2})
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (B, L), generator=gen)
    ids[:, 0] = 0
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 7:], ids[1, 7:] = 0, 1  # a padded row
    pixels = torch.randn(B, 3, IMAGE, IMAGE, generator=gen)
    with torch.no_grad():
        theirs = module.infer(ids, mask, pixels)
    ours = build_model(model_cfg).apply(variables, input_ids=ids.numpy(),
                                        attention_mask=mask.numpy(),
                                        pixel_values=pixels.permute(0, 2, 3, 1).numpy())
    m = mask.numpy()[..., None]
    for key, value in theirs.items():
        expected, got = value.numpy(), np.asarray(ours[key])
        if key in ("text_feats", "mlm_logits"):
            expected, got = expected * m, got * m  # padded positions are garbage on both sides
        err = float(np.max(np.abs(got - expected)))
        assert err <= 1e-4, f"{key}: max abs difference {err:.2e}"


def test_cli_converts_a_lightning_ckpt(tmp_path):
    import orbax.checkpoint as ocp

    _, sd, _, _ = case("bridge-add")
    path = tmp_path / "BridgeTower_pt_base.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                "hyper_parameters": {"config": HPARAMS}, "epoch": 9,
                "pytorch-lightning_version": "1.5.10"}, path)
    result = subprocess.run([sys.executable, "-m", "mtower_jax.convert", "official_ckpt",
                             str(path), str(tmp_path / "out"), "--image_size=48"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = ml_collections.ConfigDict(json.loads((tmp_path / "out" / "model_config.json")
                                                 .read_text()))
    assert saved.tower == "bridge" and list(saved.heads) == ["mlm", "itm", "itc"]
    assert saved.cross.num_heads == HPARAMS["num_heads"] and saved.vision.image_size == 48
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "out" / "params")
    _, direct = official_ckpt.convert(sd, hparams={"config": HPARAMS}, image_size=48)
    jax.tree.map(np.testing.assert_array_equal, restored, direct["params"])
    assert restored["backbone"]["vision_encoder"]["position_embedding"].shape == (37, D)
