"""AdamW parameter groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: {fusion + heads, each encoder layer group} x {decay, no decay}.

    Weight decay only on matrices (ndim >= 2) that the encoder does not exempt (position embeddings,
    class tokens: its `no_weight_decay`): decaying biases and norm scales only hurts. Encoders are
    pretrained, so they get `lr * encoder_lr_scale`; with `layer_decay` each block below the top one
    gets another factor of it (the top block and the final norm get none, the embeddings `depth` of them),
    so the general lower layers move least (BEiT, timm `param_groups_layer_decay`).
    """
    groups: dict[tuple[bool, int, bool], list[nn.Parameter]] = {}
    encoders = {n: getattr(model, n, None) for n in ("text_encoder", "image_encoder")}
    schema = {n: (e.no_weight_decay(), e.layer_ids(), e.depth) for n, e in encoders.items() if hasattr(e, "depth")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top, _, sub = name.partition(".")
        below_top, decay = 0, p.ndim >= 2
        if top in schema:
            no_decay, ids, depth = schema[top]
            decay = decay and sub not in no_decay
            if cfg.layer_decay is not None:
                below_top = max(0, depth - ids.get(sub, 0))
        groups.setdefault((top in schema, below_top, decay), []).append(p)
    out = []
    for (is_encoder, below_top, decay), params in sorted(groups.items()):
        scale = cfg.encoder_lr_scale * (cfg.layer_decay or 1.0) ** below_top if is_encoder else 1.0
        name = "encoder" + (f"/-{below_top}" if cfg.layer_decay is not None else "") if is_encoder else "fusion"
        out.append(
            {
                "params": params,
                "lr": cfg.lr * scale,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "name": f"{name}/{'decay' if decay else 'no_decay'}",
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
