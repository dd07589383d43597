"""Fusion strategies: one class each, registered by name, all behind one interface.

Every strategy takes the projected token sequences of both modalities (same width `dim`) and returns
`views`: [B, V, dim]. V is 1 for strategies that build one joint vector; late fusion returns one view
per modality and the task heads average their per-view logits. Task heads never need to know which
strategy produced their input, so a benchmark can swap strategies by name.

Missing modalities: the model replaces an absent caption or image by a learned placeholder token
before fusion and passes masks that leave only that token visible in absent rows, so attention never
sees the dummy encoder input and no attention row is fully masked. Pooled strategies then fuse the
placeholder vector. Late fusion has one view per modality: `view_mask` tells the heads which views
come from a present modality, so an example's logits average over its present views only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import FusionConfig
from ..layers import CoAttentionLayer, Mlp, TransformerBlock
from ..registry import Registry

FUSION_REGISTRY: Registry[type[FusionStrategy]] = Registry("fusion strategy", "name")
register_fusion = FUSION_REGISTRY.register


def list_fusions() -> list[str]:
    """Names `model.fusion.strategy` takes: the built-ins and every strategy registered so far (plugins
    named by FUSIONKIT_PLUGINS or entry points are imported when an unknown name is looked up, not here)."""
    return list(FUSION_REGISTRY)


def create_fusion(cfg: FusionConfig) -> FusionStrategy:
    return FUSION_REGISTRY.get_class(cfg.strategy)(cfg)


def sides_read(strategy: type[FusionStrategy] | FusionStrategy) -> tuple[str, ...]:
    """The sides ("caption", "image") a strategy reads, from its flags: a unimodal baseline reads one."""
    return tuple(side for side, used in (("caption", strategy.uses_text), ("image", strategy.uses_image)) if used)


def scores_pairs(strategy: type[FusionStrategy] | FusionStrategy) -> bool:
    """Whether the strategy can tell a caption's own image from another's (an `itm` task's question)."""
    return strategy.joins_sides and len(sides_read(strategy)) == 2


def drop_modalities(
    text_present: torch.Tensor, image_present: torch.Tensor, rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality dropout: a `rate` fraction of the complete rows loses its text (half) or its image (half).

    Never both, and rows already missing a side are left alone. One uniform draw per row from torch's
    RNG (checkpointed by the trainer, so a resumed run drops the same rows).
    """
    u = torch.rand(text_present.shape, device=text_present.device)
    drop = text_present & image_present & (u < rate)
    drop_text = drop & (u < rate / 2)
    return text_present & ~drop_text, image_present & ~(drop & ~drop_text)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of [B, S, D], counting only positions where `mask` [B, S] is True."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class FusionStrategy(nn.Module):
    """Base class. `uses_text`/`uses_image` let the model skip an encoder a strategy ignores (a unimodal
    baseline reads one side: predictions, warnings and benchmarks follow these flags, not the name);
    `joins_sides`: some view sees caption and image together, which image-text matching needs (late fusion
    scores each side apart).

    `forward(text, text_mask, image, image_mask)`: text [B, T, dim], text_mask bool [B, T] (True = real
    token), image [B, P, dim], image_mask bool [B, P] or None (all real) -> views [B, V, dim].
    """

    name: str = ""
    num_views: int = 1
    uses_text: bool = True
    uses_image: bool = True
    joins_sides: bool = True

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.register_forward_hook(_check_views, with_kwargs=True)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def view_mask(self, text_present: torch.Tensor, image_present: torch.Tensor) -> torch.Tensor | None:
        """bool [B, V]: views built from a present modality. None: every view is valid (a fused vector)."""
        return None


FUSION_REGISTRY.base = FusionStrategy  # set here: the registry is made before the class it checks


def _check_views(strategy: FusionStrategy, args: tuple[Any, ...], kwargs: dict[str, Any], views: Any) -> None:
    """A strategy's output must be [B, num_views, dim]: a plugin returning [B, dim] otherwise failed in the task
    heads ("head built for 1 view(s), got 32"), naming neither the strategy nor the shape. Shapes only: no sync."""
    batch = next(x.shape[0] for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor))  # every input's
    expected = (batch, strategy.num_views, strategy.dim)
    shape = tuple(views.shape) if isinstance(views, torch.Tensor) else None
    if shape != expected:
        name = strategy.name or type(strategy).__name__
        got = f"shape {list(shape)}" if shape is not None else f"a {type(views).__name__}"
        raise ValueError(f"fusion strategy {name!r} returned {got}; its forward must return views [B, num_views, "
                         f"dim] = {list(expected)} (num_views = {strategy.num_views} is a class attribute of the "
                         "strategy; a single fused vector [B, dim] needs .unsqueeze(1))")  # fmt: skip


@register_fusion("cross_attention")
class CrossAttentionFusion(FusionStrategy):
    """The reference: N bidirectional co-attention layers, then both pooled streams merged by a linear layer."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(
            CoAttentionLayer(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm_text = nn.LayerNorm(cfg.dim)
        self.norm_image = nn.LayerNorm(cfg.dim)
        self.merge = nn.Linear(2 * cfg.dim, cfg.dim)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self.layers:
            text, image = layer(text, text_mask, image, image_mask)
        pooled = torch.cat(
            [masked_mean(self.norm_text(text), text_mask), masked_mean(self.norm_image(image), image_mask)],
            dim=-1,
        )
        return self.merge(pooled).unsqueeze(1)


@register_fusion("merged_attention")
class MergedAttentionFusion(FusionStrategy):
    """Single stream: both sequences concatenated, tagged with a modality embedding, then self-attention."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__(cfg)
        self.modality = nn.Parameter(torch.zeros(2, cfg.dim))
        nn.init.trunc_normal_(self.modality, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = torch.cat([text + self.modality[0], image + self.modality[1]], dim=1)
        if image_mask is None:
            image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        mask = torch.cat([text_mask, image_mask], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return masked_mean(self.norm(x), mask).unsqueeze(1)


class _PooledFusion(FusionStrategy):
    """Strategies that fuse the two mean-pooled sequences (no token-level interaction)."""

    def pool(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_mean(text, text_mask), masked_mean(image, image_mask)


@register_fusion("concat")
class ConcatFusion(_PooledFusion):
    """Pooled text and image vectors concatenated, then an MLP."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__(cfg)
        self.norm = nn.LayerNorm(2 * cfg.dim)
        self.mlp = Mlp(2 * cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dim, drop=cfg.dropout)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pooled = torch.cat(self.pool(text, text_mask, image, image_mask), dim=-1)
        return self.mlp(self.norm(pooled)).unsqueeze(1)


@register_fusion("gated")
class GatedFusion(_PooledFusion):
    """Gated multimodal unit (Arevalo et al., 2017): a learned gate mixes tanh-projected modalities."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__(cfg)
        self.text_proj = nn.Linear(cfg.dim, cfg.dim)
        self.image_proj = nn.Linear(cfg.dim, cfg.dim)
        self.gate = nn.Linear(2 * cfg.dim, cfg.dim)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t, v = self.pool(text, text_mask, image, image_mask)
        z = torch.sigmoid(self.gate(torch.cat([t, v], dim=-1)))
        return (z * torch.tanh(self.text_proj(t)) + (1 - z) * torch.tanh(self.image_proj(v))).unsqueeze(1)


@register_fusion("late")
class LateFusion(_PooledFusion):
    """One view per modality; each task head scores the present views and averages their logits."""

    num_views = 2
    joins_sides = False

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return torch.stack(self.pool(text, text_mask, image, image_mask), dim=1)

    def view_mask(self, text_present: torch.Tensor, image_present: torch.Tensor) -> torch.Tensor:
        return torch.stack([text_present, image_present], dim=1)


@register_fusion("text_only")
class TextOnlyFusion(FusionStrategy):
    """Unimodal baseline: the pooled text features alone."""

    uses_image = False

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return masked_mean(text, text_mask).unsqueeze(1)


@register_fusion("image_only")
class ImageOnlyFusion(FusionStrategy):
    """Unimodal baseline: the pooled image features alone."""

    uses_text = False

    def forward(
        self,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return masked_mean(image, image_mask).unsqueeze(1)
