"""ManagerTower / BridgeTower / METER in Flax linen. Public API: `build_model`."""
from mtower_jax.models.config import model_config, validate
from mtower_jax.models.inputs import example_inputs, random_inputs
from mtower_jax.models.model import VisionLanguageModel, build_model, parameter_shapes

__all__ = ["VisionLanguageModel", "build_model", "example_inputs", "model_config",
           "parameter_shapes", "random_inputs", "validate"]
