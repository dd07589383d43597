"""Pre-norm transformer blocks: a self-attention block and a bidirectional co-attention block."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .mlp import Mlp


class TransformerBlock(nn.Module):
    """x + SelfAttn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=mask)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """One stream's half of a co-attention layer: self-attention, cross-attention to the other stream, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, attn_drop=drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, cross=True, attn_drop=drop, proj_drop=drop)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), key_mask=mask)
        x = x + self.cross_attn(self.norm2(x), self.norm_context(context), key_mask=context_mask)
        return x + self.mlp(self.norm3(x))


class CoAttentionLayer(nn.Module):
    """Bidirectional co-attention: text attends to image and image to text, both from the layer's input."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        self.text = CrossAttentionBlock(dim, num_heads, mlp_ratio, drop)
        self.image = CrossAttentionBlock(dim, num_heads, mlp_ratio, drop)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks are bool [B, S], True = a real token; `image_mask` None = every image token is real."""
        new_text = self.text(text, image, mask=text_mask, context_mask=image_mask)
        new_image = self.image(image, text, mask=image_mask, context_mask=text_mask)
        return new_text, new_image
