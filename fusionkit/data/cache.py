"""Tokenize and decode once: a memory-mapped on-disk cache of token ids and encoder-sized uint8 images.

Layout of one cache folder (`<cache_dir>/<name>-<key>/`): `tokens.npy` (int32, all captions
concatenated), `offsets.npy` (int64, N+1), `pixels.npy` (uint8 [N, 3, H, W]) and `meta.json` (ids,
labels, schema, key). The key hashes the dataset fingerprint, the tokenizer's full definition,
`max_length` and the image preprocessing, so any change rebuilds and nothing stale is read. The
folder is written under a temporary name and renamed when complete, so an interrupted build is
never mistaken for a cache hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fusionkit.config import ImagePreprocess
from fusionkit.data.dataset import MultimodalDataset
from fusionkit.data.errors import DataError, OnError, SkipLog, check_policy
from fusionkit.data.image import ImageSource, preprocess_image

log = logging.getLogger("fusionkit.data")

CACHE_VERSION = 1
_CHUNK = 64  # images per worker task: big enough to amortize IPC, small enough for a smooth progress bar


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole fast-tokenizer definition: vocab, normalizer, special tokens
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None), spec.pop("padding", None)  # call-time state, changed by any call
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"


def cache_key(ds: MultimodalDataset, tokenizer: Any, preprocess: ImagePreprocess, max_length: int) -> str:
    payload = [
        CACHE_VERSION,
        ds.fingerprint,
        _tokenizer_identity(tokenizer),
        max_length,
        dataclasses.asdict(preprocess),
    ]
    return hashlib.sha1(json.dumps(payload, default=list).encode()).hexdigest()[:16]


def _decode_chunk(
    pixels_path: str, start: int, images: list[ImageSource], preprocess: ImagePreprocess
) -> list[tuple[int, DataError]]:
    """Worker: decode images[start:...] straight into the memory-mapped pixel array; return failures."""
    pixels = np.load(pixels_path, mmap_mode="r+")
    failures = []
    for i, src in enumerate(images, start=start):
        try:
            pixels[i] = preprocess_image(src, preprocess)
        except DataError as e:
            failures.append((i, e))
    pixels.flush()
    return failures


class CachedDataset(torch.utils.data.Dataset):
    """Items `{"id", "input_ids": long [T], "pixel_values": uint8 [3,H,W], "labels": {task: value|None}}`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.label_names: dict[str, list[str]] = meta["label_names"]
        self.task_types: dict[str, str] = meta["task_types"]
        self.image_size: tuple[int, int] = tuple(meta["image_size"])  # type: ignore[assignment]
        report = self.path / "skipped.jsonl"
        self.skip_report = report if report.is_file() else None
        self._rows = np.asarray(meta["rows"], dtype=np.int64)  # rows of the arrays that decoded fine
        self._ids: list[str] = meta["ids"]
        self._labels: list[dict[str, Any]] = meta["labels"]
        self._tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
        self._offsets = np.load(self.path / "offsets.npy")
        self._pixels = np.load(self.path / "pixels.npy", mmap_mode="r")

    @property
    def ids(self) -> list[str]:
        return [self._ids[r] for r in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(self._rows[i])
        a, b = self._offsets[r], self._offsets[r + 1]
        return {
            "id": self._ids[r],
            "input_ids": torch.from_numpy(self._tokens[a:b].astype(np.int64)),
            "pixel_values": torch.from_numpy(np.array(self._pixels[r])),  # copy: the memmap is read-only
            "labels": self._labels[r],
        }

    def __repr__(self) -> str:
        return f"CachedDataset(n={len(self)}, image_size={self.image_size}, path={str(self.path)!r})"


def build_cache(
    ds: MultimodalDataset,
    tokenizer: Any,
    image_preprocess: ImagePreprocess,
    cache_dir: str | Path,
    max_length: int = 128,
    num_proc: int | None = None,
    on_error: OnError = "raise",
) -> CachedDataset:
    """Return the cache for this (dataset, tokenizer, preprocessing), building it only if absent.

    Images that fail to decode raise `DataError` or, with `on_error="skip"`, are left out of the
    returned dataset and listed in `<cache folder>/skipped.jsonl`.
    """
    policy = check_policy(on_error)
    key = cache_key(ds, tokenizer, image_preprocess, max_length)
    final = Path(cache_dir) / f"{ds.name.replace('/', '_')}-{key}"
    if (final / "meta.json").is_file():
        log.info("cache hit: %s", final)
        return CachedDataset(final)
    if not getattr(tokenizer, "is_fast", False):
        log.warning("%s is not a fast tokenizer: building the cache will be slow", type(tokenizer).__name__)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n = len(ds)
        h, w = image_preprocess.size
        pixels_path = str(tmp / "pixels.npy")
        np.lib.format.open_memmap(pixels_path, mode="w+", dtype=np.uint8, shape=(n, 3, h, w)).flush()
        # Images first: forking workers after the Rust tokenizer has run its threads would disable them.
        images = [ex.image for ex in ds]
        chunks = [(s, images[s : s + _CHUNK]) for s in range(0, n, _CHUNK)]
        workers = min(num_proc or len(os.sched_getaffinity(0)), len(chunks))
        failures: list[tuple[int, DataError]] = []
        with tqdm(total=n, desc=f"decoding images ({workers} procs)", unit="img", disable=n < 256) as bar:
            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    futures = [
                        pool.submit(_decode_chunk, pixels_path, s, c, image_preprocess) for s, c in chunks
                    ]
                    for f, (_, c) in zip(futures, chunks):
                        failures += f.result()
                        bar.update(len(c))
            else:
                for s, c in chunks:
                    failures += _decode_chunk(pixels_path, s, c, image_preprocess)
                    bar.update(len(c))
        skips = SkipLog(policy, f"build_cache({ds.name})")
        for i, err in sorted(failures, key=lambda f: f[0]):
            skips(DataError(err.problem, source=err.source, item=ds[i].id, hint=err.hint))
        bad = {i for i, _ in failures}

        token_lists: list[list[int]] = []
        texts = [ex.text for ex in ds]
        for s in tqdm(range(0, n, 1024), desc="tokenizing", disable=n < 4096):
            enc = tokenizer(
                texts[s : s + 1024], truncation=True, max_length=max_length, return_attention_mask=False
            )
            token_lists += enc["input_ids"]
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=n)
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
        np.save(tmp / "tokens.npy", np.fromiter((t for ts in token_lists for t in ts), dtype=np.int32))

        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "dataset": ds.name,
            "fingerprint": ds.fingerprint,
            "max_length": max_length,
            "image_size": [h, w],
            "preprocess": dataclasses.asdict(image_preprocess),
            "label_names": ds.label_names,
            "task_types": ds.task_types,
            "ids": ds.ids,
            "labels": [ex.labels for ex in ds],
            "rows": [i for i in range(n) if i not in bad],
            "skipped": len(bad),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    skips.finish(final / "skipped.jsonl", n)
    log.info("built cache %s (%d items, %d skipped)", final, n - len(bad), len(bad))
    return CachedDataset(final)
