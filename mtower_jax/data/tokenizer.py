"""RoBERTa's byte-level BPE tokenizer, from a local directory holding vocab.json + merges.txt.

Built on the `tokenizers` package with RoBERTa's settings (byte-level pre-tokenizer without
a prefix space, no normalizer, the five special tokens of its vocabulary), so ids equal
`transformers.RobertaTokenizer.from_pretrained(dir)`. Sequences are `<s> text </s>`; longer
texts are cut so that `</s>` stays last, shorter ones padded with `<pad>`:

    tok = Tokenizer.from_dir("mtower_jax/data/synthetic/tokenizer")   # or a roberta-base dir
    batch = tok.encode_batch(["a red circle", "how many squares are there?"], max_len=32)
    batch["input_ids"]            # [2, 32] int32
    batch["attention_mask"]       # [2, 32] int32, 1 on <s> text </s>
    batch["special_tokens_mask"]  # [2, 32] bool, True on <s>, </s>, <pad>: never MLM-masked

Byte-level BPE covers every byte, so no text ever becomes `<unk>`.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# RoBERTa's special tokens; its vocabulary puts them at ids 0..4 in this order.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
FILES = ("vocab.json", "merges.txt")


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; picklable, so it can go into grain workers."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend
        ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the vocabulary lacks RoBERTa's special tokens {missing}")
        self.cls_id, self.pad_id, self.sep_id, self.unk_id, self.mask_id = (
            ids[token] for token in SPECIAL_TOKENS)

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """Loads vocab.json + merges.txt from `path`; a clear error if either is missing."""
        path = os.path.expanduser(path)
        missing = [name for name in FILES if not os.path.isfile(os.path.join(path, name))]
        if missing:
            where = "does not exist" if not os.path.isdir(path) else f"lacks {', '.join(missing)}"
            raise FileNotFoundError(
                f"tokenizer directory {path!r} {where}: it must hold the vocab.json and "
                "merges.txt of a RoBERTa byte-level BPE (e.g. from the roberta-base model "
                "repository, or mtower_jax/data/synthetic/tokenizer for the synthetic world)")
        backend = tokenizers.Tokenizer(
            models.BPE.from_file(*(os.path.join(path, name) for name in FILES)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        # As transformers' RobertaTokenizer built from the same two files: a literal special
        # token in a text is that token, not its characters (and "<mask>" keeps the space
        # before it as its own token, unlike the hub's tokenizer.json with lstrip=True).
        backend.add_special_tokens([
            tokenizers.AddedToken(token, special=True, normalized=False)
            for token in SPECIAL_TOKENS])
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
        """`<s> text </s>` per text, truncated / padded to max_len (see the module doc)."""
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for <s> and </s>")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        input_ids = np.full((len(encodings), max_len), self.pad_id, np.int32)
        attention_mask = np.zeros((len(encodings), max_len), np.int32)
        special_tokens_mask = np.ones((len(encodings), max_len), bool)
        for row, encoding in enumerate(encodings):
            body = encoding.ids[:max_len - 2]  # RoBERTa truncates the text, keeps </s>
            end = len(body) + 1  # position of </s>
            input_ids[row, 0] = self.cls_id
            input_ids[row, 1:end] = body
            input_ids[row, end] = self.sep_id
            attention_mask[row, :end + 1] = 1
            special_tokens_mask[row, 1:end] = False
        return dict(input_ids=input_ids, attention_mask=attention_mask,
                    special_tokens_mask=special_tokens_mask)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
