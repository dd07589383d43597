"""Frozen-encoder feature cache: run the encoders once per split, then train fusion + heads on their output.

With frozen encoders every epoch (and every fusion strategy, and every seed) would recompute the
same token features. Here they are computed once, under `inference_mode` in eval mode, and stored as
float16 memory-mapped arrays keyed by the encoders' identity (config + a hash of their weights) and
the data cache they were computed from -- not by the fusion config, so one cache serves every
strategy. The price: no train-time image augmentation, since each image is encoded exactly once
(features of the un-augmented image). Use unfrozen encoders or `data.feature_cache: false` to augment.

With `model.freeze: top_k` the cache holds the hidden states ENTERING the trainable top blocks of each
encoder (`FusionModel.feature_splits`), and the model runs those blocks on them: fine-tuning the top
of the encoders then costs only the top blocks per step. The key then covers only the frozen bottom's
weights, so a resumed run (whose top blocks have moved) finds the same cache.

Layout: one `fusionkit.store` folder `<cache_dir>/features-<data cache>-<key>/` with ragged `text`
(float16, one [caption length, Wt] row per item), `image` (float16 [N, P, Wi]), `has_text` / `has_image`
(bool [N]) and `meta.json`. Encoders run only on the sides an item has; a missing side is zeros.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import to_dict
from ..data import CachedDataset, Collator, ImageTransform, move_batch
from ..data.collate import pad_right
from ..store import Store, StoreWriter, is_built, open_or_build

log = logging.getLogger("fusionkit.training")

FEATURES_VERSION = 2  # 2: one store, presence flags


def encoder_key(model: Any) -> str:
    """Encoder identity: configs, preprocessing, where the cache splits each encoder, and a hash of the
    weights that produce the cached tensors (random-init encoders differ by seed)."""
    h = hashlib.sha1()
    cfg = model.config
    splits = _splits(model)
    encoders = (model.text_encoder, model.image_encoder)
    # Where the split is set (trainable_layers) is not part of the key; where it is, below, is. Options
    # added since version 2 enter the key only when set, so existing caches keep their keys.
    configs = [
        {k: v for k, v in to_dict(c).items() if k != "trainable_layers" and not (k == "pool_layers" and v == 1)}
        for c in (cfg.text, cfg.image)
    ]
    parts: list[Any] = [FEATURES_VERSION, *configs, to_dict(model.image_preprocess)]
    if any(s < e.depth for s, e in zip(splits, encoders)):  # full-depth caches keep their old keys
        parts.append(list(splits))
    h.update(json.dumps(parts).encode())
    for module, split in zip(encoders, splits):
        ids = module.layer_ids()
        for name, t in sorted(module.state_dict().items()):
            if split < module.depth and ids.get(name, 0) > split:
                continue  # a trainable top block or the final norm: not part of the cached tensors
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _splits(model: Any) -> tuple[int, int]:
    """Where the cached hidden states enter each encoder (its depth: the cache holds its outputs)."""
    return model.feature_splits or (model.text_encoder.depth, model.image_encoder.depth)


class FeatureDataset(torch.utils.data.Dataset):
    """Items `{"id", "text_features" [T, Wt], "image_features" [P, Wi], "labels", "has_text", "has_image"}`
    read from the memmaps; a missing side's features are zeros (the encoder never ran on it)."""

    def __init__(self, path: str | Path) -> None:
        store = Store(path)
        self.path = store.path
        meta = store.meta
        self.ids: list[str] = meta["ids"]
        self.labels: list[Any] = meta["labels"]  # opaque JSON per row
        self.label_names: dict[str, list[str]] = meta["label_names"]
        self.task_types: dict[str, str] = meta["task_types"]
        self.fingerprint: str | None = meta.get("fingerprint")  # of the data the features were computed from
        self._text = store.ragged("text")
        self._image = store.array("image")
        self._has_text = store.array("has_text")
        self._has_image = store.array("has_image")

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        """Pickle as the path (spawned DataLoader workers reopen the memmaps instead of copying them)."""
        return type(self), (self.path,)

    def __len__(self) -> int:
        return len(self.ids)

    def text_lengths(self) -> np.ndarray:
        """Cached text positions per item (`data.group_by_length` batches similar lengths together)."""
        return self._text.lengths()

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "id": self.ids[i],
            "text_features": torch.from_numpy(self._text[i].astype(np.float32)),
            "image_features": torch.from_numpy(self._image[i].astype(np.float32)),
            "labels": self.labels[i],
            "has_text": bool(self._has_text[i]),
            "has_image": bool(self._has_image[i]),
        }


class FeatureCollator:
    """Pads text features to the longest caption in the batch; ids, labels and presence as `Collator` makes."""

    def __init__(
        self, tasks: Sequence[Any] | Mapping[str, Sequence[str]], task_types: Mapping[str, str] | None = None
    ) -> None:
        self.collator = Collator(0, tasks, task_types)  # `tasks` as `Collator` takes them

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        text, mask = pad_right([it["text_features"] for it in items])
        return {
            "text_features": text,
            "attention_mask": mask,
            "image_features": torch.stack([it["image_features"] for it in items]),
            **self.collator.collate_common(items),
        }


