"""Tokenize and decode once: a memory-mapped on-disk cache of token ids and encoder-sized uint8 images.

One `fusionkit.store` folder per (dataset, tokenizer, max_length, preprocessing) at
`<cache_dir>/<name>-<key>/`: ragged `tokens` (int32, one row per caption), `pixels` (uint8
[N, 3, H, W]), `has_text` / `has_image` (bool [N]) and `meta.json` (ids, labels as opaque JSON, schema,
key, the rows skipped and why). The key hashes the dataset fingerprint (which covers image bytes, so a
file replaced under the same name, size and mtime is seen), the tokenizer's full definition,
`max_length` and the preprocessing: any change rebuilds and nothing stale is read. The store is
published atomically, so an interrupted or concurrent build is never mistaken for a cache hit.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fusionkit.config import ImagePreprocess
from fusionkit.data.dataset import MultimodalDataset, clean_text
from fusionkit.data.errors import DataError, OnError, check_policy
from fusionkit.data.image import ImageSource, preprocess_image
from fusionkit.data.sources.rows import SKIP_ROWS
from fusionkit.store import Store, StoreWriter, is_built, open_or_build

log = logging.getLogger("fusionkit.data")

CACHE_VERSION = 7  # 2: one store, presence flags, skip list replayed, content fingerprint; 3: resize sizes
# rounded as timm and HF do (floor, truncation: `resize_geometry`), not to nearest, and a JPEG shrunk on decode only
# far above the target (`DRAFT_MARGIN`); 4: one-pass resize (no PIL reducing_gap), as timm/torchvision/HF; 5: an
# enlarged image resized whole, then cropped; 6: an HF shortest_edge resize before a non-square crop scales the
# shorter side as HF does: older caches hold other pixels, so they are rebuilt once; 7: every store's meta.json
# carries its own checksum (`store.META_SHA`; feature caches key on this version too), so one without is damaged
# the token ids' own version (not the pixels', which image feature caches key on): 2: captions stripped and capped
# (`clean_text`) when tokenized, as the processor does; a dataset built in Python, not read, kept its spaces before
TOKENS_VERSION = 2
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
        TOKENS_VERSION,
        ds.fingerprint,
        _tokenizer_identity(tokenizer),
        max_length,
        dataclasses.asdict(preprocess),
    ]
    return hashlib.sha1(json.dumps(payload, default=list).encode()).hexdigest()[:16]


def _decode_chunk(
    pixels_path: str, start: int, images: list[ImageSource | None], preprocess: ImagePreprocess
) -> list[tuple[int, DataError]]:
    """Worker: decode images[start:...] straight into the memory-mapped pixel array; return failures.
    Missing images (None) stay zeros and are never decoded."""
    pixels = np.load(pixels_path, mmap_mode="r+")
    failures = []
    for i, src in enumerate(images, start=start):
        if src is None:
            continue
        try:
            pixels[i] = preprocess_image(src, preprocess)
        except DataError as e:
            failures.append((i, e))
    pixels.flush()
    return failures


class CachedDataset(torch.utils.data.Dataset):
    """Items `{"id", "input_ids": long [T], "pixel_values": uint8 [3,H,W], "labels": {task: value|None},
    "has_text": bool, "has_image": bool}` (a missing caption is tokenized as "", a missing image is zeros).
    """

    def __init__(self, path: str | Path) -> None:
        store = Store(path)
        self.path = store.path
        meta = store.meta
        self.label_names: dict[str, list[str]] = meta["label_names"]
        self.task_types: dict[str, str] = meta["task_types"]
        self.image_size: tuple[int, int] = tuple(meta["image_size"])  # type: ignore[assignment]
        self.fingerprint: str = meta["fingerprint"]  # of the dataset it was built from (run dirs record it)
        # of its ids and images alone (a cache built before it was recorded: the whole fingerprint)
        self.image_fingerprint: str = meta.get("image_fingerprint", self.fingerprint)
        report = self.path / "skipped.jsonl"
        self.skip_report = report if report.is_file() else None
        self.skipped: list[dict[str, Any]] = meta["skipped"]  # rows left out, with the error of each
        self._rows = np.asarray(meta["rows"], dtype=np.int64)  # rows of the arrays that decoded fine
        self._ids: list[str] = meta["ids"]
        self._labels: list[Any] = meta["labels"]  # opaque JSON per row
        self._tokens = store.ragged("tokens")
        self._pixels = store.array("pixels")
        self._has_text = store.array("has_text")
        self._has_image = store.array("has_image")

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        """Pickle as the path (spawned DataLoader workers reopen the memmaps instead of copying them)."""
        return type(self), (self.path,)

    @property
    def ids(self) -> list[str]:
        return [self._ids[r] for r in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def text_lengths(self) -> np.ndarray:
        """Tokens per caption, per item (`data.group_by_length` batches similar lengths together)."""
        return self._tokens.lengths()[self._rows]

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(self._rows[i])
        return {
            "id": self._ids[r],
            "input_ids": torch.from_numpy(self._tokens[r].astype(np.int64)),
            "pixel_values": torch.from_numpy(np.array(self._pixels[r])),  # copy: the memmap is read-only
            "labels": self._labels[r],
            "has_text": bool(self._has_text[r]),
            "has_image": bool(self._has_image[r]),
        }

    def __repr__(self) -> str:
        return f"CachedDataset(n={len(self)}, image_size={self.image_size}, path={str(self.path)!r})"


class SplitView(torch.utils.data.Dataset):
    """One split's rows of a cache built for all splits together (a `CachedDataset` or a feature cache).

    Caching the splits' union instead of each split makes every re-split of the same rows (another
    `split_seed`, other ratios, k folds) find the one cache: the encoders never run twice on a row.
    Rows the cache skipped (undecodable images under `on_error: skip`) are left out, as a split's own
    cache leaves them out. `fingerprint` is the split's (run dirs record it per split)."""

    def __init__(self, base: Any, ids: Sequence[str], fingerprint: str) -> None:
        position = {id_: k for k, id_ in enumerate(base.ids)}
        self.base = base
        self._pos = np.asarray([position[i] for i in ids if i in position], dtype=np.int64)
        self.ids: list[str] = [i for i in ids if i in position]
        self.fingerprint = fingerprint
        self.label_names: dict[str, list[str]] = base.label_names
        self.task_types: dict[str, str] = base.task_types
        self.skip_report: Path | None = getattr(base, "skip_report", None)  # the rows the cache left out, all splits'

    def __len__(self) -> int:
        return len(self._pos)

    def text_lengths(self) -> np.ndarray:
        return self.base.text_lengths()[self._pos]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.base[int(self._pos[i])]

    def __repr__(self) -> str:
        return f"SplitView(n={len(self)}, of={self.base!r})"


