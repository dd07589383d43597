"""Regression: float targets (one or `num_classes` per example), MSE loss, MSE/RMSE/MAE/R² metrics.

Targets are standardized with the train split's mean and std (`params.target_mean` / `target_std`, saved
with the model): the head predicts z-scores and its output is mapped back, so prices in the thousands
train like scores in [0, 1], and their loss does not swamp the other tasks' (`params.standardize: false`
trains on the raw values)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TaskConfig
from .base import (
    Task,
    float32_values,
    is_missing,
    label_error,
    labelled_rows,
    register_task,
    replace,
    warn_missing_spellings,
    warn_once,
)

log = logging.getLogger(__name__)


@register_task("regression")
class RegressionTask(Task):
    default_metric = "mse"
    metric_names = ("mse", "rmse", "mae", "r2")
    lower_is_better = ("loss", "mse", "rmse", "mae")  # r2: higher is better
    params_read = ("standardize", "target_mean", "target_std")
    derived_params = ("target_mean", "target_std")

    @classmethod
    def hf_feature(cls, class_names: Sequence[str]) -> Any:
        import datasets as hf

        return hf.Value("float32")

    @classmethod
    def validate_config(cls, cfg: TaskConfig) -> None:
        super().validate_config(cfg)
        if cfg.num_classes is not None and cfg.num_classes < 1:
            raise ConfigError(f"task {cfg.name!r}: num_classes (targets) must be >= 1, got {cfg.num_classes}")
        if not isinstance(cfg.params.get("standardize", True), bool):
            raise ConfigError(f"task {cfg.name!r}: params.standardize must be true or false")
        if cfg.class_names:  # it would be dropped without a word: a regression target has no classes
            raise ConfigError(f"task {cfg.name!r} (regression) has no classes: remove class_names "
                              "(num_classes counts its targets)")  # fmt: skip

    @property
    def num_targets(self) -> int:
        return self.cfg.num_classes or 1

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) of the train targets as tensors like `like`; None before statistics (raw targets)."""
        p = self.cfg.params
        if p.get("target_mean") is None or p.get("target_std") is None:
            return None
        return like.new_tensor(p["target_mean"]), like.new_tensor(p["target_std"])

    def fit_train_statistics(self, values: Sequence[Any]) -> TaskConfig:
        p = self.cfg.params
        if not p.get("standardize", True) or p.get("target_mean") is not None:  # off, or fitted (a resumed run)
            return self.cfg
        rows = torch.tensor([v if isinstance(v, list) else [v] for v in values if v is not None], dtype=torch.float64)
        if len(rows) == 0:
            return self.cfg
        std = rows.std(0, unbiased=False) if len(rows) > 1 else torch.ones(rows.shape[1], dtype=torch.float64)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a constant target: shift it, do not scale
        stats = {"target_mean": [float(v) for v in rows.mean(0)], "target_std": [float(v) for v in std]}
        return replace(self.cfg, params={**p, **stats})

    def resolve_schema(self, values: Sequence[Any], declared: Sequence[str], where: str) -> TaskConfig:
        warn_missing_spellings(self.name, values, where, classes=False)
        return replace(self.cfg, class_names=None, num_classes=self.num_targets)

    def encode(self, value: Any, where: str, item: str) -> Any:
        if is_missing(value):
            return None
        values = value if isinstance(value, list | tuple) else [value]
        try:
            out = [float(v) for v in values]
        except (TypeError, ValueError):
            raise label_error(
                f"target {value!r} of task {self.name!r} is not a number", where, item
            ) from None
        if any(math.isnan(v) for v in out):
            return None
        if any(math.isinf(v) for v in out):
            raise label_error(f"target {value!r} of task {self.name!r} is infinite", where, item,
                              "fix the value or empty the cell (a missing target)")  # fmt: skip
        if len(out) != self.num_targets:
            raise label_error(
                f"{len(out)} target(s) where task {self.name!r} has {self.num_targets}", where, item
            )
        return out[0] if self.num_targets == 1 else out

    def collate(self, values: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.tensor([v is not None for v in values], dtype=torch.bool)
        rows = [
            [0.0] * self.num_targets if v is None else ([v] if self.num_targets == 1 else v) for v in values
        ]
        return torch.tensor(rows, dtype=torch.float32), mask

    def build_head(self, dim: int, num_views: int, dropout: float) -> nn.Module:
        from ..models.heads import TaskHead

        return TaskHead(dim, self.num_targets, num_views, dropout)

    def forward(self, head: nn.Module, ctx: Any) -> torch.Tensor:
        """The head predicts standardized targets; the task's output is on the targets' own scale, in float32 under
        bf16 autocast too (bf16 holds 100000 only to within 512)."""
        out = head(ctx.views, ctx.view_mask).float()
        scale = self._scale(out)
        return out if scale is None else out * scale[1] + scale[0]

    def loss(self, output: torch.Tensor, target: Any, mask: Any) -> Any:
        rows = labelled_rows(output, None if target is None else target.float().reshape(output.shape), mask)
        if rows is None:
            return None
        error = rows[0].float() - rows[1]  # float32: bf16 would round targets of large magnitude
        scale = self._scale(error)
        if scale is not None:  # the error in train-std units: every target (and task) weighs the same
            error = error / scale[1]
        return error.square().mean()

    def metrics(
        self, outputs: torch.Tensor, labels: Any, mask: Any
    ) -> tuple[dict[str, float], dict[str, Any]]:
        if labels is None or mask is None or not bool(mask.any()):
            return {}, {}
        pred, y = outputs[mask].double(), labels[mask].double().reshape(outputs[mask].shape)
        squared = ((pred - y) ** 2).mean(0)  # per target; several targets average as sklearn's "uniform_average"
        spread = ((y - y.mean(0)) ** 2).mean(0)
        scores = {"mse": float(squared.mean()), "rmse": float(squared.sqrt().mean()), "mae": float((pred - y).abs().mean())}
        if len(y) < 2:  # R² of one row is undefined (sklearn: NaN): left out, so run.metric r2 selects nothing on it
            warn_once(log, ("r2 undefined", self.name), "task %s: r2 is undefined on 1 labelled row (sklearn: NaN), so "
                      "it is not reported for rows scored with only one (a val or test split, eval's data); label "
                      "more of them", self.name)  # fmt: skip
            return scores, {}
        # R² of a constant target is undefined: 1 if predicted exactly, else 0 (sklearn's force_finite)
        r2 = torch.where(spread > 0, 1 - squared / spread.clamp_min(1e-300), (squared == 0).double())
        return {**scores, "r2": float(r2.mean())}, {}

    def predict(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """The head computes in float32: each value is written as the shortest decimal that is that float32
        (4218.4, not 4218.39990234375), the same in CSV, JSONL and `model.predict`."""
        return [{self.name: row[0] if len(row) == 1 else row} for row in float32_values(outputs)]

    def true_labels(self, labels: torch.Tensor, mask: torch.Tensor) -> list[Any]:
        return [(row[0] if len(row) == 1 else row) if m else None for row, m in zip(float32_values(labels), mask)]

    def prediction_keys(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_true")
