"""The optimizer recipe and the pure train step: schedule, groups, decay mask, gradient
accumulation equivalence, overfitting one batch, the non-finite guard."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import random_variables, tiny_config
from configs.pretrain import get_config
from mtower_jax.data.masking import IGNORE
from mtower_jax.models import build_model
from mtower_jax.models.inputs import random_inputs
from mtower_jax.models.partitioning import DEFAULT_RULES
from mtower_jax.train import mesh as mesh_lib
from mtower_jax.train.optimizer import (decay_mask, group_labels, learning_rate_schedule,
                                        make_optimizer)
from mtower_jax.train.state import create_train_state
from mtower_jax.train.step import make_train_step


def small_config(layers: int = 2, **overrides):
    """Tiny, made shallower (`layers` per encoder and cross-modal stack, as many managed)
    so each jitted step compiles in seconds; dropout off so that updates are deterministic
    functions of the batch (manager noise off too)."""
    config = get_config("model=tiny")
    config.unlock()
    config.model = tiny_config("manager", **{
        "text.num_layers": layers, "vision.num_layers": layers, "cross.num_layers": layers,
        "manager.num_layers": layers, "manager.noise": False,
        "text.dropout": 0.0, "text.attention_dropout": 0.0,
        "cross.dropout": 0.0, "cross.attention_dropout": 0.0})
    config.batch_size, config.total_steps = 8, 100
    for key, value in overrides.items():
        config[key] = value
    return config


def make_batch(cfg, batch_size: int = 8, seed: int = 0) -> dict:
    """A pretraining batch with dataset-drawn ITM negatives (deterministic labels)."""
    rng = np.random.default_rng(seed)
    batch = random_inputs(cfg, batch_size, seed)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    maskable = (mask == 1) & (np.arange(ids.shape[1]) > 0)
    selected = maskable & (rng.random(ids.shape) < 0.3)
    batch.update(mlm_input_ids=np.where(selected, 4, ids).astype(np.int32),
                 mlm_labels=np.where(selected, ids, IGNORE).astype(np.int32),
                 record_index=np.arange(batch_size, dtype=np.int32),
                 itm_labels=(np.arange(batch_size) % 2).astype(np.int32))
    batch["itm_pixel_values"] = np.where(batch["itm_labels"][:, None, None, None] == 1,
                                         batch["pixel_values"],
                                         np.roll(batch["pixel_values"], 1, axis=0))
    return batch


def setup(config, params):
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        model, tx, _, init = create_train_state(config, mesh)
        state = init(params)
        step = jax.jit(make_train_step(config, model, tx))
    return mesh, state, step


def run(mesh, step, state, batch, rng_seed=0):
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        return step(state, mesh_lib.global_batch(batch, mesh), jax.random.PRNGKey(rng_seed))


def test_schedule_warms_up_linearly_then_decays_to_zero():
    schedule = learning_rate_schedule(1e-3, total_steps=100, warmup_fraction=0.1)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 55, 100)],
                               [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_groups_decay_mask_and_multipliers():
    config = small_config()
    params = random_variables(config.model)["params"]
    labels = traverse_util.flatten_dict(group_labels(params), sep="/")
    assert labels["backbone/text_encoder/layer_0/mlp/intermediate/kernel"] == "uni_modal"
    assert labels["backbone/vision_encoder/patch_embedding/kernel"] == "uni_modal"
    assert labels["backbone/text_cross_layers_0/attention/query/kernel"] == "cross_modal"
    assert labels["backbone/text_inputs/managers_1/controller/kernel"] == "cross_modal"
    assert labels["mlm_head/decoder/kernel"] == "heads"
    mask = traverse_util.flatten_dict(decay_mask(params), sep="/")
    assert not mask["backbone/text_encoder/layer_0/attention_norm/scale"]
    assert not mask["mlm_head/decoder/bias"]
    assert mask["backbone/text_encoder/layer_0/attention/query/kernel"]
    assert mask["backbone/vision_encoder/position_embedding"]
    # Adam's first update is lr * g / (|g| + eps) ~ lr: the groups' ratios show directly.
    opt = config.optimizer
    tx = make_optimizer(opt, total_steps=10, params=params)
    grads = jax.tree.map(lambda p: np.ones_like(p), params)
    state = tx.init(params)
    for _ in range(2):  # step 0 has lr 0 (warmup); step 1 does not
        updates, state = tx.update(grads, state, params)
    flat = traverse_util.flatten_dict(updates, sep="/")
    uni = float(flat["backbone/text_encoder/layer_0/attention/query/bias"][0, 0])
    cross = float(flat["backbone/text_cross_layers_0/attention/query/bias"][0, 0])
    head = float(flat["mlm_head/decoder/bias"][0])
    assert uni < 0
    np.testing.assert_allclose([cross / uni, head / uni], [opt.lr_multipliers.cross_modal,
                                                           opt.lr_multipliers.heads], rtol=1e-5)
    # Decayed kernels move further than the gradient alone moves them (decay pulls to 0).
    kernel = "backbone/text_encoder/layer_0/attention/query/kernel"
    p = traverse_util.flatten_dict(params, sep="/")[kernel]
    decayed = flat[kernel] - uni  # the gradient part equals the bias update (same lr group)
    np.testing.assert_allclose(decayed, -float(learning_rate_schedule(
        opt.lr, 10, opt.warmup_fraction)(1)) * opt.weight_decay * p, rtol=1e-3, atol=3e-11)


def test_gradient_accumulation_gives_the_full_batch_update():
    config = small_config(layers=1, losses=("mlm", "itm"))  # it compiles two steps
    params = random_variables(config.model, seed=1)["params"]
    batch = make_batch(config.model)
    results = []
    for k in (1, 4):
        config.grad_accum_steps = k
        mesh, state, step = setup(config, params)
        results.append(run(mesh, step, state, batch))
    (full, full_metrics), (accum, accum_metrics) = results
    for key in ("loss_mlm", "loss_itm", "acc_mlm", "grad_norm"):
        np.testing.assert_allclose(accum_metrics[key], full_metrics[key], rtol=2e-6)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         accum["params"], full["params"])
    assert max(jax.tree.leaves(diffs)) < 1e-7
    assert int(accum["step"]) == int(full["step"]) == 1


@pytest.fixture(scope="module")
def overfit_setup():
    config = small_config(losses=("mlm", "itm"), total_steps=60)
    config.optimizer.lr, config.optimizer.warmup_fraction = 2e-3, 0.05
    params = random_variables(config.model, seed=2)["params"]
    return (config,) + setup(config, params)


def test_tiny_model_overfits_one_batch(overfit_setup):
    config, mesh, state, step = overfit_setup
    batch = make_batch(config.model, seed=3)
    losses = []
    for i in range(config.total_steps):
        state, metrics = run(mesh, step, state, batch, rng_seed=i)
        losses.append((float(metrics["loss_mlm"]), float(metrics["loss_itm"])))
    (mlm0, itm0), (mlm1, itm1) = losses[0], losses[-1]
    assert mlm1 < 0.1 * mlm0 and itm1 < 0.1 * itm0, losses[::10]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_batch_skips_the_update_exactly(overfit_setup, bad):
    config, mesh, state, step = overfit_setup
    batch = make_batch(config.model, seed=4)
    batch["pixel_values"][0, 0, 0, 0] = bad
    before = jax.device_get(state)
    after, metrics = run(mesh, step, state, batch)
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(after)
    same = jax.tree.map(lambda a, b: np.array_equal(a, b), after["params"], before["params"])
    assert all(jax.tree.leaves(same))
    same = jax.tree.map(lambda a, b: np.array_equal(a, b), after["opt_state"],
                        before["opt_state"])
    assert all(jax.tree.leaves(same))
    assert int(after["step"]) == int(before["step"]) + 1


def test_mlm_at_the_listed_positions_equals_decoding_every_position():
    from mtower_jax.data.masking import selected_positions
    from mtower_jax.train.objectives import pretrain_forward
    config = small_config()
    batch = make_batch(config.model, seed=2)
    k = int((batch["mlm_labels"] != IGNORE).sum(-1).max())
    variables = random_variables(config.model, seed=3)
    model = build_model(config.model)

    @jax.jit
    def mlm_terms(batch):
        terms, _ = model.apply(variables, batch, losses=("mlm",), train=False,
                               method=pretrain_forward)
        return terms["mlm"]

    full = mlm_terms(batch)
    listed = mlm_terms(dict(batch, mlm_positions=selected_positions(batch["mlm_labels"], k)))
    assert k < config.model.max_text_len and float(full[1]) == float(listed[1]) > 0
    np.testing.assert_allclose(np.asarray(listed), np.asarray(full), rtol=1e-5)


def test_nonfinite_policy_skip_counts_and_stop_names_the_step():
    from mtower_jax.train.loop import NonFiniteLossError, check_nonfinite
    bad = dict(nonfinite=1.0, loss=float("nan"), grad_norm=float("inf"))
    assert check_nonfinite(dict(bad, nonfinite=0.0), 7, "stop", 0) == 0
    assert check_nonfinite(bad, 7, "skip", 0) == 1
    with pytest.raises(NonFiniteLossError, match="step 7"):
        check_nonfinite(bad, 7, "stop", 0)


def test_itm_negatives_never_pick_the_same_image_and_follow_the_scores():
    import jax.numpy as jnp
    from mtower_jax.train.objectives import itm_negatives
    record = jnp.array([0, 0, 1, 2, 3, 4, 5, 6])  # examples 0 and 1 show the same image
    same = record[:, None] == record[None, :]
    counts, matched = np.zeros((8, 8)), []
    for seed in range(300):
        index, labels = itm_negatives(jax.random.PRNGKey(seed), same, None)
        index, labels = np.asarray(index), np.asarray(labels)
        matched.append(labels.mean())
        negatives = labels == 0
        assert not np.asarray(same)[np.flatnonzero(negatives), index[negatives]].any()
        np.testing.assert_array_equal(index[~negatives], np.flatnonzero(~negatives))
        counts[np.flatnonzero(negatives), index[negatives]] += 1
    assert abs(np.mean(matched) - 0.5) < 0.03
    # Hard negatives: with ITC-like scores favouring image 7 for text 2, it dominates.
    logits = jnp.zeros((8, 8)).at[2, 7].set(5.0)
    picks = [int(itm_negatives(jax.random.PRNGKey(s), same, logits)[0][2]) for s in range(200)]
    picks = [p for p in picks if p != 2]  # matched draws keep index 2
    assert np.mean(np.array(picks) == 7) > 0.9
