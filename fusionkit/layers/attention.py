"""One attention module for self- and cross-attention, on `F.scaled_dot_product_attention`.

Self-attention uses one fused qkv projection (one matmul instead of three); cross-attention projects
queries from `x` and a fused kv from `context`. Padding is a boolean key mask (True = real token), so
padded text tokens never influence any output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain softmax attention, the ground truth the SDPA path is tested against. Shapes [B, H, S, Dh]."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head attention. `cross=False`: fused qkv on `x`; `cross=True`: q from `x`, kv from `context`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cross: bool = False,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cross = cross
        self.attn_drop = attn_drop
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """[B, S, n*dim] -> n tensors of [B, H, S, Dh]."""
        B, S, _ = t.shape
        return t.view(B, S, n, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        use_sdpa: bool = True,
    ) -> torch.Tensor:
        """x: [B, S, D]; context: [B, S_kv, D_ctx] (cross only); key_mask: bool [B, S_kv], True = attend."""
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            (q,) = self._heads(self.q(x), 1)
            k, v = self._heads(self.kv(context), 2)
        else:
            if context is not None:
                raise ValueError("self-attention takes no context; build Attention(cross=True) for that")
            q, k, v = self._heads(self.qkv(x), 3)
        if key_mask is not None and key_mask.shape != k.shape[::2]:
            raise ValueError(
                f"key_mask shape {tuple(key_mask.shape)} does not match keys [B, S_kv]={tuple(k.shape[::2])}"
            )
        if use_sdpa:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            drop = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            out = attention_reference(q, k, v, key_mask)
        B, _, S, _ = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, S, -1)))
