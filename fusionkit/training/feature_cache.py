"""Frozen-encoder feature cache: run the encoders once per row, then train fusion + heads on their output.

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

Layout: one `fusionkit.store` folder per encoder, `<cache_dir>/features-<data cache>-text-<key>/` and
`features-<dataset>-image-<key>/`, each keyed by that encoder alone (and the image store by the rows'
content, not by the tokenizer), so a change on one side (another text encoder, a text normalization, where
an encoder is split) reuses the other side's features: the image pass is the expensive one. The text store holds `text` (float16,
ragged: one [caption length, Wt] row per item) and `has_text`; the image store `image` (float16
[N, P, Wi]) and `has_image` (bool [N]); both hold `meta.json`. Encoders run only on the items that have
their side; a missing side is zeros.
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
from ..data.cache import CACHE_VERSION
from ..data.collate import pad_right
from ..store import Store, StoreWriter, is_built, open_or_build

log = logging.getLogger("fusionkit.training")

FEATURES_VERSION = 3  # 2: one store, presence flags; 3: one store per encoder
SIDES = ("text", "image")


def side_key(model: Any, side: str) -> str:
    """One encoder's identity: its config (and the image preprocessing), where the cache splits it, and a
    hash of the weights that produce the cached tensors (random-init encoders differ by seed). Where the
    split is set (`trainable_layers`) is not part of it; where it is, is."""
    encoder, cfg = (model.text_encoder, model.config.text) if side == "text" else (model.image_encoder, model.config.image)
    split = _splits(model)[SIDES.index(side)]
    h = hashlib.sha1()
    parts: list[Any] = [FEATURES_VERSION, side, {k: v for k, v in to_dict(cfg).items() if k != "trainable_layers"}]
    # the pixels' own version (data cache's): features of pixels resized by an older rule are not these
    parts += [split, [CACHE_VERSION, to_dict(model.image_preprocess)] if side == "image" else None]
    h.update(json.dumps(parts).encode())
    ids = encoder.layer_ids()
    for name, t in sorted(encoder.state_dict().items()):
        if split < encoder.depth and ids.get(name, 0) > split:
            continue  # a trainable top block or the final norm: not part of the cached tensors
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def encoder_key(model: Any) -> str:
    """Both encoders' identity in one string (`side_key` of each)."""
    return hashlib.sha1("|".join(side_key(model, side) for side in SIDES).encode()).hexdigest()[:16]


def _splits(model: Any) -> tuple[int, int]:
    """Where the cached hidden states enter each encoder (its depth: the cache holds its outputs)."""
    return model.feature_splits or (model.text_encoder.depth, model.image_encoder.depth)


class FeatureDataset(torch.utils.data.Dataset):
    """Items `{"id", "text_features" [T, Wt], "image_features" [P, Wi], "labels", "has_text", "has_image"}`
    read from the memmaps; a missing side's features are zeros (the encoder never ran on it)."""

    def __init__(self, text: str | Path, image: str | Path) -> None:
        text_store, image_store = Store(text), Store(image)
        self.paths = (text_store.path, image_store.path)
        meta = text_store.meta
        self.ids: list[str] = meta["ids"]
        if image_store.meta["ids"] != self.ids:
            raise ValueError(f"feature stores {text} and {image} hold different items; delete them to rebuild")
        self.labels: list[Any] = meta["labels"]  # opaque JSON per row
        self.label_names: dict[str, list[str]] = meta["label_names"]
        self.task_types: dict[str, str] = meta["task_types"]
        self.fingerprint: str | None = meta.get("fingerprint")  # of the data the features were computed from
        self._text = text_store.ragged("text")
        self._has_text = text_store.array("has_text")
        self._image = image_store.array("image")
        self._has_image = image_store.array("has_image")

    def __reduce__(self) -> tuple[Any, tuple[Path, Path]]:
        """Pickle as the paths (spawned DataLoader workers reopen the memmaps instead of copying them)."""
        return type(self), self.paths

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
def _extract(
    model: Any, side: str, data: CachedDataset, out: StoreWriter, batch_size: int, progress: bool
) -> list[Any]:
    """Fill `side`'s store (`text` ragged + `has_text`, or `image` + `has_image`); returns the items' labels."""
    device = model.device
    encoder, split = (model.text_encoder, model.image_encoder)[SIDES.index(side)], _splits(model)[SIDES.index(side)]
    transform = ImageTransform(model.image_preprocess, train=False).to(device) if side == "image" else None
    collator = Collator(model.tokenizer.pad_token_id)  # inputs and presence; labels are copied as they are
    items_labels: list[Any] = []

    def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        items_labels.extend(it["labels"] for it in items)
        batch = collator(items)
        if side == "text":
            del batch["pixel_values"]  # not copied to the device for nothing
        return batch

    # its own generator: a cache miss must not draw from the global RNG (a run's random stream, hence its
    # dropout and ITM negatives, would depend on whether the cache was already there)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
    n = len(data)
    present_out = out.array(f"has_{side}", (n,), np.bool_)
    text_out = out.ragged("text", np.float16, (encoder.width,)) if side == "text" else None
    image_out: np.ndarray | None = None
    mode = encoder.training
    encoder.eval()
    try:
        row = 0
        for batch in tqdm(loader, desc=f"encoding {side} {data.path.name}", unit="batch",
                          disable=None if progress else True):  # fmt: skip
            batch = move_batch(batch, device, transform)
            present, mask = batch[f"{side}_present"], batch["attention_mask"]
            inputs = (batch["input_ids"], mask) if side == "text" else (batch["pixel_values"],)
            feats = _on_present(encoder, split, present, *inputs)
            if row == 0 and feats is not None:
                _check_split(encoder, split, side, feats[present], *(x[present] for x in inputs))
            if text_out is not None:
                feats = mask.new_zeros((*mask.shape, *text_out.row_shape)) if feats is None else feats
                for t, m in zip(feats.half().cpu(), mask.sum(1).tolist()):
                    text_out.append(t[:m].numpy())
            elif feats is not None:
                if image_out is None:  # fixed shape: stream straight to disk (rows before stay zeros)
                    image_out = out.array("image", (n, *feats.shape[1:]), np.float16)
                image_out[row : row + len(feats)] = feats.half().cpu().numpy()
            present_out[row : row + len(present)] = present.cpu().numpy()
            row += len(present)
        if side == "image" and image_out is None:  # no image at all: the feature shape from one blank image
            h, w = model.image_preprocess.size
            shape = encoder.hidden_before(split, torch.zeros(1, 3, h, w, device=device)).shape[1:]
            image_out = out.array("image", (n, *shape), np.float16)
    finally:
        encoder.train(mode)
    if image_out is not None:
        image_out.flush()
    return items_labels


