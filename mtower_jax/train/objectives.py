"""Pretraining objectives: MLM, ITM (+ optional ITC) as in METER / BridgeTower / ManagerTower.

One `model.apply(..., method=pretrain_forward)` does the step's forward work:

    image = vision_encoder(pixels)                     once per step, shared by MLM and ITM
    MLM   fuse(text_encoder(masked ids), image)  -> cross-entropy at the masked positions
          (batch['mlm_positions'], at most k per text; at every position without it), the
          head making the logits in vocabulary blocks, never whole (models/vocab_decoder.py)
    ITC   normalize(W_t t_cls) . normalize(W_i v_cls) / tau over the batch   (optional)
    ITM   fuse(text_encoder(ids), image[neg])    -> itm_logits; half the examples (drawn at
          random) get another example's image: uniformly among the batch's other images,
          or, with ITC on, with probability softmax(ITC similarity) (hard negatives)

Sharing the image encoding is exact: the reference encodes the same pixels twice, and the
CLIP vision tower has no dropout (with vision dropout, one draw serves both passes, as if
the second pass had drawn the same mask). A negative is another example's already-encoded
image, so ITM costs no third vision pass. `itm_negatives='dataset'` instead takes false
images drawn from the whole dataset by the pipeline (the reference's way; one more encode).

Where negatives come from, `config.data.itm_negatives`:

    batch     any other image of the global batch. The batch is split over the devices, and
              XLA lowers x[:, index] of a sharded x by all-gathering x: every device holds
              the global batch's encoded images [N, B, tokens, width] (base at batch 4096
              on a v5e-256: 12 of the step's 29.5 GiB of temporaries, docs/SCALING.md).
    shard     another image of the example's own group of B/G examples, G = the batch's
              device shards (`itm_negative_groups`): the groups are the shards, the gather
              is one per group (`take_rows`), and each device keeps its own images.
    dataset   drawn by the pipeline (above).

Losses are returned as (sum, count) pairs so that gradient accumulation can divide by the
full batch's counts: the accumulated update then equals the full-batch update.

    L_mlm = sum_masked CE(logits, label) / #masked       L_itm = sum_b CE / B
    L_itc = (CE(t->i) + CE(i->t)) / 2 per example, / B    L = sum of the enabled terms
"""
import jax
import jax.numpy as jnp
import optax

from mtower_jax.data.masking import IGNORE

LOSSES = ("mlm", "itm", "itc")


def take_rows(x: jax.Array, index: jax.Array, groups: int = 1, axis: int = 0) -> jax.Array:
    """x reordered along its batch `axis` (length B): row b becomes row index[b].

    groups G > 1: every index[b] lies in b's own group (G contiguous blocks of B/G rows, the
    device shards of a batch-sharded x), and the gather runs per group, [G, B/G] -> a gather
    with a batch dimension that XLA keeps on each device (a plain x[index] all-gathers x)."""
    if groups == 1:
        return x[(slice(None),) * axis + (index,)]
    size = x.shape[axis] // groups
    grouped = x.reshape(x.shape[:axis] + (groups, size) + x.shape[axis + 1:])
    within = (index % size).reshape(groups, size)
    out = jax.vmap(lambda rows, i: rows[(slice(None),) * axis + (i,)],
                   in_axes=(axis, 0), out_axes=axis)(grouped, within)
    return out.reshape(x.shape)


def select_images(image: dict, index: jax.Array, groups: int = 1) -> dict:
    """The encoded (and prepared) images reordered along the batch: example b gets image
    index[b] (of its own group, `take_rows`). Kept: outputs [k, B, ...] and, once prepared,
    cross_inputs (k arrays [B, ...])."""
    out = {"outputs": take_rows(image["outputs"], index, groups, axis=1), "hidden_states": ()}
    if "cross_inputs" in image:
        out["cross_inputs"] = tuple(take_rows(x, index, groups) for x in image["cross_inputs"])
    return out


def other_groups(batch: int, groups: int) -> jax.Array:
    """[B, B] bool: True where rows i and j lie in different groups of B/G contiguous rows."""
    group = jnp.arange(batch) // (batch // groups)
    return group[:, None] != group[None, :]


