"""Task heads and the multi-task loss.

A head maps the fusion's views [B, V, dim] to per-task outputs, averaging over views (late fusion).
Each task's own loss lives on its class in `fusionkit.tasks`; `MultiTaskLoss` weights and sums them
into `{"loss": total, task: loss}`. An example whose label for a task is missing contributes nothing
to that task's loss, and a task with no labelled example in the batch contributes nothing at all (so
unlabelled pairs can train the label-free matching and contrastive tasks beside labelled ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, TaskConfig
from .fusion import masked_mean


class TaskHead(nn.Module):
    """LayerNorm + linear per view; the logits of the views are averaged."""

    def __init__(self, dim: int, out_dim: int, num_views: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.views = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, out_dim))
            for _ in range(num_views)
        )

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """views [B, V, dim]; view_mask bool [B, V] (None = all): average the logits of present views only."""
        if views.shape[1] != len(self.views):
            raise ValueError(f"head built for {len(self.views)} view(s), got {views.shape[1]}")
        logits = torch.stack([head(views[:, i]) for i, head in enumerate(self.views)], dim=1)
        return masked_mean(logits, view_mask)


class ContrastiveHead(nn.Module):
    """CLIP-style alignment: cosine similarities of text and image embeddings times a learned temperature."""

    def __init__(self, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def forward(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """[B, D] x [B, D] -> logits [B_text, B_image]; the matching pair is on the diagonal."""
        text, image = self.pairs(text_emb, image_emb).unbind(1)
        return text @ image.T

    def pairs(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """[B, 2, D]: each row's text embedding (normalized, times the temperature) and image embedding
        (normalized), so that any set of rows gives its logits as `text @ image.T` (a whole split in eval)."""
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return torch.stack([scale * F.normalize(text_emb, dim=-1), F.normalize(image_emb, dim=-1)], 1)


class MultiTaskLoss(nn.Module):
    """Weighted sum of task losses: static weights, or learned uncertainty weighting (Kendall et al., 2018).

    Uncertainty weighting learns one log-variance `s_t` per task and minimises sum_t exp(-s_t) L_t + s_t,
    whose optimum is s_t = log L_t: tasks with larger irreducible loss get smaller weights.
    """

    def __init__(self, tasks: list[TaskConfig], weighting: str = "static") -> None:
        from ..tasks import check_task_names, create_task

        super().__init__()
        self.tasks = {t.name: create_task(t) for t in tasks}
        check_task_names(list(self.tasks.values()))  # predictions that would overwrite each other
        for task in self.tasks.values():  # a task borrowing another's labels (supcon) needs a labelled one
            source = self.tasks.get(task.label_source)
            if task.label_source != task.name and (source is None or not source.needs_labels):
                raise ConfigError(
                    f"task {task.name!r} takes its labels from task {task.label_source!r}, which is not a "
                    f"labelled task of this model; labelled tasks: {[n for n, t in self.tasks.items() if t.needs_labels]}"
                )
            if source is not task and task.label_source_types and source.cfg.type not in task.label_source_types:
                raise ConfigError(f"task {task.name!r} takes its labels from task {task.label_source!r} "
                                  f"({source.cfg.type}), but needs a {' or '.join(task.label_source_types)} task")  # fmt: skip
        self.weighting = weighting
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(tasks)))
        elif weighting != "static":
            raise ValueError(f"unknown loss weighting {weighting!r}; expected 'static' or 'uncertainty'")

    def task_weights(self) -> dict[str, float]:
        """Each task's weight in the total: its config's, or uncertainty weighting's learned exp(-s_t)."""
        if self.weighting == "static":
            return {name: t.cfg.weight for name, t in self.tasks.items()}
        log_vars = self.log_vars.detach()
        if hasattr(log_vars, "full_tensor"):  # sharded by FSDP (a DTensor): every rank gathers the whole vector
            log_vars = log_vars.full_tensor()
        return {name: float(torch.exp(-s)) for name, s in zip(self.tasks, log_vars.float().cpu())}

    def combine(
        self,
        losses: Mapping[str, torch.Tensor | None],
        anchor: torch.Tensor | None = None,
        scales: Mapping[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Combine already-computed per-task losses (None = no labelled example) into the total.

        `scales`: each task's term times its micro-batch's share of the accumulation window (the trainer's; see
        `Task.loss_normaliser`); a task whose share is 0 (no row of weight > 0) adds nothing, not its 0/0.
        A batch in which no task can be scored gets a zero loss tied to `anchor` (an output of the
        model), so backward still runs and every process of a distributed run takes the same steps.
        """
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for i, (name, task) in enumerate(self.tasks.items()):
            loss = losses.get(name)
            scale = 1.0 if scales is None else scales.get(name, 0.0)
            if loss is None or scale == 0:
                continue
            out[name] = loss.detach()
            if self.weighting == "static":
                term = task.cfg.weight * loss
            else:
                term = torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            term = term if scales is None else term * scale
            total = term if total is None else total + term
        if total is None:
            total = anchor.sum() * 0.0 if anchor is not None else torch.zeros(())
            if self.weighting == "uncertainty":
                total = total + self.log_vars.sum() * 0.0
        out["loss"] = total
        return out

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor] | None = None,
        label_mask: Mapping[str, torch.Tensor] | None = None,
        scales: Mapping[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`{"loss": weighted total, task: its loss}`; `scales`: see `combine`."""
        labels, label_mask = labels or {}, label_mask or {}
        labelled = [n for n, t in self.tasks.items() if t.needs_labels]
        unknown = sorted((set(labels) | set(label_mask)) - set(self.tasks))
        if unknown or (labelled and not labels and len(labelled) == len(self.tasks)):
            # a misspelled key would leave every labelled task without a loss: a zero loss that trains nothing
            raise ValueError(f"labels {unknown or '(none)'} name none of this model's labelled tasks {labelled}: "
                             "pass labels={task name: tensor}")  # fmt: skip
        losses = {
            name: checked_loss(task, task.loss(outputs[name], labels.get(task.label_source),
                                               label_mask.get(task.label_source)))  # fmt: skip
            for name, task in self.tasks.items()
        }
        anchor = next((o for o in outputs.values() if o.requires_grad), next(iter(outputs.values()), None))
        out = self.combine(losses, anchor, scales)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # a task with nothing to score on this rank (no labelled row here) still ties its head in: DDP waits for
            # every parameter's gradient, and its head's would never come (one process leaves the head untouched)
            idle = [outputs[n] for n in self.tasks if outputs[n].requires_grad
                    and (losses.get(n) is None or (scales is not None and scales.get(n, 0.0) == 0))]
            if idle:
                out["loss"] = out["loss"] + sum(o.sum() for o in idle) * 0.0
        return out


def checked_loss(task: Any, loss: Any) -> torch.Tensor | None:
    """A task's loss as the Task contract has it (a scalar float tensor, or None: nothing to score), else an error
    naming the task and its class: a plugin's slip is not a torch traceback from deep inside training."""
    if loss is None or (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
        return loss
    got = (f"a {loss.dtype} tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor)
           else f"{type(loss).__name__} {loss!r}"[:200])  # fmt: skip
    raise TypeError(f"{task.describe()}: loss must return a scalar float tensor (the mean over its labelled rows, "
                    f"e.g. `.mean()` of a per-row loss) or None when the batch has nothing to score; got {got}")
