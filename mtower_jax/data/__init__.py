"""Input side: tfds builders, the synthetic world, tokenizer, transforms, grain pipelines."""
