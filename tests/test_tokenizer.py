"""The RoBERTa BPE tokenizer: parity with transformers, truncation, errors, and the synthetic
world's vocabulary (regenerates identically, covers every world text in <= 32 tokens)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from mtower_jax.data.synthetic import TOKENIZER_DIR, train_tokenizer, world
from mtower_jax.data.tokenizer import FILES, SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "a red circle", "What color is the SQUARE?", "Hello, World! It's 3.14 o'clock; 42 + 7 = 49.",
    "  two  leading spaces and a trailing one ", "tabs\tand\nnewlines", "",
    "naïve café, Zürich 東京 🙂 emoji", "a <mask> circle and </s> <s>", "Ġcircle ĠĠ",
    "the large blue triangle is left of the small orange square " * 6,  # truncates
    "supercalifragilisticexpialidocious-ness x" * 20,
]


@pytest.fixture(scope="module")
def unicode_vocab(tmp_path_factory) -> str:
    """A second vocabulary whose merges span multi-byte characters and capitals."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(TEXTS * 3 + ["Zürich café naïve 東京東京 Hello World"] * 5,
                                trainer=trainers.BpeTrainer(
                                    vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                    show_progress=False))
    out = str(tmp_path_factory.mktemp("unicode_vocab"))
    backend.model.save(out)
    return out


@pytest.mark.parametrize("vocab", ["synthetic", "unicode"])
@pytest.mark.parametrize("max_len", [2, 8, 32, 128])
def test_matches_transformers(vocab, max_len, unicode_vocab):
    from transformers import RobertaTokenizer

    path = TOKENIZER_DIR if vocab == "synthetic" else unicode_vocab
    ours = Tokenizer.from_dir(path)
    ref = RobertaTokenizer.from_pretrained(path)
    # The reference really holds our vocabulary (a wrong kwarg silently gives a 5-token one).
    assert len(ref) == ours.vocab_size > 256
    assert ref.get_vocab() == ours.backend.get_vocab()
    expected = ref(TEXTS, max_length=max_len, truncation=True, padding="max_length",
                   return_special_tokens_mask=True)
    got = ours.encode_batch(TEXTS, max_len)
    for key in ("input_ids", "attention_mask", "special_tokens_mask"):
        np.testing.assert_array_equal(got[key], np.array(expected[key]), err_msg=key)
    assert got["input_ids"].dtype == got["attention_mask"].dtype == np.int32
    assert got["special_tokens_mask"].dtype == bool


def test_special_ids_and_truncation():
    tok = Tokenizer.from_dir(TOKENIZER_DIR)
    assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert 261 < tok.vocab_size <= train_tokenizer.VOCAB_SIZE
    batch = tok.encode_batch(["a red circle " * 20, "a"], 12)
    assert batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][0, 0] == tok.cls_id and batch["input_ids"][0, -1] == tok.sep_id
    assert batch["attention_mask"][0].all()
    assert batch["input_ids"][1, :3].tolist() == [tok.cls_id, tok.backend.token_to_id("a"),
                                                   tok.sep_id]
    assert (batch["input_ids"][1, 3:] == tok.pad_id).all() and not batch["attention_mask"][1, 3:].any()
    assert tok.decode(batch["input_ids"][0]).startswith("a red circle a red")
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(["a"], 1)
    copy = pickle.loads(pickle.dumps(tok))  # goes into grain worker processes
    np.testing.assert_array_equal(copy.encode_batch(["a red circle"], 8)["input_ids"],
                                  tok.encode_batch(["a red circle"], 8)["input_ids"])


def test_missing_files_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(str(tmp_path / "nowhere"))
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
        Tokenizer.from_dir(str(tmp_path))


def test_synthetic_vocabulary_regenerates_identically(tmp_path):
    size = train_tokenizer.train(str(tmp_path))
    for name in FILES:
        with open(os.path.join(TOKENIZER_DIR, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), f"{name} differs: rerun python -m {train_tokenizer.__name__}"
    assert size == Tokenizer.from_dir(TOKENIZER_DIR).vocab_size <= train_tokenizer.VOCAB_SIZE


def test_every_world_text_fits_the_tiny_model():
    """Captions, questions, statements and hypotheses of unseen scenes: no <unk>, <= 32."""
    tok = Tokenizer.from_dir(TOKENIZER_DIR)
    texts = sorted(set(world.all_texts(seed=123, num_scenes=200)))
    batch = tok.encode_batch(texts, 64)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() <= 32, texts[int(lengths.argmax())]
    assert not (batch["input_ids"] == tok.unk_id).any()
    # Every word of the world is a single token: the vocabulary really was learned from it.
    words = {w for t in texts for w in t.replace(",", " ").replace(":", " ").split()[1:]}
    assert all(len(tok.backend.encode(" " + w.rstrip("?")).ids) == 1 for w in words)