def _on_present(
    encoder: Any, split: int, present: torch.Tensor, *inputs: torch.Tensor
) -> torch.Tensor | None:
    """The hidden state entering `encoder.blocks[split]` (its output at its depth), computed on the rows
    marked present only and scattered into zeros [B, ...]; None if no row is present."""
    if not bool(present.any()):
        return None
    out = encoder.hidden_before(split, *(x[present] for x in inputs))
    full = out.new_zeros((len(present), *out.shape[1:]))
    full[present] = out
    return full


@torch.inference_mode()
def _extract(model: Any, data: CachedDataset, out: StoreWriter, batch_size: int, progress: bool) -> list[Any]:
    """Fill the `text` (ragged), `image`, `has_text`, `has_image` arrays; returns the items' labels, in order."""
    device = model.device
    transform = ImageTransform(model.image_preprocess, train=False).to(device)
    collator = Collator(model.tokenizer.pad_token_id)  # inputs and presence; labels are copied as they are
    items_labels: list[Any] = []

    def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        items_labels.extend(it["labels"] for it in items)
        return collator(items)

    # its own generator: a cache miss must not draw from the global RNG (a run's random stream, hence its
    # dropout and ITM negatives, would depend on whether the cache was already there)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
    n = len(data)
    text_out = out.ragged("text", np.float16, (model.text_encoder.width,))
    has_text, has_image = out.array("has_text", (n,), np.bool_), out.array("has_image", (n,), np.bool_)
    image_out: np.ndarray | None = None
    text_split, image_split = _splits(model)
    encoders = (model.text_encoder, model.image_encoder)
    modes = [m.training for m in encoders]
    for m in encoders:
        m.eval()
    try:
        row = 0
        for batch in tqdm(loader, desc=f"encoding {data.path.name}", unit="batch", disable=not progress):
            batch = move_batch(batch, device, transform)
            tp, ip, mask = batch["text_present"], batch["image_present"], batch["attention_mask"]
            text = _on_present(model.text_encoder, text_split, tp, batch["input_ids"], mask)
            img = _on_present(model.image_encoder, image_split, ip, batch["pixel_values"])
            if row == 0:
                _check_split(model, batch, text, img)
            if img is not None:
                if image_out is None:  # fixed shape: stream straight to disk (rows before stay zeros)
                    image_out = out.array("image", (n, *img.shape[1:]), np.float16)
                image_out[row : row + len(img)] = img.half().cpu().numpy()
            text = mask.new_zeros((*mask.shape, *text_out.row_shape)) if text is None else text
            for t, m in zip(text.half().cpu(), mask.sum(1).tolist()):
                text_out.append(t[:m].numpy())
            has_text[row : row + len(tp)] = tp.cpu().numpy()
            has_image[row : row + len(ip)] = ip.cpu().numpy()
            row += len(tp)
        if image_out is None:  # no image at all: learn the feature shape from one blank image
            h, w = model.image_preprocess.size
            shape = model.image_encoder.hidden_before(image_split, torch.zeros(1, 3, h, w, device=device)).shape[1:]
            image_out = out.array("image", (n, *shape), np.float16)
    finally:
        for m, mode in zip(encoders, modes):
            m.train(mode)
    image_out.flush()
    return items_labels


def _check_split(model: Any, batch: dict[str, Any], text: torch.Tensor | None, image: torch.Tensor | None) -> None:
    """Check on the first batch that running the top blocks on the cached hidden states reproduces the
    encoder's own forward, so an architecture the adapters do not know fails here, not silently."""
    text_split, image_split = _splits(model)
    checks = []
    if text is not None and text_split < model.text_encoder.depth:
        tp, mask = batch["text_present"], batch["attention_mask"]
        ref = model.text_encoder(batch["input_ids"][tp], mask[tp])
        got = model.text_encoder.forward_from(text[tp], text_split, mask[tp])
        keep = mask[tp].bool()
        checks.append(("text", ref[keep], got[keep]))
    if image is not None and image_split < model.image_encoder.depth:
        ip = batch["image_present"]
        ref = model.image_encoder(batch["pixel_values"][ip])
        checks.append(("image", ref, model.image_encoder.forward_from(image[ip], image_split)))
    for side, ref, got in checks:
        err = float((ref - got).abs().max()) / max(1e-6, float(ref.abs().max()))
        if err > 1e-3:
            from ..config import ConfigError

            raise ConfigError(
                f"model.trainable_layers: the {side} encoder's top blocks run on cached hidden states do not "
                f"reproduce its forward (relative error {err:.2g}); this architecture needs an adapter. "
                "Set data.feature_cache: false to fine-tune its top blocks end to end."
            )


def build_features(
    model: Any, data: CachedDataset, cache_dir: str | Path, batch_size: int = 64, progress: bool = True
) -> FeatureDataset:
    """The feature cache for (these encoders, this data cache), computed only if absent."""
    encoders = encoder_key(model)
    key = hashlib.sha1(f"{encoders}|{data.path.name}".encode()).hexdigest()[:16]

    def build(out: StoreWriter) -> dict[str, Any]:
        return {
            "version": FEATURES_VERSION,
            "data": data.path.name,
            "fingerprint": data.fingerprint,
            "encoders": encoders,
            "ids": data.ids,
            "labels": _extract(model, data, out, batch_size, progress),
            "label_names": data.label_names,
            "task_types": data.task_types,
        }

    path = Path(cache_dir) / f"features-{data.path.name}-{key}"
    if is_built(path):
        log.info("feature cache hit: %s", path)
    return FeatureDataset(open_or_build(path, build).path)
