"""mtower_jax: ManagerTower vision-language pretraining and fine-tuning in JAX/Flax."""
