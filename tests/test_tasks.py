"""Fine-tuning tasks against hand-computed cases: the VQA loss and score, NLVR2's pairing,
SNLI-VE's cross-entropy, retrieval's hard-negative ITM pairs; init_from's adaptations
(position table, third token type); epochs -> steps; padded evaluation batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import irtr, nlvr2, pretrain, snli_ve, vqav2
from mtower_jax.models import build_model, random_inputs
from mtower_jax.train import evaluation, init_from
from mtower_jax.train.tasks import TASKS, denominators, get_task
from mtower_jax.train.tasks.classification import classification_forward, vqa_terms
from mtower_jax.train.tasks.retrieval import retrieval_forward
from tests.conftest import random_variables, tiny_config


def test_vqa_loss_is_bce_summed_over_answers_and_score_is_the_argmax_answers_score():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]], np.float32)
    targets = np.array([[0.3, 0.0, 1.0], [0.0, 0.6, 0.9]], np.float32)

    def bce(x, t):  # -t log s(x) - (1 - t) log(1 - s(x))
        s = 1 / (1 + np.exp(-x))
        return -t * np.log(s) - (1 - t) * np.log(1 - s)

    loss, count, score = vqa_terms(jnp.asarray(logits), jnp.asarray(targets),
                                   jnp.array([True, True]))
    np.testing.assert_allclose(loss, bce(logits, targets).sum(), rtol=1e-6)
    assert count == 2 and score == pytest.approx(0.3 + 0.6)  # argmax 0 -> .3, argmax 1 -> .6
    # A padding row counts nowhere.
    loss1, count1, score1 = vqa_terms(jnp.asarray(logits), jnp.asarray(targets),
                                      jnp.array([False, True]))
    np.testing.assert_allclose(loss1, bce(logits[1], targets[1]).sum(), rtol=1e-6)
    assert count1 == 1 and score1 == pytest.approx(0.6)


def _classification(task: str, **overrides):
    cfg = tiny_config("manager", heads=(task,), **overrides)
    model = build_model(cfg)
    variables = random_variables(cfg, seed=3)
    return cfg, model, variables


def test_nlvr2_concatenates_the_two_passes_with_image_token_types_1_and_2():
    cfg, model, variables = _classification("nlvr2", num_token_types=3)
    inputs = random_inputs(cfg, batch_size=4, seed=1)
    labels = np.array([0, 1, 1, 0], np.int32)
    batch = dict(inputs, labels=labels)
    terms, predictions = model.apply(variables, batch, losses=("nlvr2",), train=False,
                                     method=classification_forward)

    def cls(pixels, token_type):
        return model.apply(variables, inputs["input_ids"], inputs["attention_mask"], pixels,
                           False, token_type, method=lambda m, *a: m.backbone(*a))["cls_feats"]

    pair = jnp.concatenate([cls(inputs["pixel_values"], 1), cls(inputs["pixel_values_2"], 2)], -1)
    logits = model.apply(variables, {"cls_feats_pair": pair}, False,
                         method=lambda m, f, t: m.head("nlvr2")(f, t))["nlvr2_logits"]
    log_probs = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(terms["nlvr2"][0], -log_probs[np.arange(4), labels].sum(),
                               rtol=1e-5)
    np.testing.assert_array_equal(predictions["prediction"], np.argmax(logits, -1))
    assert terms["nlvr2"][2] == np.sum(np.argmax(logits, -1) == labels)
    # The pair is ordered: swapping the images changes the logits.
    swapped = dict(batch, pixel_values=inputs["pixel_values_2"],
                   pixel_values_2=inputs["pixel_values"])
    terms_swapped, _ = model.apply(variables, swapped, losses=("nlvr2",), train=False,
                                   method=classification_forward)
    assert abs(float(terms_swapped["nlvr2"][0] - terms["nlvr2"][0])) > 1e-4


def test_snli_ve_is_three_way_cross_entropy_on_cls_feats():
    cfg, model, variables = _classification("snli_ve")
    inputs = random_inputs(cfg, batch_size=3, seed=2)
    labels = np.array([2, 0, 1], np.int32)
    terms, _ = model.apply(variables, dict(inputs, labels=labels), losses=("snli_ve",),
                           train=False, method=classification_forward)
    logits = model.apply(variables, **inputs)["snli_ve_logits"]
    assert logits.shape == (3, 3)
    log_probs = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(terms["snli_ve"][0], -log_probs[np.arange(3), labels].sum(),
                               rtol=1e-5)


def test_retrieval_scores_three_pairs_per_example_and_never_pairs_an_image_with_itself():
    cfg = tiny_config("manager", heads=("itc", "itm"))
    model = build_model(cfg)
    variables = random_variables(cfg, seed=4)
    inputs = random_inputs(cfg, batch_size=6, seed=3)
    record = np.array([0, 0, 1, 2, 3, 3], np.int32)  # two images hold two captions each
    terms, _ = model.apply(variables, dict(inputs, record_index=record), losses=("itc", "itm"),
                           train=True, method=retrieval_forward,
                           rngs={"dropout": jax.random.PRNGKey(0),
                                 "negatives": jax.random.PRNGKey(1)})
    assert float(terms["itm"][1]) == 18 and float(terms["itc"][1]) == 6
    counts = denominators(dict(inputs, record_index=record), ("itc", "itm"), TASKS["retrieval"])
    assert float(counts["itm"]) == 18
    # One image everywhere: no negative exists, so every pair stays labelled 'match' (the
    # draw over an all-forbidden row falls on index 0, a caption of that same image).
    same_image = dict(inputs, record_index=np.zeros(6, np.int32),
                      pixel_values=np.repeat(inputs["pixel_values"][:1], 6, axis=0))
    only, _ = model.apply(variables, same_image, losses=("itm",), train=False,
                          method=retrieval_forward, rngs={"negatives": jax.random.PRNGKey(1)})
    logits = model.apply(variables, **{k: v for k, v in same_image.items()
                                       if k != "record_index"})["itm_logits"]
    texts = np.concatenate([np.arange(6), np.arange(6), np.zeros(6, int)])
    assert float(only["itm"][2]) == np.sum(np.argmax(logits[texts], -1) == 1)


def test_configs_carry_the_paper_recipe_and_task_checks():
    vqa = vqav2.get_config("model=base,data=real")
    assert (vqa.model.vision.image_size, vqa.optimizer.lr, vqa.batch_size, vqa.epochs) == (
        576, 9e-6, 504, 10)
    assert vqa.optimizer.lr_multipliers.to_dict() == {"cross_modal": 5.0, "heads": 50.0}
    assert vqa.model.head_hidden_scale == 2 and vqa.model.vqa_num_answers == 3129
    assert not vqa.data.flip and vqa.data.augment
    pair = nlvr2.get_config("model=base,data=real")
    assert pair.model.num_token_types == 3 and pair.data.eval_splits == ("dev", "test1")
    ve = snli_ve.get_config("model=base,data=real")
    assert (ve.optimizer.lr, ve.batch_size, ve.optimizer.warmup_fraction) == (3e-6, 64, 0.06)
    coco = irtr.get_config("model=base,data=real,dataset=coco")
    assert coco.retrieval.rerank_k == 256 and coco.data.datasets == ("coco_retrieval",)
    assert coco.model.max_text_len == 40 and irtr.get_config("data=real").retrieval.rerank_k == 128
    with pytest.raises(ValueError, match="dataset"):
        irtr.get_config("dataset=cc3m")
    bad = vqav2.get_config("model=tiny")
    bad.losses = ("itm",)
    with pytest.raises(ValueError, match="task 'vqa' computes"):
        get_task(bad)
    headless = pretrain.get_config("model=tiny")
    headless.losses = ("mlm", "itm", "itc")
    with pytest.raises(ValueError, match=r"needs the head\(s\) \['itc'\].*"
                                         r'--config.model.heads="\(\'mlm\', \'itm\', \'itc\'\)"'):
        get_task(headless)
    headless.model.heads = ("mlm", "itm", "itc")
    assert get_task(headless).name == "pretrain"


def test_init_from_resizes_the_position_table_and_copies_the_image_token_type():
    source = {init_from.VISION_POSITIONS: np.random.default_rng(0).standard_normal((17, 8)),
              init_from.TOKEN_TYPES: np.arange(16, dtype=np.float32).reshape(2, 8)}
    fresh = {init_from.VISION_POSITIONS: np.zeros((37, 8)), init_from.TOKEN_TYPES: np.zeros((3, 8)),
             "vqa_head/out/bias": np.zeros(4)}
    adapted, notes = init_from.adapt_source(source, fresh)
    assert adapted[init_from.VISION_POSITIONS].shape == (37, 8) and len(notes) == 2
    np.testing.assert_array_equal(adapted[init_from.VISION_POSITIONS][0],
                                  source[init_from.VISION_POSITIONS][0])  # class row kept
    np.testing.assert_array_equal(adapted[init_from.TOKEN_TYPES][2],
                                  source[init_from.TOKEN_TYPES][1])
    _, report = init_from.merge_params(traverse_util.unflatten_dict(fresh, sep="/"),
                                       traverse_util.unflatten_dict(source, sep="/"), "src")
    assert report["fresh"] == ["vqa_head/out/bias"] and len(report["adapted"]) == 2


def test_epochs_become_steps_from_the_train_split(tmp_path):
    from mtower_jax.data import pipeline
    from mtower_jax.train.loop import resolve_total_steps
    config = snli_ve.get_config("model=tiny")
    config.data.data_dir = str(tmp_path)
    examples = pipeline.num_examples(config, "snli_ve", "train")
    assert examples == 3000  # 1000 images x 3 hypotheses
    config.epochs, config.batch_size = 2.5, 64
    assert resolve_total_steps(config).total_steps == int(np.ceil(2.5 * 3000 / 64))
    config.total_steps = 7
    assert resolve_total_steps(config).total_steps == 7


def test_padded_batches_have_one_shape_and_mark_the_padding():
    data = [{"input_ids": np.arange(8).reshape(4, 2)}, {"input_ids": np.arange(4).reshape(2, 2)}]
    out = list(evaluation.padded_batches(data, 4, 3))
    assert [b["input_ids"].shape for b in out] == [(4, 2)] * 3
    np.testing.assert_array_equal(out[1]["valid"], [1, 1, 0, 0])
    np.testing.assert_array_equal(out[2]["valid"], [0, 0, 0, 0])  # past the data: all padding
    np.testing.assert_array_equal(out[0]["valid"], [1, 1, 1, 1])
