"""Model descriptions, checkpoint loading and architecture detection, and the project's FP model zoo."""

from .load import CheckpointError, load_pretrained, model_scale, read_state_dict
from .spec import ModelSpec, ModelSpecError
from .zoo import zoo_names, zoo_path

__all__ = [
    "CheckpointError",
    "ModelSpec",
    "ModelSpecError",
    "load_pretrained",
    "model_scale",
    "read_state_dict",
    "zoo_names",
    "zoo_path",
]
