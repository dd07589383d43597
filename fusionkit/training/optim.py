"""AdamW parameter groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Four groups: {encoder, rest} x {decay, no decay}.

    Weight decay only on matrices (ndim >= 2): decaying biases and norm scales only hurts. Encoders
    are pretrained, so they get `lr * encoder_lr_scale` to avoid wiping out what they know.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.split(".")[0] in ("text_encoder", "image_encoder"), p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_encoder, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": cfg.lr * (cfg.encoder_lr_scale if is_encoder else 1.0),
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "name": f"{'encoder' if is_encoder else 'fusion'}/{'decay' if decay else 'no_decay'}",
            }
        )
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    fused = all(p.is_cuda for g in groups for p in g["params"])  # fused AdamW: one kernel on CUDA
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """LR multiplier: linear warmup from ~0, then cosine decay to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup, cfg.min_lr_ratio))
