"""PyTorch checkpoint formats <-> our parameters. CLI: python -m mtower_jax.convert."""
