"""Inference over a whole split, shared by the trainer's evaluation and `fusionkit eval / predict`: no
optimizer, run dir or distributed set-up here, so the CLI's inference commands import only this."""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import Collator, ImageTransform, move_batch
from ..models import FusionModel, model_inputs


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" (this process's GPU, else the CPU) or a torch device name that this machine has: a GPU that is
    not there is a ConfigError before any work, not a driver traceback midway."""
    from ..config import ConfigError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU on this machine; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available here; use auto or cpu")
    return device


@torch.inference_mode()
def run_inference(
    model: FusionModel,
    loader: torch.utils.data.DataLoader,
    transform: torch.nn.Module | None = None,
    amp: torch.dtype | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, Any]:
    """Outputs for a whole split: `{"ids", "outputs": {task: cpu tensor}, "labels", "label_mask", "present": {side:
    bool [N]}, "loss"}`.

    Contrastive outputs are [B, B] per batch, so they are reduced to per-example R@1 hits here.
    """
    was_training = model.training
    model.eval()
    device = model.device
    ids: list[str] = []
    outs: dict[str, list[torch.Tensor]] = {t: [] for t in model.tasks}
    labels: dict[str, list[torch.Tensor]] = {}
    masks: dict[str, list[torch.Tensor]] = {}
    terms: dict[str, list[float]] = {}  # task -> [sum of its batch losses x normaliser, normalisers' sum]
    present: dict[str, list[torch.Tensor]] = {"caption": [], "image": []}  # the sides each row has
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # a loader without a generator of its own (the CLI's) draws its seed from the global RNG when it starts: it
        # starts before the seed, so that evaluation's own draws (ITM's negatives) are the same for every loader,
        # and `fusionkit eval` scores a split as training's evaluation did
        batches = iter(loader)
        torch.manual_seed(0)
        for batch in tqdm(batches, total=operator.length_hint(loader) or None, desc=desc, leave=False,
                          disable=None if progress else True):  # fmt: skip
            batch = move_batch(batch, device, transform)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = model(**model_inputs(batch))
            ids += batch["ids"]
            if "text_present" in batch and "image_present" in batch:
                present["caption"].append(batch["text_present"].cpu())
                present["image"].append(batch["image_present"].cpu())
            for name, task in model.tasks.items():
                outs[name].append(task.eval_output(out[name].float()).cpu())
            for name in batch.get("labels", {}):
                labels.setdefault(name, []).append(batch["labels"][name].cpu())
                masks.setdefault(name, []).append(batch["label_mask"][name].cpu())
            losses = model.loss(out, batch.get("labels"), batch.get("label_mask"))
            for name, task in model.tasks.items():
                if name in losses:
                    n = _rows_scored(task, batch)
                    term = terms.setdefault(name, [0.0, 0.0])
                    term[0], term[1] = term[0] + float(losses[name]) * n, term[1] + n
    model.train(was_training)
    return {
        "ids": ids,
        "outputs": {k: torch.cat(v) for k, v in outs.items() if v},
        "labels": {k: torch.cat(v) for k, v in labels.items()},
        "label_mask": {k: torch.cat(v) for k, v in masks.items()},
        "present": {k: torch.cat(v) for k, v in present.items() if v},
        "loss": split_loss(model, terms),
        "loss_terms": terms,  # per task: (loss sum, normaliser), to merge ranks' shards
    }


def _rows_scored(task: Any, batch: dict[str, Any]) -> float:
    """What a task's batch loss averages over: its labelled rows (all of them for label-free tasks), or with class
    weights their weights' sum (`loss_normaliser`, as the trainer weighs micro-batches): the split's loss is then
    one weighted mean, whatever the batch size (a weighted mean of batches weighted by row counts is not)."""
    if not task.needs_labels and task.label_source == task.name:
        return len(batch["ids"])
    source = task.label_source
    mask = batch.get("label_mask", {}).get(source)
    if not task.needs_labels:  # labels borrowed from another task (supcon): its labelled rows
        return int(mask.sum()) if mask is not None else 0
    return task.loss_normaliser(batch.get("labels", {}).get(source), mask, len(batch["ids"]))


def split_loss(model: FusionModel, terms: dict[str, list[float]]) -> float | None:
    """The split's loss: each task's loss averaged over the rows labelled for it, then weighted as in training.

    Averaging each batch's weighted total over all its rows instead would make the loss depend on how batches
    fall (a task with no labelled row in a batch drops out of it): another number at another batch size."""
    means = {name: torch.tensor(total / n) for name, (total, n) in terms.items() if n}
    return float(model.criterion.combine(means)["loss"]) if means else None


def inference_loader(
    model: FusionModel, data: Any, batch_size: int = 128
) -> tuple[torch.utils.data.DataLoader, ImageTransform]:
    """An in-order loader over a `CachedDataset` and the eval image transform, for `run_inference`."""
    collate = Collator(model.tokenizer.pad_token_id, list(model.tasks.values()))
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, collate_fn=collate, pin_memory=model.device.type == "cuda"
    )
    return loader, ImageTransform(model.image_preprocess, train=False).to(model.device)
