"""Task heads and the multi-task loss.

A head maps the fusion's views [B, V, dim] to per-task outputs, averaging over views (late fusion).
The loss turns `{task: output}` plus labels and per-task label masks into `{"loss": total, task: loss}`;
an example whose label for a task is missing contributes nothing to that task's loss, and a task with
no labelled example in the batch contributes nothing at all (so unlabeled pairs can still train the
label-free matching and contrastive tasks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TaskConfig

LABEL_FREE_TASKS = ("itm", "contrastive")


def head_out_dim(task: TaskConfig) -> int:
    if task.type in ("classification", "multilabel", "regression"):
        return task.num_classes
    if task.type == "itm":
        return 1
    raise ValueError(f"task {task.name!r} of type {task.type!r} has no linear head")


class TaskHead(nn.Module):
    """LayerNorm + linear per view; the logits of the views are averaged."""

    def __init__(self, dim: int, out_dim: int, num_views: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.views = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, out_dim))
            for _ in range(num_views)
        )

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.shape[1] != len(self.views):
            raise ValueError(f"head built for {len(self.views)} view(s), got {views.shape[1]}")
        return torch.stack([head(views[:, i]) for i, head in enumerate(self.views)], dim=0).mean(0)


class ContrastiveHead(nn.Module):
    """CLIP-style alignment: cosine similarities of text and image embeddings times a learned temperature."""

    def __init__(self, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def forward(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """[B, D] x [B, D] -> logits [B_text, B_image]; the matching pair is on the diagonal."""
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return scale * F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).T


def _masked(
    loss_fn, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor | None:
    if mask is not None:
        if not bool(mask.any()):
            return None
        output, target = output[mask], target[mask]
    return loss_fn(output, target)


def task_loss(
    task: TaskConfig, output: torch.Tensor, target: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor | None:
    """One task's mean loss over its labelled examples; None when nothing in the batch can be scored."""
    if task.type == "contrastive":
        if output.shape[0] < 2:
            return None
        idx = torch.arange(output.shape[0], device=output.device)
        return 0.5 * (F.cross_entropy(output, idx) + F.cross_entropy(output.T, idx))
    if task.type == "itm":
        if output.shape[0] < 2:  # no other pair in the batch to make a negative from
            return None
        target = torch.zeros_like(output)
        target[:, 0] = 1.0  # column 0: the true pair; column 1: the same text with another image
        return F.binary_cross_entropy_with_logits(output, target)
    if target is None:
        raise KeyError(f"task {task.name!r} needs labels but the batch has none for it")
    if task.type == "classification":
        return _masked(F.cross_entropy, output, target.long(), mask)
    if task.type == "multilabel":
        return _masked(F.binary_cross_entropy_with_logits, output, target.float(), mask)
    if task.type == "regression":
        return _masked(F.mse_loss, output, target.float().reshape(output.shape), mask)
    raise ValueError(f"unknown task type {task.type!r}")


class MultiTaskLoss(nn.Module):
    """Weighted sum of task losses: static weights, or learned uncertainty weighting (Kendall et al., 2018).

    Uncertainty weighting learns one log-variance `s_t` per task and minimises sum_t exp(-s_t) L_t + s_t,
    whose optimum is s_t = log L_t: tasks with larger irreducible loss get smaller weights.
    """

    def __init__(self, tasks: list[TaskConfig], weighting: str = "static") -> None:
        super().__init__()
        self.tasks = {t.name: t for t in tasks}
        self.weighting = weighting
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(tasks)))
        elif weighting != "static":
            raise ValueError(f"unknown loss weighting {weighting!r}; expected 'static' or 'uncertainty'")

    def task_weights(self) -> dict[str, float]:
        if self.weighting == "static":
            return {name: t.weight for name, t in self.tasks.items()}
        return {name: float(torch.exp(-s)) for name, s in zip(self.tasks, self.log_vars.detach())}

    def combine(self, losses: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Combine already-computed per-task losses (None = no labelled example) into the total."""
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for i, (name, task) in enumerate(self.tasks.items()):
            loss = losses.get(name)
            if loss is None:
                continue
            out[name] = loss.detach()
            if self.weighting == "static":
                term = task.weight * loss
            else:
                term = torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            total = term if total is None else total + term
        if total is None:
            raise ValueError(
                f"no task in this batch has a label (tasks: {list(self.tasks)}); add a label-free task "
                "('itm' or 'contrastive') to train on unlabeled pairs"
            )
        out["loss"] = total
        return out

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor] | None = None,
        label_mask: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        labels, label_mask = labels or {}, label_mask or {}
        losses = {
            name: task_loss(task, outputs[name], labels.get(name), label_mask.get(name))
            for name, task in self.tasks.items()
        }
        return self.combine(losses)
