"""Masked-language-model inputs (BERT's recipe, as the VLP references use it).

Of the maskable tokens (not special, not padding), each is selected with probability p
(0.15); a selected token becomes <mask> 80% of the time, a random ordinary token 10%,
itself 10%. Labels hold the original id at selected positions and IGNORE elsewhere.
"""
import numpy as np

IGNORE = -100  # label of positions that do not count in the MLM loss


def mask_tokens(input_ids: np.ndarray, special_tokens_mask: np.ndarray, *, mask_id: int,
                ordinary_ids: np.ndarray, probability: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [..., L] int -> (masked ids [..., L] int32, labels [..., L] int32).

    `special_tokens_mask` is True at <s>, </s> and padding. Random replacements are drawn
    uniformly from `ordinary_ids` (the vocabulary minus the special tokens; RoBERTa's <mask>
    is its last id, so a contiguous range would not do).
    """
    maskable = ~special_tokens_mask.astype(bool)
    selected = maskable & (rng.random(input_ids.shape) < probability)
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