def _check_split(encoder: Any, split: int, side: str, feats: torch.Tensor, *inputs: torch.Tensor) -> None:
    """Check on the first batch that running the top blocks on the cached hidden states reproduces the
    encoder's own forward, so an architecture the adapters do not know fails here, not silently."""
    if split >= encoder.depth:
        return
    ref = encoder(*inputs)
    got = encoder.forward_from(feats, split, *inputs[1:])
    if side == "text":
        keep = inputs[1].bool()
        ref, got = ref[keep], got[keep]
    err = float((ref - got).abs().max()) / max(1e-6, float(ref.abs().max()))
    if err > 1e-3:
        from ..config import ConfigError

        raise ConfigError(
            f"model.trainable_layers: the {side} encoder's top blocks run on cached hidden states do not "
            f"reproduce its forward (relative error {err:.2g}); this architecture needs an adapter. "
            "Set data.feature_cache: false to fine-tune its top blocks end to end."
        )


def build_features(
    model: Any, data: CachedDataset, cache_dir: str | Path, batch_size: int = 64, progress: bool = True,
    only_if_built: bool = False,
) -> FeatureDataset | None:
    """The feature cache for (these encoders, this data cache): one store per encoder, each computed only if
    absent, so changing one encoder (or where it is split) leaves the other's features in place.
    `only_if_built`: None unless both stores are there."""
    paths = []
    for side in SIDES:
        encoder = side_key(model, side)
        # the image side depends on the rows' ids and images, not on their captions or labels, nor on the tokenizer
        # or max_length that name the data cache: another text encoder or text normalization, an edited caption or
        # label reuse the image features (the expensive pass), as does a copy of the file under another name
        images = getattr(data, "image_fingerprint", data.fingerprint)
        inputs = data.path.name if side == "text" else images
        key = hashlib.sha1(f"{encoder}|{inputs}".encode()).hexdigest()[:16]
        name = data.path.name if side == "text" else "content"  # the image side is named by its content alone

        def build(out: StoreWriter, side: str = side, encoder: str = encoder) -> dict[str, Any]:
            return {
                "version": FEATURES_VERSION,
                "side": side,
                "data": data.path.name,
                "fingerprint": data.fingerprint,
                "encoder": encoder,
                "ids": data.ids,
                "labels": _extract(model, side, data, out, batch_size, progress),
                "label_names": data.label_names,
                "task_types": data.task_types,
            }

        path = Path(cache_dir) / f"features-{name}-{side}-{key}"
        if is_built(path):
            log.info("feature cache hit: %s", path)
        elif only_if_built:
            return None
        paths.append(open_or_build(path, build).path)
    return FeatureDataset(*paths)
