"""Reusable building blocks, independent of any model."""

from .attention import Attention, attention_reference
from .blocks import CoAttentionLayer, CrossAttentionBlock, TransformerBlock
from .mlp import Mlp

__all__ = [
    "Attention",
    "CoAttentionLayer",
    "CrossAttentionBlock",
    "Mlp",
    "TransformerBlock",
    "attention_reference",
]
