"""`embed(model, texts, images)`: joint (or single-modality) vectors for any number of pairs, streamed.

Inputs are consumed lazily, one batch at a time, so memory stays bounded whatever the number of
pairs: lists, generators and `datasets.Dataset`s (its `text` / `image` columns) all work. Images may be
PIL images, paths or encoded bytes; they go through the same decode + resize + crop as the training
cache, so vectors match what the model saw in training.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .data import ImageTransform, preprocess_image
from .models import FusionModel

_MISSING = object()


def _is_hf_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("datasets") and hasattr(x, "column_names")


def _column(x: Any, name: str) -> Iterable[Any]:
    return (row[name] for row in x) if _is_hf_dataset(x) else x


def _batches(
    texts: Iterable[Any] | None, images: Iterable[Any] | None, size: int
) -> Iterator[tuple[list, list]]:
    """Zip the two streams (either may be None) into lists of `size`, checking they have equal length."""
    streams = [iter(s) if s is not None else itertools.repeat(None) for s in (texts, images)]
    pairs = (
        zip(*streams)
        if texts is None or images is None
        else itertools.zip_longest(*streams, fillvalue=_MISSING)
    )
    while chunk := list(itertools.islice(pairs, size)):
        if any(v is _MISSING for pair in chunk for v in pair):
            raise ValueError("texts and images have different lengths")
        t, i = zip(*chunk)
        yield list(t), list(i)


def embed(
    model: FusionModel,
    texts: Iterable[str] | Any | None = None,
    images: Iterable[Any] | None = None,
    batch_size: int = 64,
    normalize: bool = True,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Vectors [N, dim] (float32): joint for pairs, text-only or image-only when one side is given.

    `texts` may be a `datasets.Dataset`: its `text` column is used, and its `image` column too when
    `images` is not given and the dataset has one. `device` moves the model there first.
    """
    if _is_hf_dataset(texts):
        ds = texts
        texts = _column(ds, "text") if "text" in ds.column_names else None
        if images is None and "image" in ds.column_names:
            images = _column(ds, "image")
    elif _is_hf_dataset(images):
        images = _column(images, "image")
    if texts is None and images is None:
        raise ValueError("embed() needs texts, images or both")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    if device is not None:
        model.to(device)
    dev = model.device
    transform = ImageTransform(model.image_preprocess, train=False).to(dev)
    max_length = model.config.text.max_length
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode(), ThreadPoolExecutor(4) as pool:  # PIL decoding releases the GIL
            for text_batch, image_batch in _batches(texts, images, batch_size):
                inputs: dict[str, torch.Tensor] = {}
                if texts is not None:
                    tok = model.tokenizer(text_batch, padding=True, truncation=True, max_length=max_length,
                                          return_tensors="pt")  # fmt: skip
                    inputs["input_ids"] = tok["input_ids"].to(dev, non_blocking=True)
                    inputs["attention_mask"] = tok["attention_mask"].to(dev, non_blocking=True)
                if images is not None:
                    pixels = pool.map(lambda im: preprocess_image(im, model.image_preprocess), image_batch)
                    uint8 = torch.from_numpy(np.stack(list(pixels)))
                    inputs["pixel_values"] = transform(uint8.to(dev, non_blocking=True))
                if images is None:
                    vec = model.encode_text(
                        inputs["input_ids"], inputs["attention_mask"], normalize=normalize
                    )
                elif texts is None:
                    vec = model.encode_image(inputs["pixel_values"], normalize=normalize)
                else:
                    vec = model.encode(normalize=normalize, **inputs)
                out.append(vec.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.config.fusion.dim), dtype=np.float32)
