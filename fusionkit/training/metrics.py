"""Per-task evaluation metrics: what people report for each task type, computed with scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
)

from ..config import TaskConfig

# The metric early stopping watches by default, per task type (all "higher is better" except regression).
DEFAULT_METRIC = {
    "classification": "macro_f1",
    "multilabel": "micro_f1",
    "regression": "mse",
    "itm": "accuracy",
    "contrastive": "r@1",
}
LOWER_IS_BETTER = ("mse", "mae", "loss")


def higher_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER


def predictions(task: TaskConfig, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, scores) for a task's logits: probabilities for classification-like tasks."""
    logits = logits.float()
    if task.type == "classification":
        probs = logits.softmax(-1)
        return probs.argmax(-1).numpy(), probs.numpy()
    if task.type == "multilabel":
        probs = logits.sigmoid()
        return (probs > 0.5).long().numpy(), probs.numpy()
    if task.type == "itm":
        probs = logits.sigmoid()
        return (probs > 0.5).long().numpy(), probs.numpy()
    return logits.numpy(), logits.numpy()


def task_metrics(
    task: TaskConfig, logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None
) -> dict[str, Any]:
    """Metrics for one task over a whole split; `report` (per-class dict) for classification."""
    if task.type == "contrastive":  # `logits` here: per-example text->image R@1 hits within each eval batch
        return {"r@1": float(logits.float().mean())}
    if task.type == "itm":  # column 0 is the true pair (label 1), column 1 a mismatched pair (label 0)
        pred, _ = predictions(task, logits)
        target = np.zeros_like(pred)
        target[:, 0] = 1
        return {"accuracy": float((pred == target).mean())}
    if labels is None or mask is None or not bool(mask.any()):
        return {}
    logits, labels = logits[mask], labels[mask]
    pred, _ = predictions(task, logits)
    y = labels.numpy()
    if task.type == "classification":
        names = task.class_names or [str(i) for i in range(task.num_classes)]
        ids = list(range(task.num_classes))
        return {
            "accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=ids, zero_division=0)),
            "weighted_f1": float(f1_score(y, pred, average="weighted", labels=ids, zero_division=0)),
            "report": classification_report(
                y, pred, labels=ids, target_names=names, output_dict=True, zero_division=0
            ),
        }
    if task.type == "multilabel":
        y = y.astype(int)
        return {
            "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        }
    y = y.reshape(pred.shape)
    return {"mse": float(mean_squared_error(y, pred)), "mae": float(mean_absolute_error(y, pred))}
