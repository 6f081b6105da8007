"""Image-text retrieval fine-tuning: ITC + ITM with hard negatives (DESIGN.md section 3).

    s = t i^T / tau                     [B, B] ITC logits of the *global* batch
    L_itc = (CE(s, diag) + CE(s^T, diag)) / 2
    per text b:  a negative image ~ softmax(s[b, :]) over the other images
    per image b: a negative text  ~ softmax(s[:, b]) over the other texts
    L_itm = CE over 3B pairs: (t_b, i_b) -> match, (t_b, i_neg) and (t_neg, i_b) -> no match

Global negatives: the step is one SPMD program over the global batch, sharded along the
batch axis, so `s` spans every device's examples (XLA all-gathers the [B, 256]
embeddings, not the images) and a negative may come from any device. With gradient
accumulation the negatives come from the micro-batch. Copies of one image in a batch (its
other captions) are never each other's negatives. Negatives reuse the batch's encodings:
no extra uni-modal pass. With `config.data.itm_negatives='shard'` a negative comes from the
example's own device shard instead, and the encodings are never all-gathered
(objectives.take_rows).
"""
import jax
import jax.numpy as jnp

from mtower_jax.train.objectives import (cross_entropy_sum, itc_similarity, itc_terms,
                                         sample_negatives, select_images, take_rows)


def _select_text(text: dict, index: jax.Array, groups: int) -> dict:
    """The encoded texts reordered along the batch (what `fuse` reads of them)."""
    return {"outputs": take_rows(text["outputs"], index, groups, axis=1),
            "hidden_states": (take_rows(text["hidden_states"][-1], index, groups),)}


def retrieval_forward(model, batch: dict, *, losses: tuple[str, ...], train: bool,
                      itm_negative_groups: int = 1) -> tuple[dict, dict]:
    """`model.apply(..., method=retrieval_forward, rngs={'dropout', 'negatives'})`.

    batch: input_ids / attention_mask [B, L], pixel_values [B, S, S, 3], record_index [B].
    itm_negative_groups G: negatives come from the example's group of B/G rows.
    Returns ({'itc': terms, 'itm': terms over 3B pairs}, {}).
    """
    groups = itm_negative_groups
    bb, ids, mask = model.backbone, batch["input_ids"], batch["attention_mask"]
    text = bb.encode_text(ids, mask, train)
    image = bb.prepare_image(bb.encode_image(batch["pixel_values"], train))  # 3 fusions share it
    everyone = jnp.ones(ids.shape[:1], bool)
    similarity = itc_similarity(model, text, image, train)
    out = {"itc": itc_terms(similarity, everyone)} if "itc" in losses else {}
    if "itm" in losses:
        record = batch["record_index"]
        same = record[:, None] == record[None, :]
        image_rng, text_rng = jax.random.split(model.make_rng("negatives"))
        scores = jax.lax.stop_gradient(similarity)
        negative_image, _ = sample_negatives(image_rng, same, scores, groups)
        negative_text, _ = sample_negatives(text_rng, same, scores.T, groups)
        # A batch of one image's captions has no negative: those pairs keep label 1.
        labels = [everyone, *(take_rows(record, negative, groups) == record
                              for negative in (negative_image, negative_text))]
        logits = [model.head("itm")(bb.fuse(t, m, i, train), train)["itm_logits"]
                  for t, m, i in ((text, mask, image),
                                  (text, mask, select_images(image, negative_image, groups)),
                                  (_select_text(text, negative_text, groups),
                                   take_rows(mask, negative_text, groups), image))]
        out["itm"] = cross_entropy_sum(jnp.concatenate(logits),
                                       jnp.concatenate(labels).astype(jnp.int32),
                                       jnp.concatenate([everyone] * 3))
    return out, {}
