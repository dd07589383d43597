"""Frozen-encoder feature cache: run the encoders once per split, then train fusion + heads on their output.

With frozen encoders every epoch (and every fusion strategy, and every seed) would recompute the
same token features. Here they are computed once, under `inference_mode` in eval mode, and stored as
float16 memory-mapped arrays keyed by the encoders' identity (config + a hash of their weights) and
the data cache they were computed from -- not by the fusion config, so one cache serves every
strategy. The price: no train-time image augmentation, since each image is encoded exactly once
(features of the un-augmented image). Use unfrozen encoders or `data.feature_cache: false` to augment.

Layout of `<cache_dir>/features-<key>/`: `text.npy` (float16 [sum of caption lengths, Wt], captions
concatenated), `offsets.npy` (int64 [N+1]), `image.npy` (float16 [N, P, Wi]) and `meta.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import to_dict
from ..data import CachedDataset, Collator, ImageTransform, move_batch
from ..data.collate import pad_right

log = logging.getLogger("fusionkit.training")

FEATURES_VERSION = 1


def encoder_key(model: Any) -> str:
    """Encoder identity: configs, preprocessing and a hash of the weights (random-init encoders differ by seed)."""
    h = hashlib.sha1()
    cfg = model.config
    h.update(
        json.dumps(
            [FEATURES_VERSION, to_dict(cfg.text), to_dict(cfg.image), to_dict(model.image_preprocess)]
        ).encode()
    )
    for module in (model.text_encoder, model.image_encoder):
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureDataset(torch.utils.data.Dataset):
    """Items `{"id", "text_features" [T, Wt], "image_features" [P, Wi], "labels"}` read from the memmaps."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.ids: list[str] = meta["ids"]
        self.labels: list[dict[str, Any]] = meta["labels"]
        self.label_names: dict[str, list[str]] = meta["label_names"]
        self.task_types: dict[str, str] = meta["task_types"]
        self._text = np.load(self.path / "text.npy", mmap_mode="r")
        self._offsets = np.load(self.path / "offsets.npy")
        self._image = np.load(self.path / "image.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, b = self._offsets[i], self._offsets[i + 1]
        return {
            "id": self.ids[i],
            "text_features": torch.from_numpy(self._text[a:b].astype(np.float32)),
            "image_features": torch.from_numpy(self._image[i].astype(np.float32)),
            "labels": self.labels[i],
        }


class FeatureCollator:
    """Pads text features to the longest caption in the batch, with the mask and labels `Collator` makes."""

    def __init__(self, label_names: Mapping[str, Sequence[str]], task_types: Mapping[str, str]) -> None:
        self.collator = Collator(0, label_names, task_types)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        text, mask = pad_right([it["text_features"] for it in items])
        return {
            "ids": [str(it["id"]) for it in items],
            "text_features": text,
            "attention_mask": mask,
            "image_features": torch.stack([it["image_features"] for it in items]),
            **self.collator.collate_labels(items),
        }


@torch.inference_mode()
def _extract(
    model: Any, data: CachedDataset, tmp: Path, batch_size: int, progress: bool
) -> list[dict[str, Any]]:
    """Write text/offsets/image arrays into `tmp`; returns the items' raw labels, in order."""
    device = model.device
    transform = ImageTransform(model.image_preprocess, train=False).to(device)
    collator = Collator(model.tokenizer.pad_token_id, data.label_names, data.task_types)
    labels: list[dict[str, Any]] = []

    def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        labels.extend(it["labels"] for it in items)
        return collator(items)

    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate)
    encoders = (model.text_encoder, model.image_encoder)
    modes = [m.training for m in encoders]
    for m in encoders:
        m.eval()
    n, text_chunks, lengths, image = len(data), [], [], None
    try:
        row = 0
        for batch in tqdm(loader, desc=f"encoding {data.path.name}", unit="batch", disable=not progress):
            batch = move_batch(batch, device, transform)
            text = model.text_encoder(batch["input_ids"], batch["attention_mask"]).half().cpu()
            img = model.image_encoder(batch["pixel_values"]).half().cpu().numpy()
            if image is None:  # image features have a fixed shape: stream them straight to disk
                image = np.lib.format.open_memmap(
                    tmp / "image.npy", mode="w+", dtype=np.float16, shape=(n, *img.shape[1:])
                )
            image[row : row + len(img)] = img
            row += len(img)
            for t, m in zip(text, batch["attention_mask"].sum(1).tolist()):
                text_chunks.append(t[:m].numpy())
                lengths.append(m)
    finally:
        for m, mode in zip(encoders, modes):
            m.train(mode)
    image.flush()
    np.save(tmp / "text.npy", np.concatenate(text_chunks))
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return labels


def build_features(
    model: Any, data: CachedDataset, cache_dir: str | Path, batch_size: int = 64, progress: bool = True
) -> FeatureDataset:
    """The feature cache for (these encoders, this data cache), computed only if absent."""
    encoders = encoder_key(model)
    key = hashlib.sha1(f"{encoders}|{data.path.name}".encode()).hexdigest()[:16]
    final = Path(cache_dir) / f"features-{data.path.name}-{key}"
    if (final / "meta.json").is_file():
        log.info("feature cache hit: %s", final)
        return FeatureDataset(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        labels = _extract(model, data, tmp, batch_size, progress)
        meta = {
            "version": FEATURES_VERSION,
            "data": data.path.name,
            "encoders": encoders,
            "ids": data.ids,
            "labels": labels,
            "label_names": data.label_names,
            "task_types": data.task_types,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureDataset(final)
