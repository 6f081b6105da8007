"""Trains the shapes world's byte-level BPE vocabulary and writes it into the repository.

    python -m mtower_jax.data.synthetic.train_tokenizer [OUT_DIR]   (default: TOKENIZER_DIR)

The corpus is every text the world can say about CORPUS_SCENES scenes of a fixed seed
(`world.all_texts`): captions and every candidate question, statement and hypothesis, so
each template word is seen. Training is deterministic: the same code writes the same
vocab.json + merges.txt byte for byte (a test regenerates and compares). The vocabulary is
RoBERTa-shaped: special tokens <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, then the 256 byte
symbols, then the merges; BPE stops once every word of the corpus is one token, well below
the tiny model's VOCAB_SIZE.
"""
from __future__ import annotations

import os
import sys

import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from mtower_jax.data.synthetic import TOKENIZER_DIR, world
from mtower_jax.data.tokenizer import SPECIAL_TOKENS

VOCAB_SIZE = 1024  # the tiny model's vocabulary: the trained one must fit in it
CORPUS_SEED = 0
CORPUS_SCENES = 300


def train(out_dir: str = TOKENIZER_DIR, vocab_size: int = VOCAB_SIZE) -> int:
    """Trains on the world's texts, writes vocab.json + merges.txt to out_dir; the vocab size."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte: never <unk>
    # Sorted and unique: the corpus is a set of sentences, its order plays no part.
    corpus = sorted(set(world.all_texts(CORPUS_SEED, CORPUS_SCENES)))
    backend.train_from_iterator(corpus, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    backend.model.save(out_dir)
    return backend.get_vocab_size()


def main(argv: list[str]) -> None:
    out_dir = argv[1] if len(argv) > 1 else TOKENIZER_DIR
    print(f"vocab_size={train(out_dir)} written to {out_dir}")


if __name__ == "__main__":
    main(sys.argv)
