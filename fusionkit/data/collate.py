"""Batching on the CPU (dynamic padding, uint8 images) and image work on the model's device.

Images travel through the DataLoader as uint8 (4x less to pin and copy than float32) and are
converted, resized, augmented and normalized batched on the device by `ImageTransform`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusionkit.config import ImagePreprocess
from fusionkit.data.image import resize_geometry

Batch = dict[str, Any]


def pad_right(seqs: Sequence[torch.Tensor], value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [len, ...] tensors to the longest (dynamic padding): (padded [B, T, ...], attention mask long [B, T])."""
    padded = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value)
    lengths = torch.tensor([len(x) for x in seqs])
    return padded, (torch.arange(padded.shape[1]) < lengths[:, None]).long()


def schema_tasks(label_names: Mapping[str, Sequence[str]], task_types: Mapping[str, str] | None = None) -> list[Any]:
    """Task objects for a bound dataset's schema (`label_names`, `task_types`), e.g. a cache's."""
    from fusionkit.config import TaskConfig
    from fusionkit.tasks import create_task

    out = []
    for name, names in label_names.items():
        kind = (task_types or {}).get(name, "classification")
        cfg = TaskConfig(name, kind, class_names=list(names) or None, num_classes=len(names) or None)
        out.append(create_task(cfg))
    return out


class Collator:
    """List of `CachedDataset` items -> batch dict, padding captions to the longest in the batch.

    `tasks`: the model's tasks (objects or configs), or a bound dataset's `label_names` mapping (with
    `task_types`). Each task collates its own labels: `labels[task]` and `label_mask[task]` (bool [B],
    False where the label is missing). `text_present` / `image_present` (bool [B]) mark the rows
    that have a caption / an image.
    """

    def __init__(
        self,
        pad_token_id: int,
        tasks: Sequence[Any] | Mapping[str, Sequence[str]] | None = None,
        task_types: Mapping[str, str] | None = None,
    ) -> None:
        from fusionkit.config import TaskConfig
        from fusionkit.tasks import create_task

        if pad_token_id is None:  # a tokenizer without a pad token (GPT-2 style)
            raise ValueError("Collator got pad_token_id=None, a tokenizer without a pad token: give it one "
                             "(tokenizer.pad_token = tokenizer.eos_token) before batching its captions")
        self.pad_token_id = pad_token_id
        if isinstance(tasks, Mapping):
            tasks = schema_tasks(tasks, task_types)
        objs = [create_task(t) if isinstance(t, TaskConfig) else t for t in tasks or []]
        self.tasks = [t for t in objs if t.needs_labels]

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        if not items:
            raise ValueError("cannot collate an empty batch")
        input_ids, attention_mask = pad_right([it["input_ids"] for it in items], self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            **self.collate_common(items),
        }

    def collate_common(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        """ids, labels, label masks and modality presence: what every batch carries besides its inputs."""
        return {
            "ids": [str(it["id"]) for it in items],
            "text_present": torch.tensor([bool(it.get("has_text", True)) for it in items]),
            "image_present": torch.tensor([bool(it.get("has_image", True)) for it in items]),
            **self.collate_labels(items),
        }

    def collate_labels(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        """`{"labels": {task: tensor}, "label_mask": {task: bool [B]}}` for the items' label dicts."""
        labels, label_mask = {}, {}
        for task in self.tasks:
            labels[task.name], label_mask[task.name] = task.collate([it["labels"].get(task.name) for it in items])
        return {"labels": labels, "label_mask": label_mask}


class ImageTransform(nn.Module):
    """uint8 [B,3,h,w] -> normalized float32 [B,3,H,W] on whatever device the batch is on.

    With `train=True` (and the module in training mode) each image gets a mild random resized crop
    and a horizontal flip, all in one batched `grid_sample`; otherwise the output is deterministic.
    """

    def __init__(
        self,
        preprocess: ImagePreprocess,
        train: bool = False,
        scale: tuple[float, float] = (0.7, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ) -> None:
        super().__init__()
        self.preprocess, self.size = preprocess, tuple(preprocess.size)
        self.interpolation = "bicubic" if preprocess.interpolation == "bicubic" else "bilinear"
        self.augment, self.scale, self.ratio, self.flip_p = train, scale, ratio, flip_p
        # (x / 255 - mean) / std == x * scale + shift: one fused pass over the batch.
        norm_scale = 1 / (torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255)
        self.register_buffer("norm_scale", norm_scale, persistent=False)
        self.register_buffer(
            "norm_shift", -torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255 * norm_scale, persistent=False
        )

    def _random_crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        area = torch.empty(b, device=dev).uniform_(*self.scale)
        log_r = torch.empty(b, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        r = log_r.exp()
        w = (area * r).sqrt().clamp(max=1.0)  # crop width / height as fractions of the image
        h = (area / r).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coords, inside the image
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, device=dev) < self.flip_p, -1.0, 1.0)
        # The crop is axis-aligned, so its sampling grid is separable: an outer sum of one x and one y
        # ramp per image (affine_grid's general [B, H*W, 3] matmul is ~10x slower on a CPU).
        out_h, out_w = self.size
        ramp_x = (torch.arange(out_w, device=dev) * 2 + 1) / out_w - 1  # pixel centres, align_corners=False
        ramp_y = (torch.arange(out_h, device=dev) * 2 + 1) / out_h - 1
        gx = (ramp_x[None, :] * (w * flip)[:, None] + cx[:, None])[:, None, :].expand(b, out_h, out_w)
        gy = (ramp_y[None, :] * h[:, None] + cy[:, None])[:, :, None].expand(b, out_h, out_w)
        grid = torch.stack([gx, gy], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.float()
        if self.augment and self.training:
            x = self._random_crop_flip(x)
        elif tuple(x.shape[-2:]) != self.size:
            x = self._resize_crop(x)
        return torch.addcmul(self.norm_shift, x, self.norm_scale)

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Images of another size: scaled and center-cropped as `preprocess_image` does (`resize_geometry`)."""
        (h, w), (th, tw) = x.shape[-2:], self.size
        rh, rw, top, left = resize_geometry(h, w, self.preprocess)
        x = F.interpolate(x, size=(rh, rw), mode=self.interpolation, antialias=True, align_corners=False)
        return x[..., top : top + th, left : left + tw].clamp(0, 255)

    def extra_repr(self) -> str:
        return f"size={self.size}, crop_mode={self.preprocess.crop_mode}, train={self.augment}"


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def move_batch(batch: Batch, device: torch.device | str, transform: nn.Module | None = None) -> Batch:
    """Copy tensors (labels dicts included) to `device` without blocking, then run `transform` there."""
    out = _move(batch, device)
    if transform is not None:
        out["pixel_values"] = transform(out["pixel_values"])
    return out
