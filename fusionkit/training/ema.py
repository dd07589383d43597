"""Exponential moving average of the trainable weights (Polyak averaging; timm's `ModelEmaV3`).

The average is a cheap variance reduction: evaluation, the best checkpoint and the final model use
it, while the optimizer keeps stepping the raw weights. In a checkpoint the model file holds the EMA
weights (so `best/` and `predict` serve them) and the training state holds the raw ones, so a resume
restores both exactly.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the early, random weights
are forgotten quickly (TensorFlow's `ExponentialMovingAverage` with `num_updates`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """Shadow copies of `model`'s trainable parameters, updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().clone() for n in self.names]
        self.updates = 0
        self._raw: list[torch.Tensor] | None = None  # the raw weights while the EMA ones are applied

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * weights."""
        if self._raw is not None:
            raise RuntimeError("EMA.update while the EMA weights are applied")
        weights = [p.detach() for p in self._params(model)]
        torch._foreach_lerp_(self.shadow, weights, 1.0 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The EMA weights in `model` inside the block, the raw ones back after it (re-entrant)."""
        if self._raw is not None:
            yield
            return
        params = self._params(model)
        self._raw = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, self.shadow)
        try:
            yield
        finally:
            torch._foreach_copy_(params, self._raw)
            self._raw = None

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """The raw weights of `model` (the checkpoint's model file is saved with the EMA ones applied)."""
        raw = self._raw if self._raw is not None else [p.detach().clone() for p in self._params(model)]
        return {"updates": self.updates, "raw": dict(zip(self.names, raw))}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any] | None, model: nn.Module) -> None:
        """`model` holds the EMA weights of a checkpoint: they become the shadow, `state` gives the raw ones back.

        `state=None` (a checkpoint saved without EMA): the average starts from the loaded weights."""
        params = self._params(model)
        self.shadow = [p.detach().clone() for p in params]
        if state is None:
            self.updates = 0
            return
        missing = sorted(set(self.names) - set(state["raw"]))
        if missing:
            raise ValueError(
                f"the checkpoint's EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}"
            )
        torch._foreach_copy_(params, [state["raw"][n].to(p.device) for n, p in zip(self.names, params)])
        self.updates = int(state["updates"])


def ema_applied(ema: ModelEMA | None, model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """`ema.applied(model)`, or nothing to do when training without EMA."""
    return contextlib.nullcontext() if ema is None else ema.applied(model)