def _decode_images(
    ds: MultimodalDataset, out: StoreWriter, preprocess: ImagePreprocess, num_proc: int | None, progress: bool = True
) -> list[tuple[int, DataError]]:
    """Decode every present image into `pixels`, in parallel; returns (row, error) of those that failed."""
    n = len(ds)
    h, w = preprocess.size
    out.array("pixels", (n, 3, h, w), np.uint8).flush()
    pixels_path = str(out.path / "pixels.npy")
    images = [ex.image for ex in ds]
    chunks = [(s, images[s : s + _CHUNK]) for s in range(0, n, _CHUNK)]
    workers = max(1, min(num_proc or len(os.sched_getaffinity(0)), len(chunks)))
    failures: list[tuple[int, DataError]] = []
    with tqdm(total=n, desc=f"decoding images ({workers} procs)", unit="img", disable=True if n < 256 or not progress else None) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                # PIL images stay here: pickling one decodes it in this process, outside the per-item guard
                futures = {s: pool.submit(_decode_chunk, pixels_path, s, c, preprocess) for s, c in chunks
                           if not any(isinstance(im, Image.Image) for im in c)}  # fmt: skip
                for s, c in chunks:
                    try:
                        failures += futures[s].result() if s in futures else _decode_chunk(pixels_path, s, c, preprocess)
                    except BrokenProcessPool:  # a decoder took its process down (segfault, OOM kill)
                        raise RuntimeError(
                            f"an image decoder crashed a worker process at or after row {s} (item "
                            f"{ds[s].id!r}); run with num_proc=1 under `python -X faulthandler` to find "
                            "the file, then remove it"
                        ) from None
                    bar.update(len(c))
        else:
            for s, c in chunks:
                failures += _decode_chunk(pixels_path, s, c, preprocess)
                bar.update(len(c))
    return sorted(failures, key=lambda f: f[0])


