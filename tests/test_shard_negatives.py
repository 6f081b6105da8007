"""ITM negatives drawn within each device's shard of the batch (data.itm_negatives='shard'):
the draws stay in their group, the per-group gather equals the plain one, XLA compiles it
with no all-gather (4 compile-only TPU devices, as tools/aot.py uses), and a batch too small
for its shards is refused before a run starts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from conftest import random_variables, tiny_config
from configs.pretrain import get_config
from mtower_jax.models import build_model
from mtower_jax.models.inputs import random_inputs
from mtower_jax.train import run_checks
from mtower_jax.train.objectives import itm_negatives, pretrain_forward, take_rows
from mtower_jax.train.tasks import forward_options


@pytest.mark.parametrize("axis", [0, 1])
def test_take_rows_per_group_equals_the_plain_gather(axis):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 12, 5) if axis else (12, 3, 5)).astype(np.float32)
    groups, size = 4, 3
    index = np.concatenate([g * size + rng.permutation(size) for g in range(groups)])
    expected = np.take(x, index, axis=axis)
    np.testing.assert_array_equal(take_rows(jnp.asarray(x), jnp.asarray(index), groups, axis),
                                  expected)
    np.testing.assert_array_equal(take_rows(jnp.asarray(x), jnp.asarray(index), 1, axis),
                                  expected)


def test_shard_negatives_stay_in_their_group_and_are_uniform_there():
    record = jnp.array([0, 0, 1, 2, 3, 4, 5, 5])  # groups of 4: rows 6 and 7 share an image
    same, groups = record[:, None] == record[None, :], 2
    counts = np.zeros((8, 8))
    for seed in range(400):
        index, labels = (np.asarray(a) for a in itm_negatives(jax.random.PRNGKey(seed), same,
                                                              None, groups))
        rows = np.flatnonzero(labels == 0)
        assert (index[rows] // 4 == rows // 4).all()  # within the row's own group
        assert not np.asarray(same)[rows, index[rows]].any()
        np.testing.assert_array_equal(index[labels == 1], np.flatnonzero(labels == 1))
        counts[rows, index[rows]] += 1
    assert counts[:, :4][4:].sum() == counts[:, 4:][:4].sum() == 0
    # Row 2's candidates in its group are rows 0, 1 and 3, about equally often.
    picks = counts[2, [0, 1, 3]] / counts[2].sum()
    np.testing.assert_allclose(picks, 1 / 3, atol=0.08)
    # A group whose other rows all show the same image leaves the row matched.
    one_image = jnp.array([7, 7, 7, 7, 1, 2, 3, 4])
    _, labels = itm_negatives(jax.random.PRNGKey(0), one_image[:, None] == one_image[None, :],
                              None, groups)
    assert np.asarray(labels)[:4].tolist() == [1, 1, 1, 1]


def _collectives(groups: int) -> str:
    """HLO of take_rows over a [6, 16, 10, 8] stream split 4 ways along its batch (axis 1),
    compiled for 4 v5e chips."""
    from mtower_jax.tools import aot
    mesh = jax.sharding.Mesh(np.array(aot.compile_devices("v5e:2x2")), ("batch",))
    x = jax.ShapeDtypeStruct((6, 16, 10, 8), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "batch")))
    index = jax.ShapeDtypeStruct((16,), jnp.int32, sharding=NamedSharding(mesh, P("batch")))
    gather = jax.jit(lambda x, i: take_rows(x, i, groups, axis=1))
    return gather.lower(x, index).compile().as_text()


def test_per_shard_gather_keeps_the_stream_on_its_device():
    assert "all-gather" in _collectives(1)  # x[:, index]: the whole stream on every chip
    hlo = _collectives(4)
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))


def test_pretrain_forward_draws_within_groups():
    """Groups of two examples that show one image hold no negative, so every pair stays
    matched and ITM is the matched pairs' loss; over the whole batch, negatives exist."""
    cfg = tiny_config("manager", heads=("mlm", "itm"))
    model, variables = build_model(cfg), random_variables(cfg, seed=1)
    inputs = random_inputs(cfg, batch_size=8, seed=2)
    batch = dict(inputs, record_index=np.repeat(np.arange(4, dtype=np.int32), 2))

    def itm(groups: int) -> np.ndarray:
        terms, _ = model.apply(variables, batch, losses=("itm",), train=False,
                               method=pretrain_forward, itm_negative_groups=groups,
                               rngs={"negatives": jax.random.PRNGKey(3)})
        return np.asarray(terms["itm"])
    logits = model.apply(variables, **inputs)["itm_logits"]
    matched = optax.softmax_cross_entropy_with_integer_labels(logits, np.ones(8, np.int32))
    grouped = itm(4)
    np.testing.assert_allclose(grouped[0], float(matched.sum()), rtol=1e-5)
    assert grouped[1] == 8 and grouped[2] == int(np.sum(np.argmax(logits, -1) == 1))
    assert abs(itm(1)[0] - grouped[0]) > 1e-3


def _shard_config(**overrides):
    config = get_config("model=tiny")
    config.data.itm_negatives = "shard"
    for key, value in overrides.items():
        config[key] = value
    return config


def test_shards_too_small_for_a_negative_are_refused_before_the_run():
    mesh = AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
    assert forward_options(_shard_config(), mesh) == {"itm_negative_groups": 8}
    assert forward_options(get_config("model=tiny"), mesh) == {}  # 'batch'
    run_checks.check_mesh(_shard_config(batch_size=16, eval_batch_size=16), mesh)
    with pytest.raises(ValueError, match=r"8 groups of 2 examples or more.*'batch_size / "
                                         r"grad_accum_steps': 4.*'eval_batch_size': 8"):
        run_checks.check_mesh(_shard_config(batch_size=16, grad_accum_steps=4,
                                            eval_batch_size=8), mesh)
    for value, message in (("shards", "must be one of"), ("dataset", "does not apply")):
        config = _shard_config(task="retrieval")
        config.data.itm_negatives = value
        with pytest.raises(ValueError, match=message):
            run_checks.validate(config)
