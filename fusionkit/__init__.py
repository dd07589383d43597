"""fusionkit: multimodal text-image fusion models.

    import fusionkit
    model = fusionkit.create_model("tiny", fusion={"strategy": "gated"})
    outputs = model(input_ids=..., attention_mask=..., pixel_values=...)   # {task: logits}
"""

__version__ = "0.1.0"

from .config import (  # noqa: E402
    ConfigError,
    FusionConfig,
    ImageEncoderConfig,
    ImagePreprocess,
    ModelConfig,
    TaskConfig,
    TextEncoderConfig,
)
from .models import (  # noqa: E402
    FusionModel,
    FusionStrategy,
    MultiTaskLoss,
    create_model,
    get_config,
    list_fusions,
    list_presets,
    register_fusion,
)

__all__ = [
    "ConfigError",
    "FusionConfig",
    "FusionModel",
    "FusionStrategy",
    "ImageEncoderConfig",
    "ImagePreprocess",
    "ModelConfig",
    "MultiTaskLoss",
    "TaskConfig",
    "TextEncoderConfig",
    "__version__",
    "create_model",
    "get_config",
    "list_fusions",
    "list_presets",
    "register_fusion",
]