def _tokenize(ds: MultimodalDataset, out: StoreWriter, tokenizer: Any, max_length: int, progress: bool = True) -> None:
    """Token ids of every caption (a missing one as ""), appended row by row to the ragged `tokens`; then says
    what a caption loses silently: words the vocabulary lacks ([UNK]) and the tokens past `max_length`."""
    tokens = out.ragged("tokens", np.int32)
    texts = ["" if ex.text is None else clean_text(ex.text)[0] for ex in ds]  # as the readers and the processor
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", ())) - {unk}
    counts = {"tokens": 0, "unknown": 0, "only_unknown": 0}
    full: list[str] = []  # captions at max_length tokens: cut, or exactly that long (told apart below)
    for s in tqdm(range(0, len(texts), 1024), desc="tokenizing", disable=True if len(texts) < 4096 or not progress else None):
        chunk = texts[s : s + 1024]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, return_attention_mask=False)
        for text, ids in zip(chunk, enc["input_ids"], strict=True):
            tokens.append(ids)
            content = [i for i in ids if i not in special]
            unknown = content.count(unk) if unk is not None else 0
            counts["tokens"] += len(content)
            counts["unknown"] += unknown
            counts["only_unknown"] += bool(content) and unknown == len(content)
            if len(ids) >= max_length:
                full.append(text)
    # one token more shows which of them lost words (only these few captions are tokenized again), by a copy: a
    # fast tokenizer keeps the last call's truncation, and a model saved later would write max_length + 1
    longer = (copy.deepcopy(tokenizer)(full, truncation=True, max_length=max_length + 1, return_attention_mask=False)
              if full else None)  # fmt: skip
    counts["cut"] = sum(len(ids) > max_length for ids in longer["input_ids"]) if longer else 0
    _report_tokens(ds.name, sum(ex.text is not None for ex in ds), max_length, getattr(tokenizer, "unk_token", None),
                   **counts)  # fmt: skip


def _report_tokens(
    name: str, captions: int, max_length: int, unk: str | None, tokens: int, unknown: int, only_unknown: int, cut: int
) -> None:
    """One line each: many unknown tokens (a script the vocabulary lacks: CJK, Arabic or emoji on an English
    WordPiece vocabulary trains as [UNK]), and the share of captions cut at `max_length`. A warning from 20% of the
    tokens or 1% of the captions all-unknown (one emoji-only tweet among thousands is no news); a line below that."""
    if only_unknown or unknown:
        many = unknown >= 0.2 * tokens or only_unknown >= 0.01 * captions
        log.log(logging.WARNING if many else logging.INFO,
                "%s: %d of %d caption tokens (%.1f%%) are the unknown token %s, and %d of %d captions are nothing "
                "else: the text encoder's vocabulary lacks their words (another script, emoji?); a multilingual "
                "encoder reads them", name, unknown, tokens, 100 * unknown / tokens, unk, only_unknown,
                captions)  # fmt: skip
    if cut:
        share = cut / max(captions, 1)
        log.log(logging.WARNING if share >= 0.1 else logging.INFO,
                "%s: %d of %d captions (%.0f%%) are longer than model.text.max_length=%d tokens and were cut there",
                name, cut, captions, 100 * share, max_length)  # fmt: skip


