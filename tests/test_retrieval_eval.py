"""Retrieval evaluation: recall with ties by hand, and the chunked / re-ranked evaluator
against a brute-force reference (every ITC and ITM score from plain full-model forwards)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import random_variables
from configs.irtr import get_config
from mtower_jax.data import pipeline
from mtower_jax.data.builders import synthetic_shapes
from mtower_jax.models import build_model
from mtower_jax.models.partitioning import DEFAULT_RULES
from mtower_jax.train import mesh as mesh_lib
from mtower_jax.train.tasks.retrieval_eval import RetrievalEvaluator, recall_at_k

INF = np.inf
NUM_IMAGES, CAPTIONS = 50, synthetic_shapes.RETRIEVAL_CAPTIONS
K = 8
TOL = 1e-5  # ITC / ITM agreement between the chunked evaluator and brute force


# -- recall_at_k by hand ---------------------------------------------------------------------

def test_recall_single_gold():
    scores = np.array([[3.0, 2.0, 1.0],   # gold ranked 2nd: miss at 1, hit at 5
                       [1.0, 5.0, 2.0],   # gold first
                       [0.0, 1.0, 2.0]])  # gold last (2 ahead): hit at 5
    gold = np.array([[0, 1, 0], [0, 1, 0], [1, 0, 0]], bool)
    assert recall_at_k(scores, gold, ks=(1, 2, 3)) == {"r1": pytest.approx(100 / 3),
                                                       "r2": pytest.approx(200 / 3),
                                                       "r3": 100.0}
    assert recall_at_k(scores, gold) == {"r1": pytest.approx(100 / 3), "r5": 100.0,
                                         "r10": 100.0}


def test_recall_ties_count_against_the_model():
    # gold tied with one wrong candidate: 1 wrong candidate scores >= gold -> miss at K=1,
    # hit at K=2; a constant scorer over 12 candidates has 11 wrong ties: miss at 1, 5, 10.
    tied = recall_at_k(np.array([[2.0, 2.0, 1.0]]), np.array([[0, 1, 0]], bool), ks=(1, 2))
    assert tied == {"r1": 0.0, "r2": 100.0}
    constant = np.ones((1, 12))
    gold = np.zeros((1, 12), bool)
    gold[0, 7] = True
    assert recall_at_k(constant, gold) == {"r1": 0.0, "r5": 0.0, "r10": 0.0}
    # ... but with 4 wrong candidates it is inside the top 5.
    assert recall_at_k(constant[:, :5], gold[:, 3:8]) == {"r1": 0.0, "r5": 100.0, "r10": 100.0}
    # Two gold tied with each other and nothing wrong above: a hit at 1.
    assert recall_at_k(np.array([[2.0, 2.0, 0.0]]), np.array([[1, 1, 0]], bool),
                       ks=(1,)) == {"r1": 100.0}


def test_recall_multiple_gold_and_outside_top_k():
    # TR: an image with several captions; the best-scoring one decides.
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0],    # best gold 3rd -> 2 ahead
                       [0.0, 9.0, -1.0, 8.0, 7.0, 6.0],   # best gold (9) first
                       [-INF, 1.0, 2.0, 3.0, -INF, 4.0],  # gold outside the top k: -inf
                       [-INF, 1.0, 2.0, 3.0, 0.5, -INF]])  # -inf wrong ones never count
    gold = np.array([[0, 0, 1, 1, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [1, 0, 0, 0, 1, 0],
                     [0, 0, 0, 0, 1, 0]], bool)
    # Row 4: gold 0.5, wrong finite 1, 2, 3 ahead -> rank 4.
    assert recall_at_k(scores, gold, ks=(1, 3, 4, 10)) == {
        "r1": 25.0, "r3": 50.0, "r4": 75.0, "r10": 75.0}
    assert recall_at_k(np.zeros((0, 3)), np.zeros((0, 3), bool)) == {
        "r1": 0.0, "r5": 0.0, "r10": 0.0}
    with pytest.raises(ValueError, match="same"):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 4), bool))


# -- the evaluator against brute force -------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config on a 50-image / 250-caption test split, model, random params, mesh; the
    synthetic builder is opened with small split sizes (open_builder uses the defaults)."""
    data_dir = str(tmp_path_factory.mktemp("retrieval_data"))
    config = get_config("model=tiny,data=synthetic")
    config.data.data_dir = data_dir
    config.eval_batch_size = 16  # 50 images: 3 full batches + a padded one
    config.retrieval.rerank_k = K
    config.retrieval.text_chunk = 32  # 250 texts: 7 full chunks + a padded one
    config.retrieval.pair_batch = 48

    def small_builder(name, task, data, image_size):
        assert (name, task) == ("synthetic_shapes", "retrieval")
        return synthetic_shapes.ensure_built(
            "retrieval", data.data_dir, image_size=image_size, seed=data.synthetic_seed,
            split_sizes=dict(train=2, val=2, test=NUM_IMAGES))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "open_builder", small_builder)
        model = build_model(config.model)
        params = random_variables(config.model, seed=3)["params"]
        mesh = mesh_lib.make_mesh(config.mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            yield config, model, params, mesh


@pytest.fixture(scope="module")
def evaluator(setup):
    """One evaluator for the file: its jitted functions compile once."""
    config, model, _, mesh = setup
    return RetrievalEvaluator(config, model, mesh)


def _brute_force(config, model, params):
    """Every caption x every image through the plain full forward: ITC [M, N], ITM [M, N],
    and the caption -> image map, from the ordinary (one example per caption) pipeline."""
    (batch,) = list(pipeline.task_data(config, "retrieval", "test", train=False,
                                       batch_size=NUM_IMAGES * CAPTIONS))
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    text_image = batch["record_index"].astype(np.int64)
    forward = jax.jit(lambda p, i, m, x: model.apply({"params": p}, i, m, x, train=False))
    out = forward(params, ids, mask, pixels)
    first = np.array([np.flatnonzero(text_image == r)[0] for r in range(NUM_IMAGES)])
    text_embeds = np.asarray(out["itc_text_embeds"], np.float64)
    image_embeds = np.asarray(out["itc_image_embeds"], np.float64)[first]
    itc = text_embeds @ image_embeds.T
    itm = np.zeros_like(itc)
    for r in range(NUM_IMAGES):  # image r against every caption
        logits = np.asarray(forward(params, ids, mask, np.repeat(pixels[first[r]][None],
                                                                 len(ids), 0))["itm_logits"])
        itm[:, r] = logits[:, 1] - logits[:, 0]
    return itc, itm, text_image


def _reference_top_k(itc, chosen, k):
    """Numpy's own top k of each row by ITC (stable sort). Float noise may break a near tie
    the other way on the device: a row whose evaluator set differs is checked to be a top k
    of the reference scores within TOL and then taken as the reference's."""
    ref = np.argsort(-itc, axis=1, kind="stable")[:, :k]
    same = np.all(np.sort(ref, 1) == np.sort(chosen, 1), axis=1)
    assert all(len(set(row)) == k for row in chosen)
    inside = np.take_along_axis(itc, chosen, 1).min(1)
    outside = itc.copy()
    np.put_along_axis(outside, chosen, -INF, 1)
    assert np.all(inside >= outside.max(1) - TOL)
    assert same.mean() > 0.95, same.mean()
    return np.where(same[:, None], ref, chosen)


def _reference_recalls(itm, text_image, ir_top, tr_top, gold_shift=0.0):
    """Dense [queries, candidates] ITM scores, -inf outside each query's top k, and
    recall_at_k; gold scores moved by gold_shift (brackets float noise on ITM ties)."""
    ir_gold = text_image[:, None] == np.arange(itm.shape[1])[None, :]
    recalls = {}
    for name, scores, top, gold in (("ir", itm, ir_top, ir_gold), ("tr", itm.T, tr_top,
                                                                     ir_gold.T)):
        dense = np.full(scores.shape, -INF)
        np.put_along_axis(dense, top, np.take_along_axis(scores, top, 1), 1)
        dense = np.where(gold, dense + gold_shift, dense)
        recalls |= {f"{name}_{n}": v for n, v in recall_at_k(dense, gold).items()}
    return recalls


def test_matches_brute_force(setup, evaluator):
    config, model, params, _ = setup
    ranking = evaluator.rank(params, "test")
    itc, itm, text_image = _brute_force(config, model, params)
    num_texts = NUM_IMAGES * CAPTIONS

    np.testing.assert_array_equal(ranking.text_image, text_image)
    assert ranking.image_seen.all()
    # The same ITC top-k sets (and similarities), the ITM scores of exactly those pairs.
    assert ranking.ir_images.shape == (num_texts, K) and ranking.tr_texts.shape == (NUM_IMAGES, K)
    ir_top = _reference_top_k(itc, ranking.ir_images, K)
    tr_top = _reference_top_k(itc.T, ranking.tr_texts, K)
    np.testing.assert_array_equal(np.sort(ranking.ir_images, 1), np.sort(ir_top, 1))
    np.testing.assert_array_equal(np.sort(ranking.tr_texts, 1), np.sort(tr_top, 1))
    rows, images = np.arange(num_texts)[:, None], np.arange(NUM_IMAGES)[:, None]
    np.testing.assert_allclose(ranking.ir_itc, itc[rows, ranking.ir_images], atol=TOL)
    np.testing.assert_allclose(ranking.tr_itc, itc[ranking.tr_texts, images], atol=TOL)
    np.testing.assert_allclose(ranking.ir_itm, itm[rows, ranking.ir_images], rtol=TOL,
                               atol=TOL)
    np.testing.assert_allclose(ranking.tr_itm, itm[ranking.tr_texts, images], rtol=TOL,
                               atol=TOL)
    pairs = {(t, i) for t in range(num_texts) for i in ir_top[t]}
    pairs |= {(t, i) for i in range(NUM_IMAGES) for t in tr_top[i]}
    assert ranking.pairs_scored == len(pairs) < num_texts * K + NUM_IMAGES * K

    # Recalls: exactly the brute force's; an ITM tie within TOL between a gold and a wrong
    # candidate may fall either way (then low < high), otherwise low == high == expected.
    metrics = ranking.metrics()
    expected = _reference_recalls(itm, text_image, ir_top, tr_top)
    low = _reference_recalls(itm, text_image, ir_top, tr_top, -TOL)
    high = _reference_recalls(itm, text_image, ir_top, tr_top, TOL)
    for name, value in expected.items():
        assert low[name] <= metrics[name] <= high[name], (name, metrics, expected)
        if low[name] == high[name]:
            assert metrics[name] == value
    assert metrics["r_mean"] == pytest.approx(np.mean([metrics[n] for n in expected]))
    assert (metrics["images"], metrics["texts"]) == (NUM_IMAGES, num_texts)
    # Neither trivially solved nor without hits: the numbers mean something.
    assert 0 < metrics["tr_r10"] and metrics["ir_r1"] < 100


def test_evaluate_reports(setup, evaluator, monkeypatch):
    params = setup[2]
    # Each image pass encodes every image once: count the rows the vision encoder sees.
    calls = {"_image_itc": 0, "_encode_images": 0}
    for name in calls:
        def wrapped(params, pixels, *args, _name=name, _fn=getattr(evaluator, name)):
            calls[_name] += pixels.shape[0]
            return _fn(params, pixels, *args)
        monkeypatch.setattr(evaluator, name, wrapped)
    metrics = evaluator.evaluate(params, "test")
    assert set(metrics) >= {"ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r_mean",
                            "images", "texts", "rerank_k"}
    assert metrics["rerank_k"] == K and metrics["images"] == NUM_IMAGES
    assert all(0 <= metrics[n] <= 100 for n in ("ir_r1", "tr_r10", "r_mean"))
    assert metrics["ir_r1"] <= metrics["ir_r5"] <= metrics["ir_r10"]
    padded = -(-NUM_IMAGES // 16) * 16  # 4 batches of 16 rows
    assert calls["_image_itc"] == padded and calls["_encode_images"] <= padded


def test_one_dataset_only(setup):
    config, model, _, mesh = setup
    config = config.copy_and_resolve_references()
    config.data.datasets = ("synthetic_shapes", "f30k_retrieval")
    with pytest.raises(ValueError, match="one dataset"):
        RetrievalEvaluator(config, model, mesh)
