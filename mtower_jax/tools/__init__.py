"""Command-line tools: python -m mtower_jax.tools.<name>."""
