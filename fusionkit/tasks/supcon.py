"""Supervised contrastive learning (Khosla et al., 2020) as an auxiliary task, driven by another task's labels.

Image-text sentiment models gain from pulling same-label examples together in embedding space
(CLMLF, Li et al. 2022; SPP-SCL, 2023). This task needs no label column of its own: its positives are
the rows that share a label of the classification task named by `params.labels_from`; rows without
that label are left out. Two kinds of views (`params.views`):

* `joint`: one embedding per row, the fusion output (mean of its views). For anchor i, the positives
  are the other labelled rows of its class in the batch:
  L = mean_i -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) ),
  over the anchors that have a positive.
* `cross`: the pooled caption and the pooled image of each row (rows with both modalities only).
  A caption's positives are the images of its class (its own image among them) and the other way
  round, so the loss aligns the two modalities by sentiment, not only by pair (SPP-SCL's inter-modal
  term): L = 1/2 (L_text->image + L_image->text), each with the formula above over the other side.

Params: `labels_from` (required: a classification task of the same model), `temperature` (0.07),
`views` ("joint" | "cross"), `proj_dim` (projection width; default the fusion width). Both kinds
can be combined by adding two supcon tasks. Each view goes through its own 2-layer projection MLP
(SimCLR), and the loss sees L2-normalised projections.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, TaskConfig
from ..models.fusion import masked_mean
from .base import FusionContext, Task, register_task

VIEWS = ("joint", "cross")
PARAMS = ("labels_from", "temperature", "views", "proj_dim")


def supcon_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    contrast: torch.Tensor | None = None,
    contrast_labels: torch.Tensor | None = None,
    temperature: float = 0.07,
) -> torch.Tensor | None:
    """SupCon (Khosla et al., 2020, L_out) of normalised `anchors` [N, D] against `contrast` [M, D].

    `contrast=None`: the anchors are contrasted with each other (self-pairs excluded). Otherwise every
    contrast row is a candidate, including the anchor's own pair. None when no anchor has a positive.
    """
    own = contrast is None
    if own:
        contrast, contrast_labels = anchors, anchor_labels
    logits = anchors @ contrast.T / temperature  # type: ignore[union-attr]
    positive = anchor_labels[:, None] == contrast_labels[None, :]  # type: ignore[index]
    if own:
        self_pair = torch.eye(len(anchors), dtype=torch.bool, device=anchors.device)
        logits = logits.masked_fill(self_pair, float("-inf"))
        positive = positive & ~self_pair
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    counts = positive.sum(1)
    has_positive = counts > 0
    if not bool(has_positive.any()):
        return None
    # where() rather than a product: -inf * 0 on the excluded self pair would give NaN
    summed = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1)
    return -(summed[has_positive] / counts[has_positive]).mean()


class SupConHead(nn.Module):
    """One projection MLP per view kind (Linear-GELU-Linear), outputs L2-normalised."""

    def __init__(self, dim: int, proj_dim: int, num_inputs: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj_dim)) for _ in range(num_inputs)
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """[B, dim] per input -> [B, proj_dim] (one input) or [B, num_inputs, proj_dim]."""
        out = [F.normalize(p(x), dim=-1) for p, x in zip(self.proj, inputs, strict=True)]
        return out[0] if len(out) == 1 else torch.stack(out, dim=1)


@register_task("supcon")
class SupConTask(Task):
    """Label-driven contrastive auxiliary loss; its labels are those of task `params.labels_from`."""

    needs_labels = False
    metric_names: ClassVar[tuple[str, ...]] = ()
    label_source_types: ClassVar[tuple[str, ...]] = ("classification",)  # one class index per row
    params_read = PARAMS
    contrasts_rows: ClassVar[bool] = True  # its positives and negatives are the batch's rows (see alignment.py)

    @classmethod
    def validate_config(cls, cfg: TaskConfig) -> None:
        super().validate_config(cfg)
        p = cfg.params
        unknown = sorted(set(p) - set(PARAMS))
        if unknown:
            raise ConfigError(f"task {cfg.name!r} (supcon): unknown params {unknown}; known: {list(PARAMS)}")
        source = p.get("labels_from")
        if not isinstance(source, str) or not source:
            raise ConfigError(
                f"task {cfg.name!r} (supcon): params.labels_from must name the classification task whose "
                f"labels define the positives, got {source!r}"
            )
        if source == cfg.name:
            raise ConfigError(f"task {cfg.name!r} (supcon): params.labels_from cannot be the task itself")
        if cfg.column is not None or cfg.class_names:  # its labels are the other task's: these would be ignored
            raise ConfigError(f"task {cfg.name!r} (supcon) reads the labels of task {source!r}: remove its column / "
                              "class_names")  # fmt: skip
        t = p.get("temperature", 0.07)
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"task {cfg.name!r} (supcon): params.temperature must be > 0, got {t!r}")
        if p.get("views", "joint") not in VIEWS:
            raise ConfigError(
                f"task {cfg.name!r} (supcon): params.views must be one of {VIEWS}, got {p['views']!r}"
            )
        d = p.get("proj_dim")
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d <= 0):
            raise ConfigError(
                f"task {cfg.name!r} (supcon): params.proj_dim must be a positive int, got {d!r}"
            )

    @property
    def label_source(self) -> str:
        return self.cfg.params["labels_from"]

    @property
    def views(self) -> str:
        return self.cfg.params.get("views", "joint")

    @property
    def reads_sides_apart(self) -> bool:  # type: ignore[override]
        return self.views == "cross"  # each side's own pooled embedding; "joint" contrasts the fusion's

    @property
    def temperature(self) -> float:
        return float(self.cfg.params.get("temperature", 0.07))

    def build_head(self, dim: int, num_views: int, dropout: float) -> nn.Module:
        return SupConHead(dim, self.cfg.params.get("proj_dim") or dim, 2 if self.views == "cross" else 1)

    def forward(self, head: nn.Module, ctx: FusionContext) -> torch.Tensor:
        """joint: [B, P]; cross: [B, 2, P] (caption, image), zero for rows lacking either modality."""
        if self.views == "joint":
            return head(masked_mean(ctx.views, ctx.view_mask))
        if ctx.text is None or ctx.image is None:
            raise ConfigError(
                f"task {self.name!r} (supcon, views=cross) needs a fusion that reads both modalities"
            )
        out = head(masked_mean(ctx.text, ctx.text_mask), ctx.image.mean(1))
        return out if ctx.paired is None else out * ctx.paired[:, None, None].to(out.dtype)

    def loss(self, output: torch.Tensor, target: torch.Tensor | None, mask: torch.Tensor | None) -> Any:
        """The loss over the batch's labelled rows; None when no anchor has a positive there.

        Training in several processes, every rank contrasts the global batch (its projections and labels
        gathered, gradients flowing back to each rank's own rows, as the contrastive task does), so a 2-process
        run trains as one process on the whole batch; a global batch with nothing to score gives every rank a
        zero tied to its projections, so DDP still finds a gradient for each parameter of the head."""
        from ..training.distributed import gather_features, gathering  # lazy: training imports the tasks

        if target is not None and (target.dim() != 1 or target.is_floating_point()):
            raise ConfigError(
                f"task {self.name!r} (supcon): params.labels_from={self.label_source!r} must be a single-label "
                f"classification task (one class index per row), got labels of shape {tuple(target.shape)}"
            )
        if target is None and not gathering():
            return None
        keep = torch.zeros(len(output), dtype=torch.bool, device=output.device)  # no labels on this rank
        if target is not None:
            keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask.bool()
        if self.views == "cross":
            keep = keep & (output.flatten(1).abs().sum(1) > 0)  # rows with both modalities
        z = output.to(torch.promote_types(output.dtype, torch.float32))  # fp32 at least
        y = torch.full_like(keep, -1, dtype=torch.long) if target is None else torch.where(keep, target, -1)
        if gathering():  # the rows left out carry the label -1 across
            z, y = gather_features(z), gather_features(y)
        keep = y >= 0
        loss = self._contrast(z[keep], y[keep]) if int(keep.sum()) >= 2 else None
        return z.sum() * 0 if loss is None and gathering() else loss

    def _contrast(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if self.views == "joint":
            return supcon_loss(z, y, temperature=self.temperature)
        text, image = z[:, 0], z[:, 1]
        t2i = supcon_loss(text, y, image, y, self.temperature)
        i2t = supcon_loss(image, y, text, y, self.temperature)
        return 0.5 * (t2i + i2t)  # type: ignore[operator]  # never None: each row is its own pair's positive
