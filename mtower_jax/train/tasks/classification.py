"""VQAv2, NLVR2 and SNLI-VE: one classifier head on the fused [CLS] features (DESIGN.md s. 3).

    vqa      logits = head(cls_feats)                        [B, answers]
             L = sum_a BCE(logits_a, score_a)                per example (= the reference's
                                                             mean BCE x number of answers)
             VQA accuracy = score of the argmax answer       (soft: 0, .3, .6, .9 or 1)
    snli_ve  logits = head(cls_feats)                        [B, 3]     CE, accuracy
    nlvr2    logits = head([cls(text, image_1, type 1) ;     [B, 2]     CE, accuracy
                            cls(text, image_2, type 2)])

Each term is (loss sum, #examples, #correct) over the batch's real examples (`valid`), as
the pretraining objectives, so gradient accumulation and evaluation sum them the same way.
"""
import jax
import jax.numpy as jnp
import optax

from mtower_jax.train.objectives import cross_entropy_sum, example_weights

CLASSIFICATION_TASKS = ("vqa", "nlvr2", "snli_ve")


def vqa_terms(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> tuple:
    """logits, targets [B, answers] (soft scores), valid [B] bool -> (BCE sum, count, score)."""
    logits = logits.astype(jnp.float32)
    bce = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
    best = jnp.argmax(logits, axis=-1)
    score = jnp.take_along_axis(targets, best[:, None], axis=-1)[:, 0]
    return (jnp.sum(jnp.where(valid, bce, 0.0)), jnp.sum(valid).astype(jnp.float32),
            jnp.sum(jnp.where(valid, score, 0.0)))


def classification_forward(model, batch: dict, *, losses: tuple[str, ...], train: bool
                           ) -> tuple[dict, dict]:
    """`model.apply(..., method=classification_forward)` -> ({task: terms}, predictions).

    batch: input_ids / attention_mask [B, L], pixel_values [B, S, S, 3] (NLVR2 also
    pixel_values_2), and vqa_targets [B, answers] or labels [B]. predictions: 'prediction'
    [B] (argmax class), and for VQA 'answered' [B] (has a scored
    answer: test splits have none).
    """
    (task,) = losses
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], train,
                pixel_values_2=batch.get("pixel_values_2"))
    logits, valid = out[f"{task}_logits"], example_weights(batch)
    predictions = {"prediction": jnp.argmax(logits, axis=-1).astype(jnp.int32)}
    if task == "vqa":
        terms = vqa_terms(logits, batch["vqa_targets"], valid)
        predictions["answered"] = jnp.any(batch["vqa_targets"] > 0, axis=-1)
    else:
        terms = cross_entropy_sum(logits, batch["labels"], valid)
    return {task: terms}, predictions