def sample_negatives(rng: jax.Array, same_image: jax.Array, logits: jax.Array | None,
                     groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """One negative per row: index j != same image (and, with G groups, in row b's group),
    drawn with probability softmax(logits[b])_j over those (uniform when logits is None), by
    Gumbel-max.

    same_image [B, B] bool; logits [B, B] or None. Returns (index [B] int32, has_negative
    [B] bool: False where every candidate shows row b's image)."""
    batch = same_image.shape[0]
    excluded = same_image if groups == 1 else same_image | other_groups(batch, groups)
    scores = jnp.zeros((batch, batch), jnp.float32) if logits is None else logits
    scores = jnp.where(excluded, -jnp.inf, scores.astype(jnp.float32))
    negative = jnp.argmax(scores + jax.random.gumbel(rng, scores.shape), axis=-1)
    return negative.astype(jnp.int32), ~jnp.all(excluded, axis=-1)


def itm_negatives(rng: jax.Array, same_image: jax.Array, logits: jax.Array | None,
                  groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Chooses the ITM image of each example.

    same_image [B, B] bool: pairs that show the same image (never a negative).
    logits [B, B] or None: sampling scores for negatives (ITC similarity), None = uniform.
    groups: negatives come from the example's own group of B/G rows (`take_rows`).
    Returns (image_index [B] int32, itm_labels [B] int32 with 1 = matched pair). An example
    whose group holds no other image stays matched.
    """
    flip_rng, pick_rng = jax.random.split(rng)
    batch = same_image.shape[0]
    negative, has_negative = sample_negatives(pick_rng, same_image, logits, groups)
    matched = (jax.random.uniform(flip_rng, (batch,)) < 0.5) | ~has_negative
    index = jnp.where(matched, jnp.arange(batch), negative)
    return index.astype(jnp.int32), matched.astype(jnp.int32)


def example_weights(batch: dict) -> jax.Array:
    """[B] bool: the real examples (evaluation pads its last batch; `valid` marks them)."""
    if "valid" in batch:
        return batch["valid"] > 0
    return jnp.ones(batch["input_ids"].shape[:1], bool)


def itc_terms(similarity: jax.Array, valid: jax.Array) -> tuple:
    """Symmetric InfoNCE over the batch, [B, B] similarity / temperature -> (sum, count,
    correct), each example's term the mean of its text->image and image->text CE."""
    targets = jnp.arange(similarity.shape[0])
    t2i, i2t = (cross_entropy_sum(s, targets, valid) for s in (similarity, similarity.T))
    return (t2i[0] + i2t[0]) / 2, t2i[1], (t2i[2] + i2t[2]) / 2


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, valid: jax.Array):
    """(sum of CE over valid positions, #valid, #correct) in float32."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return masked_sums(ce, jnp.argmax(logits, -1) == labels, valid)


def masked_sums(ce: jax.Array, correct: jax.Array, valid: jax.Array):
    """Per-position CE and hits -> (sum of CE over valid positions, #valid, #correct)."""
    return (jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid).astype(jnp.float32),
            jnp.sum(correct & valid).astype(jnp.float32))


def itc_similarity(model, text: dict, image: dict, train: bool) -> jax.Array:
    """[B_text, B_image] ITC logits: normalised projections of the top uni-modal [CLS]
    tokens, dotted, over the learned temperature."""
    itc = model.head("itc")({"unimodal_text_feats": text["hidden_states"][-1],
                             "unimodal_image_feats": image["outputs"][-1]}, train)
    return itc["itc_text_embeds"] @ itc["itc_image_embeds"].T / itc["itc_temperature"]


def pretrain_forward(model, batch: dict, *, losses: tuple[str, ...], train: bool,
                     itm_negative_groups: int = 1) -> tuple[dict, dict]:
    """`model.apply(variables, batch, losses=..., train=..., method=pretrain_forward,
    rngs={'dropout': r1, 'negatives': r2})` -> ({name: (loss_sum, count, correct)}, {}).
    itm_negative_groups G: batch negatives come from the example's group of B/G (above).

    batch: pixel_values [B, S, S, 3], input_ids / attention_mask / mlm_input_ids /
    mlm_labels [B, L], record_index [B], mlm_positions [B, k] when masking is capped; with
    dataset negatives itm_pixel_values, itm_labels;
    in evaluation `valid` [B] (padding rows count nowhere).
    """
    bb, mask, valid = model.backbone, batch["attention_mask"], example_weights(batch)
    # One encoding, and one transform into the cross-modal width, serve MLM, ITC and ITM.
    image = bb.prepare_image(bb.encode_image(batch["pixel_values"], train))
    out = {}
    if "mlm" in losses:
        # Capped masking: the last cross-modal layer and the MLM head run at the masked
        # positions only (the vocabulary projection dominates the head).
        positions = batch.get("mlm_positions")
        fused = bb.fuse(bb.encode_text(batch["mlm_input_ids"], mask, train), mask, image, train,
                        text_positions=positions)
        labels = batch["mlm_labels"]
        if positions is not None:
            labels = jnp.take_along_axis(labels, positions, axis=1)
        counted = (labels != IGNORE) & valid[:, None]
        mlm = model.head("mlm")({"text_feats": fused["text_feats"],
                                 "mlm_labels": jnp.where(counted, labels, 0)}, train)
        out["mlm"] = masked_sums(mlm["mlm_cross_entropy"], mlm["mlm_correct"], counted)
    text = bb.encode_text(batch["input_ids"], mask, train)
    similarity = None
    if "itc" in losses:
        similarity = itc_similarity(model, text, image, train)
        out["itc"] = itc_terms(similarity, valid)
    if "itm" in losses:
        if "itm_pixel_values" in batch:  # false images drawn from the dataset by the pipeline
            itm_image = bb.encode_image(batch["itm_pixel_values"], train)
            itm_labels = batch["itm_labels"]
        else:
            record = batch["record_index"]
            index, itm_labels = itm_negatives(
                model.make_rng("negatives"), record[:, None] == record[None, :],
                None if similarity is None else jax.lax.stop_gradient(similarity),
                itm_negative_groups)
            itm_image = select_images(image, index, itm_negative_groups)
        # Every row of the last layer, though the poolers read only [CLS]: computing that row
        # alone (fuse's positions) moved the losses of a tensor-parallel mesh 1.4e-5 away from
        # one device's (BENCHMARKS.md), more than scale-out's 1e-5 tolerance.
        fused = bb.fuse(text, mask, itm_image, train)
        logits = model.head("itm")(fused, train)["itm_logits"]
        out["itm"] = cross_entropy_sum(logits, itm_labels, valid)
    return out, {}