def _build(
    ds: MultimodalDataset,
    tokenizer: Any,
    preprocess: ImagePreprocess,
    max_length: int,
    num_proc: int | None,
    policy: OnError,
    key: str,
    progress: bool,
    out: StoreWriter,
) -> dict[str, Any]:
    """Fill a store folder; under "raise" the first bad image aborts the build (nothing is published)."""
    n = len(ds)
    # Images first: forking workers after the Rust tokenizer has run its threads would disable them.
    failures = _decode_images(ds, out, preprocess, num_proc, progress)
    skipped = [
        {"row": i, "item": ds[i].id, "source": _where(e.source, ds[i]), "problem": e.problem, "hint": e.hint}
        for i, e in failures
    ]
    if skipped and policy == "raise":
        raise _error(skipped[0])
    _tokenize(ds, out, tokenizer, max_length, progress)
    out.array("has_text", (n,), np.bool_)[:] = [ex.text is not None for ex in ds]
    out.array("has_image", (n,), np.bool_)[:] = [ex.image is not None for ex in ds]
    if skipped:
        with (out.path / "skipped.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({k: r[k] for k in ("item", "source", "problem")}) + "\n" for r in skipped)
    bad = {r["row"] for r in skipped}
    return {
        "version": CACHE_VERSION,
        "key": key,
        "dataset": ds.name,
        "fingerprint": ds.fingerprint,
        "image_fingerprint": ds.image_fingerprint,  # the image features' content key (captions, labels aside)
        "max_length": max_length,
        "image_size": list(preprocess.size),
        "preprocess": dataclasses.asdict(preprocess),
        "label_names": ds.label_names,
        "task_types": ds.task_types,
        "ids": ds.ids,
        "labels": [ex.labels for ex in ds],
        "rows": [i for i in range(n) if i not in bad],
        "skipped": skipped,
    }


def _where(source: str | None, example: Any) -> str | None:
    """Where a bad image is: its file's path, or for bytes or an in-memory image ("<45 image bytes>") the row of
    the table that held it (`file[row]`), which the user can find."""
    if source and source.startswith("<"):
        return (example.meta or {}).get("source") or source
    return source


def _error(row: dict[str, Any]) -> DataError:
    said = row["hint"] and "on_error" in row["hint"]  # the image's own hint may say how to skip already
    hint = row["hint"] if said else f"{row['hint'] or 'replace it'}, or skip such rows: {SKIP_ROWS}"
    return DataError(row["problem"], source=row["source"], item=row["item"], hint=hint)


def build_cache(
    ds: MultimodalDataset,
    tokenizer: Any,
    image_preprocess: ImagePreprocess,
    cache_dir: str | Path,
    max_length: int = 128,
    num_proc: int | None = None,
    on_error: OnError = "raise",
    only_if_built: bool = False,
    progress: bool = True,
) -> CachedDataset | None:
    """Return the cache for this (dataset, tokenizer, preprocessing), building it only if absent
    (`only_if_built`: None instead of building).

    Images that fail to decode raise `DataError` or, with `on_error="skip"`, are left out of the
    returned dataset and listed in `<cache folder>/skipped.jsonl`. The policy is not part of the key: a
    cache built under "skip" serves a later "raise" run by raising the error of its first bad row.
    """
    policy = check_policy(on_error)
    key = cache_key(ds, tokenizer, image_preprocess, max_length)
    path = Path(cache_dir) / f"{ds.name.replace('/', '_')}-{key}"
    if is_built(path):
        log.info("cache hit: %s", path)
    elif only_if_built:
        return None
    elif not getattr(tokenizer, "is_fast", False):
        log.warning("%s is not a fast tokenizer: building the cache will be slow", type(tokenizer).__name__)
    build = functools.partial(_build, ds, tokenizer, image_preprocess, max_length, num_proc, policy, key, progress)
    data = CachedDataset(open_or_build(path, build).path)
    if data.skipped:
        if policy == "raise":
            raise _error(data.skipped[0])
        log.warning("build_cache(%s): skipped %d of %d items; see %s",
                    ds.name, len(data.skipped), len(ds), data.skip_report)  # fmt: skip
    return data
