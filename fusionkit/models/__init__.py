"""Models: encoders, fusion strategies, task heads and the `FusionModel` that joins them."""

from .encoders import ImageEncoder, TextEncoder
from .factory import PRESETS, create_model, get_config, list_presets
from .fusion import FUSION_REGISTRY, FusionStrategy, create_fusion, list_fusions, register_fusion
from .fusion_model import FusionModel, model_inputs
from .heads import ContrastiveHead, MultiTaskLoss, TaskHead

__all__ = [
    "FUSION_REGISTRY",
    "PRESETS",
    "ContrastiveHead",
    "FusionModel",
    "FusionStrategy",
    "ImageEncoder",
    "MultiTaskLoss",
    "TaskHead",
    "TextEncoder",
    "create_fusion",
    "create_model",
    "get_config",
    "list_fusions",
    "list_presets",
    "model_inputs",
    "register_fusion",
]
