"""fusionkit: multimodal text-image fusion models.

import fusionkit
model = fusionkit.create_model("tiny", fusion={"strategy": "gated"})
outputs = model(input_ids=..., attention_mask=..., pixel_values=...)   # {task: logits}
vectors = fusionkit.embed(model, texts=[...], images=[...])           # [N, dim] numpy
best = fusionkit.tune("my.yaml", trials=20, data=frame)               # Optuna search (pip install 'fusionkit[tune]')
summary = fusionkit.train("my.yaml")                                  # a run dir; its summary.json as a dict

Your own parts, then named in configs: @fusionkit.register_fusion("name") over a FusionStrategy subclass,
@fusionkit.register_task("name") over a Task subclass, @fusionkit.register_source(name, accepts) over a reader.
"""

__version__ = "0.4.0"

from typing import TYPE_CHECKING  # noqa: E402

from .config import (  # noqa: E402
    ConfigError,
    FusionConfig,
    ImageEncoderConfig,
    ImagePreprocess,
    ModelConfig,
    TaskConfig,
    TextEncoderConfig,
)
from .data import (  # noqa: E402
    Collator,
    DataError,
    ImageTransform,
    MultimodalDataset,
    build_cache,
    load_dataset,
    make_synthetic,
    register_source,
    split_dataset,
)
from .embed_shards import embed_to_shards, read_embeddings  # noqa: E402
from .embedding import embed  # noqa: E402
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
from .processor import FusionProcessor  # noqa: E402
from .registry import load_plugins  # noqa: E402
from .tasks import Task, bind_labels, list_tasks, register_task  # noqa: E402
from .training import DataConfig, OptimConfig, RunConfig, TrainConfig, Trainer, build_config, train  # noqa: E402

# `fusionkit.tune(...)` (optuna is imported when it runs: an optional dependency). The function replaces the
# submodule as this attribute, so `import fusionkit.tune as t` gives the function too (Python binds the
# attribute); the module's other names: `from fusionkit.tune import default_space`.
from .tune import tune  # noqa: E402

__all__ = [
    "Collator",
    "ConfigError",
    "DataConfig",
    "DataError",
    "FusionConfig",
    "FusionModel",
    "FusionProcessor",
    "FusionStrategy",
    "ImageEncoderConfig",
    "ImagePreprocess",
    "ImageTransform",
    "ModelConfig",
    "MultiTaskLoss",
    "MultimodalDataset",
    "OptimConfig",
    "RunConfig",
    "Task",
    "TaskConfig",
    "TextEncoderConfig",
    "TrainConfig",
    "Trainer",
    "__version__",
    "bind_labels",
    "build_cache",
    "build_config",
    "create_model",
    "embed",
    "embed_to_shards",
    "get_config",
    "list_fusions",
    "list_presets",
    "list_tasks",
    "load_dataset",
    "load_plugins",
    "make_synthetic",
    "read_embeddings",
    "register_fusion",
    "register_source",
    "register_task",
    "split_dataset",
    "train",
    "tune",
]

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
    from . import export as export
    from . import hf as hf
    from . import hub as hub
    from .hf import FusionkitConfig as FusionkitConfig
    from .hf import FusionkitModel as FusionkitModel

_HF_NAMES = ("FusionkitConfig", "FusionkitModel")
_SUBMODULES = ("export", "hf", "hub")  # `fusionkit.export.OnnxModel(...)` right after `import fusionkit`


if not TYPE_CHECKING:  # type checkers see the names imported above, and no others

    def __getattr__(name: str) -> object:
        """`fusionkit.FusionkitModel` / `FusionkitConfig` (fusionkit.hf) and the submodules above import on first
        use: transformers' model classes take seconds to import, which `import fusionkit` should not pay."""
        if name in _HF_NAMES:
            from . import hf

            return getattr(hf, name)
        if name in _SUBMODULES:
            import importlib

            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'fusionkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Tab completion lists the lazy names too."""
    return sorted({*globals(), *_HF_NAMES, *_SUBMODULES})
