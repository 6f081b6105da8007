"""The embedded synthetic "shapes world": scenes, rendering, texts, and its BPE vocabulary."""
import os

# vocab.json + merges.txt of the world's byte-level BPE (`python -m
# mtower_jax.data.synthetic.train_tokenizer` regenerates them); load with
# `mtower_jax.data.tokenizer.Tokenizer.from_dir(TOKENIZER_DIR)`.
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
