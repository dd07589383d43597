"""Transformer feed-forward block."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(
        self, dim: int, hidden_dim: int | None = None, out_dim: int | None = None, drop: float = 0.0
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
