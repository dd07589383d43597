"""`FusionModel`: two encoders, projections to a common width, a fusion strategy and task heads.

Data flow (shapes for batch B):

    input_ids, attention_mask [B, T] --TextEncoder--> [B, T, Wt] --text_proj--> [B, T, dim] --.
                                                                                             |--fusion--> views [B, V, dim]
    pixel_values [B, 3, H, W] ------ImageEncoder--> [B, P, Wi] --image_proj-> [B, P, dim] --'        |
                                                                                       heads: {task: logits}

Encoder outputs can be passed in directly (`text_features=`, `image_features=`), which is how the
trainer's frozen-encoder feature cache trains many fusion strategies on one encoder pass.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..config import ConfigError, ImagePreprocess, ModelConfig, from_dict, to_dict
from .encoders import ImageEncoder, TextEncoder, drop_unused_heads, set_top_layers_trainable
from .fusion import create_fusion, masked_mean
from .heads import LABEL_FREE_TASKS, ContrastiveHead, MultiTaskLoss, TaskHead, head_out_dim

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "text_features", "image_features")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a collated batch that `FusionModel.forward` takes (labels, ids etc. left out)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


class FusionModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        text_encoder: TextEncoder | None = None,
        image_encoder: ImageEncoder | None = None,
    ) -> None:
        super().__init__()
        self.config = config.validate()
        self.text_encoder = text_encoder or TextEncoder.from_config(config.text)
        self.image_encoder = image_encoder or ImageEncoder.from_config(config.image)
        dim = config.fusion.dim
        self.text_proj = nn.Linear(self.text_encoder.width, dim)
        self.image_proj = nn.Linear(self.image_encoder.width, dim)
        self.fusion = create_fusion(config.fusion)
        self.heads = nn.ModuleDict()
        for task in config.tasks:
            if task.type == "contrastive":
                self.heads[task.name] = ContrastiveHead()
            else:
                self.heads[task.name] = TaskHead(
                    dim, head_out_dim(task), self.fusion.num_views, config.fusion.dropout
                )
        self.criterion = MultiTaskLoss(config.tasks, config.loss_weighting)
        self.set_trainable(config.freeze, config.trainable_layers)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self.text_encoder.tokenizer

    @property
    def image_preprocess(self) -> ImagePreprocess:
        return self.image_encoder.preprocess

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def tasks(self) -> dict[str, Any]:
        return {t.name: t for t in self.config.tasks}

    @property
    def needs_text(self) -> bool:
        return self.fusion.uses_text or any(t.type in LABEL_FREE_TASKS for t in self.config.tasks)

    @property
    def needs_image(self) -> bool:
        return self.fusion.uses_image or any(t.type in LABEL_FREE_TASKS for t in self.config.tasks)

    # ------------------------------------------------------------------ freezing
    def set_trainable(self, freeze: str = "none", trainable_layers: int = 0) -> None:
        """`none`: train all; `encoders`: train fusion + heads only; `top_k`: also the top k encoder layers."""
        self.requires_grad_(True)
        for encoder in (self.text_encoder, self.image_encoder):
            if freeze == "encoders":
                encoder.requires_grad_(False)
            elif freeze == "top_k":
                set_top_layers_trainable(encoder.model, trainable_layers)
            elif freeze != "none":
                raise ConfigError(f"freeze must be 'none', 'encoders' or 'top_k', got {freeze!r}")
            drop_unused_heads(encoder.model)  # unused mask tokens stay frozen whatever the policy
        # An encoder the strategy never reads (unimodal baselines) is frozen: it gets no gradient anyway.
        if not self.needs_text:
            self.text_encoder.requires_grad_(False)
            self.text_proj.requires_grad_(False)
        if not self.needs_image:
            self.image_encoder.requires_grad_(False)
            self.image_proj.requires_grad_(False)
        self.config.freeze, self.config.trainable_layers = freeze, trainable_layers
        self.train(self.training)

    @property
    def encoders_frozen(self) -> bool:
        return not any(
            p.requires_grad for enc in (self.text_encoder, self.image_encoder) for p in enc.parameters()
        )

    def train(self, mode: bool = True) -> FusionModel:
        """Fully frozen encoders stay in eval mode: their features then match the frozen-feature cache."""
        super().train(mode)
        for encoder in (self.text_encoder, self.image_encoder):
            if not any(p.requires_grad for p in encoder.parameters()):
                encoder.eval()
        return self

    # ------------------------------------------------------------------ encoding
    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        return attention_mask

    def _check_image(self, pixel_values: torch.Tensor) -> None:
        h, w = self.image_preprocess.size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be [batch, 3, {h}, {w}], got shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                "pixel_values must be normalized floats; uint8 images go through fusionkit.data.ImageTransform first"
            )

    def text_tokens(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text tokens [B, T, dim] and their boolean mask [B, T]."""
        if text_features is None:
            if input_ids is None:
                raise ValueError("text input missing: pass input_ids (+ attention_mask) or text_features")
            attention_mask = self._check_text(input_ids, attention_mask)
            text_features = self.text_encoder(input_ids, attention_mask)
        elif attention_mask is None:
            attention_mask = torch.ones(
                text_features.shape[:2], dtype=torch.long, device=text_features.device
            )
        return self.text_proj(text_features), attention_mask.bool()

    def image_tokens(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected image tokens [B, P, dim]."""
        if image_features is None:
            if pixel_values is None:
                raise ValueError("image input missing: pass pixel_values or image_features")
            self._check_image(pixel_values)
            image_features = self.image_encoder(pixel_values)
        return self.image_proj(pool_patch_grid(image_features, self.config.fusion.image_grid))

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """Text-only embedding [B, dim]: masked mean of the projected text tokens."""
        tokens, mask = self.text_tokens(input_ids, attention_mask)
        emb = masked_mean(tokens, mask)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image-only embedding [B, dim]: mean of the projected patch tokens."""
        emb = self.image_tokens(pixel_values).mean(1)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _fuse(
        self, text: torch.Tensor | None, mask: torch.Tensor | None, image: torch.Tensor | None
    ) -> torch.Tensor:
        if text is not None and image is not None and text.shape[0] != image.shape[0]:
            raise ValueError(f"text batch size {text.shape[0]} != image batch size {image.shape[0]}")
        return self.fusion(text, mask, image)

    def encode(self, normalize: bool = False, **inputs: torch.Tensor) -> torch.Tensor:
        """Joint embedding [B, dim] of image-text pairs (the mean of the fusion's views)."""
        views = self._views(**inputs)[0]
        emb = views.mean(1)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _views(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        text = mask = image = None
        if self.needs_text:
            text, mask = self.text_tokens(input_ids, attention_mask, text_features)
        if self.needs_image:
            image = self.image_tokens(pixel_values, image_features)
        return self._fuse(text, mask, image), text, mask, image

    # ------------------------------------------------------------------ forward / loss
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-task outputs: `{task: logits}`. ITM gives [B, 2] (true pair, shuffled pair); contrastive [B, B]."""
        views, text, mask, image = self._views(
            input_ids, attention_mask, pixel_values, text_features, image_features
        )
        out: dict[str, torch.Tensor] = {}
        for task in self.config.tasks:
            head = self.heads[task.name]
            if task.type == "contrastive":
                out[task.name] = head(masked_mean(text, mask), image.mean(1))
            elif task.type == "itm":
                out[task.name] = torch.cat(
                    [head(views), head(self._fuse(text, mask, _shuffle_pairs(image)))], dim=1
                )
            else:
                out[task.name] = head(views)
        return out

    def loss(
        self,
        outputs: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor] | None = None,
        label_mask: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`{"loss": weighted total, task: task loss}`; unlabeled examples are masked out per task."""
        return self.criterion(outputs, labels, label_mask)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors and the encoders' own configs + tokenizer (no pickle)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save(directory / "text_encoder")
        self.image_encoder.save(directory / "image_encoder")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "fusionkit": __version__})
        tmp.replace(directory / WEIGHTS_NAME)
        meta = {
            "fusionkit_version": __version__,
            "model": to_dict(self.config),
            "image_preprocess": to_dict(self.image_preprocess),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> FusionModel:
        """Rebuild from `save_pretrained` output (or a run directory holding one) without any download."""
        directory = _find_checkpoint_dir(Path(directory))
        meta = json.loads((directory / CONFIG_NAME).read_text())
        if "model" not in meta:
            raise ConfigError(f"{directory / CONFIG_NAME} is not a fusionkit model config (no 'model' key)")
        config = from_dict(ModelConfig, meta["model"]).validate()
        text = TextEncoder.from_config(config.text, saved_dir=directory / "text_encoder")
        image = ImageEncoder.from_config(
            config.image, saved_dir=directory / "image_encoder" if config.image.backend == "hf" else None
        )
        if "image_preprocess" in meta:
            image.preprocess = from_dict(ImagePreprocess, meta["image_preprocess"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls(config, text, image)
        model.load_weights(directory / WEIGHTS_NAME)
        return model.to(map_location)

    def load_weights(self, path: str | Path) -> None:
        """Load a safetensors state dict, failing with the mismatching keys/shapes if it is from another config."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt"
            ) from e
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} does not match this model's config: {len(missing)} missing keys {missing[:5]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]}. "
                "Load it with the config.json saved beside it."
            )
        self.load_state_dict(state)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def pool_patch_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool the square patch grid of [B, prefix + h*w, D] tokens to grid x grid; prefix tokens (CLS) kept."""
    if grid <= 0:
        return tokens
    n = tokens.shape[1]
    side = math.isqrt(n)
    if n - side * side > 8:  # beyond CLS + a few register tokens: not a square patch grid
        raise ValueError(f"image_grid needs a square patch grid, got {n} image tokens")
    if side <= grid:
        return tokens
    prefix, patches = tokens[:, : n - side * side], tokens[:, n - side * side :]
    b, _, d = patches.shape
    pooled = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(b, d, side, side), grid)
    return torch.cat([prefix, pooled.flatten(2).transpose(1, 2)], dim=1)


def _shuffle_pairs(image: torch.Tensor) -> torch.Tensor:
    """Pair every text with another example's image: roll by a random non-zero offset (no fixed points)."""
    b = image.shape[0]
    if b < 2:
        return image
    shift = int(torch.randint(1, b, (1,)))
    return image.roll(shift, dims=0)


def _find_checkpoint_dir(directory: Path) -> Path:
    """Accept a model directory, or a run directory with the model in `best/` or `last/`."""
    for candidate in (directory, directory / "best", directory / "model", directory / "last"):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    raise FileNotFoundError(
        f"{directory} holds no fusionkit model ({CONFIG_NAME} + {WEIGHTS_NAME}, directly or in best/ or last/)"
    )
