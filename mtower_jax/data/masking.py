"""Masked-language-model inputs (BERT's recipe, as the VLP references use it).

Of the maskable tokens (not special, not padding), each is selected with probability p
(0.15); a selected token becomes <mask> 80% of the time, a random ordinary token 10%,
itself 10%. Labels hold the original id at selected positions and IGNORE elsewhere.

At most `max_predictions` (k) tokens of a text are selected (BERT's max_predictions_per_seq;
a text over the cap keeps k of its selections, drawn uniformly), and their positions are
listed, so the model decodes k positions per text instead of all of them:

    mlm_positions [..., k]: the selected positions in order, then 0 (<s>, never selected, so
                            its label is IGNORE and the padding slots count nowhere)

The automatic cap, ceil(2 p L), truncates a full-length text with probability
P(Binomial(L - 2, p) > 2 p L): 0.26% at L = 40, 0.12% at L = 50 (p = 0.15); shorter texts less.
"""
import math

import numpy as np

IGNORE = -100  # label of positions that do not count in the MLM loss


def max_predictions(setting: int, probability: float, text_len: int) -> int | None:
    """The cap k of config.mlm_max_predictions: the setting when > 0, ceil(2 p L) when 0
    (auto), None when -1 (no cap: the head decodes every position, as the reference does)."""
    if setting == -1:
        return None
    if setting < 0:
        raise ValueError(f"config.mlm_max_predictions={setting}: use a positive cap, 0 (auto: "
                         "ceil(2 x mlm_probability x max_text_len)) or -1 (decode every position)")
    return min(setting or math.ceil(2 * probability * text_len), text_len)


def _cap(selected: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Keeps at most k True per row of `selected` [..., L], a uniform choice among them."""
    if not (selected.sum(-1) > k).any():  # the common case draws nothing
        return selected
    scores = np.where(selected, rng.random(selected.shape), -1.0)
    kth = -np.sort(-scores, axis=-1)[..., k - 1:k]
    return selected & (scores >= kth)


def selected_positions(labels: np.ndarray, k: int) -> np.ndarray:
    """[..., L] labels -> [..., k] int32: positions whose label is not IGNORE, in order, then 0."""
    selected = labels != IGNORE
    order = np.argsort(~selected, axis=-1, kind="stable")[..., :k]
    return np.where(np.take_along_axis(selected, order, -1), order, 0).astype(np.int32)


def mask_tokens(input_ids: np.ndarray, special_tokens_mask: np.ndarray, *, mask_id: int,
                ordinary_ids: np.ndarray, probability: float, rng: np.random.Generator,
                max_predictions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [..., L] int -> (masked ids [..., L] int32, labels [..., L] int32).

    `special_tokens_mask` is True at <s>, </s> and padding. Random replacements are drawn
    uniformly from `ordinary_ids` (the vocabulary minus the special tokens; RoBERTa's <mask>
    is its last id, so a contiguous range would not do). `max_predictions` caps the
    selected tokens per text (None: no cap).
    """
    maskable = ~special_tokens_mask.astype(bool)
    selected = maskable & (rng.random(input_ids.shape) < probability)
    if max_predictions is not None:
        selected = _cap(selected, max_predictions, rng)
    action = rng.random(input_ids.shape)
    replace_with_mask = selected & (action < 0.8)
    replace_with_random = selected & (action >= 0.8) & (action < 0.9)
    random_ids = ordinary_ids[rng.integers(0, len(ordinary_ids), size=input_ids.shape)]
    masked = np.where(replace_with_mask, mask_id, input_ids)
    masked = np.where(replace_with_random, random_ids, masked)
    labels = np.where(selected, input_ids, IGNORE)
    return masked.astype(np.int32), labels.astype(np.int32)


def ordinary_ids(vocab_size: int, special_ids: list[int]) -> np.ndarray:
    """[vocab_size - #special] int32: the ids a random MLM replacement may take."""
    return np.setdiff1d(np.arange(vocab_size, dtype=np.int32), np.asarray(special_ids, np.int32))
