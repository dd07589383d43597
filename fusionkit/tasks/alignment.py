"""Label-free alignment tasks on image-caption pairs: image-text matching and contrastive (InfoNCE).

Neither needs a label column, so unlabelled pairs train them beside labelled ones. Only rows that have
both a caption and an image can be matched; the rest are left out of these losses.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..models.fusion import masked_mean
from .base import FusionContext, Task, register_task


def _paired(x: torch.Tensor, ctx: FusionContext) -> torch.Tensor:
    return x if ctx.paired is None else x[ctx.paired]


def shuffled_global_images(image: torch.Tensor) -> torch.Tensor | None:
    """For each local row, another example's image from the global batch; None when it has no other pair.

    The global batch (every rank's rows while training in several processes) is rolled by one random
    non-zero offset that all ranks agree on (no fixed points), and each rank gets its own rows of the
    result: exactly the rows one process holding the whole batch computes, from the same random stream.
    """
    from ..training.distributed import roll_global_rows  # lazy: training imports the tasks

    return roll_global_rows(image)


@register_task("itm")
class ImageTextMatchingTask(Task):
    """Binary: does this caption belong to this image? Negatives are derangements of the (global) batch.

    Output [B, 2]: column 0 scores the true pair, column 1 the caption with another example's image.
    """

    needs_labels = False
    default_metric = "accuracy"
    metric_names = ("accuracy",)
    # its negatives come from the rows of the batch: gradient accumulation's micro-batches give it fewer
    contrasts_rows: ClassVar[bool] = True

    def build_head(self, dim: int, num_views: int, dropout: float) -> nn.Module:
        from ..models.heads import TaskHead

        return TaskHead(dim, 1, num_views, dropout)

    def forward(self, head: nn.Module, ctx: FusionContext) -> torch.Tensor:
        from ..training.distributed import gathering

        text, mask, image = ctx.text, ctx.text_mask, ctx.image
        if ctx.paired is not None:
            text, mask, image = text[ctx.paired], mask[ctx.paired], image[ctx.paired]
        positive = head(_paired(ctx.views, ctx))  # before the draw below: the random stream's order of old
        negatives = shuffled_global_images(image)
        if image.shape[0] == 0:  # no pair here (attention takes no empty batch); tied to the gathered
            negative = positive if negatives is None else positive + negatives.sum() * 0  # images' backward
        else:
            negative = head(ctx.fuse(text, mask, image if negatives is None else negatives))
        output = torch.cat([positive, negative], dim=1)
        if negatives is None and gathering():  # no other pair in the global batch: nothing to learn here,
            return output[:0]  # and every rank knows it (`loss` then gives each a zero)
        return output

    def loss(self, output: torch.Tensor, target: Any, mask: Any) -> Any:
        """The mean over the batch's pairs; None when it has no other pair to make a negative from.

        Training in several processes, every rank computes the global batch's mean from every rank's scores
        (gathered, gradients flowing back to the rank that owns each): one loss, which the trainer weighs like
        the contrastive task's, so an uneven split trains as one process would."""
        from ..training.distributed import gather_features, gathering  # lazy: training imports the tasks

        if gathering():
            output = gather_features(output)
            if not len(output):  # no negative anywhere in the global batch: a zero whose backward still runs
                return output.sum()
        elif output.shape[0] < 2:  # no other pair in the batch to make a negative from
            return None
        target = torch.zeros_like(output)
        target[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(output, target)

    def eval_output(self, output: torch.Tensor) -> torch.Tensor:
        return (output.float().sigmoid() > 0.5) == torch.tensor(
            [True, False], device=output.device
        )  # correct decisions [B, 2]

    def metrics(
        self, outputs: torch.Tensor, labels: Any, mask: Any
    ) -> tuple[dict[str, float], dict[str, Any]]:
        return ({"accuracy": float(outputs.float().mean())} if len(outputs) else {}), {}


@register_task("contrastive")
class ContrastiveTask(Task):
    """CLIP-style InfoNCE between pooled text and image embeddings; makes the two spaces comparable."""

    needs_labels = False
    default_metric = "r@1"
    metric_names = ("r@1",)
    contrasts_rows: ClassVar[bool] = True  # as ITM's: the batch's other pairs are its negatives
    reads_sides_apart = True  # pooled text and image projections, not the fusion's views

    def build_head(self, dim: int, num_views: int, dropout: float) -> nn.Module:
        from ..models.heads import ContrastiveHead

        return ContrastiveHead()

    def forward(self, head: nn.Module, ctx: FusionContext) -> torch.Tensor:
        """Training: [N, N] logits over the pairs of every process (the global batch's negatives, gathered as
        open_clip does). Evaluation: [B, 2, D] pair embeddings (`ContrastiveHead.pairs`), so that R@1 ranks
        each caption against every image of the split, whatever the eval batch size."""
        from ..training.distributed import gather_features  # lazy: training imports the tasks

        text, image = _paired(masked_mean(ctx.text, ctx.text_mask), ctx), _paired(ctx.image.mean(1), ctx)
        if not head.training:
            return head.pairs(text, image)
        return head(gather_features(text), gather_features(image))

    def loss(self, output: torch.Tensor, target: Any, mask: Any) -> Any:
        from ..training.distributed import gathering

        if output.dim() == 3:  # evaluation's pair embeddings: InfoNCE within the batch, as in training
            output = output[:, 0] @ output[:, 1].T
        if output.shape[0] < 2:  # no negative; ranks hold the same gathered pairs: each ties its head in for DDP
            return output.sum() * 0 if gathering() else None
        idx = torch.arange(output.shape[0], device=output.device)
        return 0.5 * (F.cross_entropy(output, idx) + F.cross_entropy(output.T, idx))

    def metrics(
        self, outputs: torch.Tensor, labels: Any, mask: Any
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Text->image R@1 over every complete pair of the split (chunked: memory grows with the split, not N^2)."""
        if len(outputs) < 2:
            return {}, {}
        text, image = outputs[:, 0].float(), outputs[:, 1].float()
        hits = sum(int((text[s : s + 1024] @ image.T).argmax(-1).eq(torch.arange(s, min(s + 1024, len(text)))).sum())
                   for s in range(0, len(text), 1024))  # fmt: skip
        return {"r@1": hits / len(text)}, {}
