"""Named presets and `create_model(name_or_config, **overrides)`: config in, model out (as open_clip's factory)."""

from __future__ import annotations

import copy
from typing import Any

from ..config import (
    ConfigError,
    FusionConfig,
    ImageEncoderConfig,
    ModelConfig,
    TaskConfig,
    TextEncoderConfig,
    from_dict,
    merge,
)
from .fusion_model import FusionModel

SENTIMENT = TaskConfig(
    "sentiment", "classification", num_classes=3, class_names=["positive", "neutral", "negative"]
)

PRESETS: dict[str, ModelConfig] = {
    # Random tiny encoders built offline: the embedded default for `fusionkit train` and the tests. The
    # name "tiny" is what makes them random; `pretrained` keeps its default, so a config on this preset
    # that names real encoders (`model.text.name: bert-base-uncased`) loads their weights.
    "tiny": ModelConfig(
        text=TextEncoderConfig("tiny", max_length=64),
        image=ImageEncoderConfig("timm", "tiny"),
        fusion=FusionConfig(dim=64, depth=1, num_heads=2, mlp_ratio=2.0, dropout=0.0),
        tasks=[SENTIMENT],
    ),
    # Small pretrained encoders (6-layer MiniLM, DINOv2 ViT-S/14): CPU-friendly real runs.
    "minilm-dinov2-small": ModelConfig(
        text=TextEncoderConfig("sentence-transformers/all-MiniLM-L6-v2", max_length=64),
        image=ImageEncoderConfig("hf", "facebook/dinov2-small"),
        fusion=FusionConfig(dim=256, depth=2, num_heads=4),
        tasks=[SENTIMENT],
        freeze="encoders",
    ),
    # The literature's setting: BERT-base + ViT-B/16, fine-tuned end to end.
    "bert-vit-base": ModelConfig(
        text=TextEncoderConfig("bert-base-uncased", max_length=128),
        image=ImageEncoderConfig("timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        fusion=FusionConfig(dim=512, depth=2, num_heads=8),
        tasks=[SENTIMENT],
    ),
}


def list_presets() -> list[str]:
    """Names `create_model(...)` / `model.preset` take: ready-made encoder + fusion + task settings."""
    return list(PRESETS)


def get_config(name_or_config: str | ModelConfig | dict[str, Any] = "tiny", **overrides: Any) -> ModelConfig:
    """Resolve a preset name, a config or a plain dict, then apply overrides (nested dicts or dotted keys)."""
    if isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise ConfigError(f"unknown model preset {name_or_config!r}; available: {list_presets()}")
        cfg = copy.deepcopy(PRESETS[name_or_config])
    elif isinstance(name_or_config, dict):
        cfg = from_dict(ModelConfig, name_or_config)
    elif isinstance(name_or_config, ModelConfig):
        cfg = copy.deepcopy(name_or_config)
    else:
        raise TypeError(f"expected a preset name, ModelConfig or dict, got {type(name_or_config).__name__}")
    return merge(cfg, overrides) if overrides else cfg.validate()


def create_model(
    name_or_config: str | ModelConfig | dict[str, Any] = "tiny", **overrides: Any
) -> FusionModel:
    """Build a `FusionModel`, e.g. `create_model("tiny", fusion={"strategy": "gated"})`.

    Overrides may also use dotted keys: `create_model("tiny", **{"fusion.strategy": "gated"})`.
    """
    cfg = get_config(name_or_config, **overrides)
    check_top_k(cfg)
    return FusionModel(cfg)


def check_top_k(cfg: ModelConfig) -> None:
    """`freeze: top_k` with no block to train anywhere trained fully frozen, silently: never what was meant.
    Checked for a new model only; a saved one of that config still loads (`FusionModel.from_pretrained`)."""
    if cfg.freeze != "top_k":
        return
    k = [cfg.trainable_layers if own is None else own for own in (cfg.text.trainable_layers, cfg.image.trainable_layers)]
    if not any(k):
        raise ConfigError(
            "model.freeze is 'top_k' but it trains no encoder block (model.text.trainable_layers and "
            "model.image.trainable_layers, each model.trainable_layers when unset, are all 0): set "
            "model.text.trainable_layers / model.image.trainable_layers (or model.trainable_layers, for both) to the "
            "number of top blocks to fine-tune, or use freeze: encoders to train the fusion and heads only"
        )
