"""Samples/s of fusionkit's data path against the naive pipeline, on the same data in the same run.

fusionkit: `build_cache` once (timed separately), then cached uint8 images + token ids -> `Collator`
(dynamic padding) -> `move_batch` with `ImageTransform(train=True)` (batched augmentation + normalize).
naive: per-item `tokenizer(..., padding="max_length", max_length=128)` and PIL decode + torchvision
RandomResizedCrop / flip / ToTensor / Normalize inside `__getitem__`, default collate.

Data: MVSA-Single from ../shared (or $FUSIONKIT_SHARED) with the all-MiniLM-L6-v2 tokenizer when
available, else the synthetic set with the tiny tokenizer; 224x224 images either way.

    python benchmarks/pipeline_throughput.py [--quick] [--n 1024] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    NAIVE_MAX_LENGTH,
    RESULTS,
    SHARED,
    NaiveDataset,
    bind_sentiment,
    cpu_model,
    minilm_dir,
)
from torch.utils.data import DataLoader

from fusionkit.config import ImagePreprocess
from fusionkit.data import (
    Collator,
    ImageTransform,
    MultimodalDataset,
    build_cache,
    make_synthetic,
    move_batch,
    read_mvsa,
)

MAX_LENGTH = NAIVE_MAX_LENGTH


def pick_data(n: int) -> tuple[MultimodalDataset, Any, str]:
    mvsa = SHARED / "data" / "mvsa-single"
    if mvsa.is_dir():
        ds = read_mvsa(mvsa)
        ds = ds.subset(range(min(n, len(ds))), name=f"mvsa-single-first{n}")
        source = f"MVSA-Single ({mvsa}), first {len(ds)} items"
    else:
        ds, source = make_synthetic(n, image_size=256), f"synthetic, {n} items (256 px PNG-free PIL images)"
    ds = bind_sentiment(ds)
    if minilm_dir():
        from transformers import AutoTokenizer

        return ds, AutoTokenizer.from_pretrained(minilm_dir()), f"{source}; tokenizer all-MiniLM-L6-v2"
    from fusionkit.models.tiny import tiny_tokenizer

    return ds, tiny_tokenizer(), f"{source}; tokenizer fusionkit tiny"


def run_epoch(loader: DataLoader, step: Any) -> tuple[float, float]:
    """Samples/s over one full pass (first batch excluded as warm-up) and mean tokens per batch."""
    it = iter(loader)
    step(next(it))
    n, tokens, batches, t0 = 0, 0, 0, time.perf_counter()
    for batch in it:
        out = step(batch)
        n += out["input_ids"].shape[0]
        tokens += out["input_ids"].numel()
        batches += 1
    return n / (time.perf_counter() - t0), tokens / max(batches, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 items: a smoke run in seconds")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (same for both pipelines)")
    ap.add_argument("--out", type=Path, default=RESULTS / "pipeline_throughput")
    args = ap.parse_args()
    n = 256 if args.quick else args.n
    torch.manual_seed(0)
    ds, tok, source = pick_data(n)
    pre = ImagePreprocess(size=(224, 224))
    loader_kw = dict(
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=torch.cuda.is_available(),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        cached = build_cache(ds, tok, pre, cache_dir, max_length=MAX_LENGTH)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_cache(ds, tok, pre, cache_dir, max_length=MAX_LENGTH)
        hit_s = time.perf_counter() - t0
        transform = ImageTransform(pre, train=True).to(device)
        fast_loader = DataLoader(
            cached, collate_fn=Collator(tok.pad_token_id, cached.label_names), **loader_kw
        )
        fast_sps, fast_tokens = run_epoch(fast_loader, lambda b: move_batch(b, device, transform))
    naive_loader = DataLoader(NaiveDataset(ds, tok, pre, train=True), **loader_kw)
    naive_sps, naive_tokens = run_epoch(naive_loader, lambda b: move_batch(b, device))

    result = {
        "command": "python benchmarks/pipeline_throughput.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "data": source,
        "items": len(ds),
        "image_size": list(pre.size),
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": str(device),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # >cores: shared machine, noisy
        },
        "cache_build_s": round(build_s, 2),
        "cache_hit_s": round(hit_s, 3),
        "fusionkit_samples_per_s": round(fast_sps, 1),
        "naive_samples_per_s": round(naive_sps, 1),
        "speedup": round(fast_sps / naive_sps, 2),
        "tokens_per_batch": {"fusionkit": round(fast_tokens, 1), "naive": round(naive_tokens, 1)},
        "padding_saved": round(1 - fast_tokens / naive_tokens, 3),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    args.out.with_suffix(".md").write_text(
        f"""# Data pipeline throughput

`{result["command"]}`

Machine: {m["cpu"]}, {m["cores"]} cores, {m["platform"]}, Python {m["python"]}, torch {m["torch"]}; device `{result["device"]}`;
1-minute load average at the end {m["load_average_1min_at_end"]} (above the core count means other work shared
the CPU: absolute figures are noisy, the ratio compares the two pipelines in the same run).
Data: {result["data"]}; {pre.size[0]}x{pre.size[1]} images, batch {args.batch_size}, {args.workers} DataLoader workers.

| pipeline | samples/s | tokens per batch |
|---|---:|---:|
| naive (per-item PIL + torchvision, pad to {MAX_LENGTH}) | {result["naive_samples_per_s"]} | {result["tokens_per_batch"]["naive"]} |
| fusionkit (cache + Collator + ImageTransform) | {result["fusionkit_samples_per_s"]} | {result["tokens_per_batch"]["fusionkit"]} |

**Speedup: {result["speedup"]}x**; dynamic padding saves {result["padding_saved"]:.0%} of the token positions.
One-time cache build: {result["cache_build_s"]} s for {result["items"]} items; a second `build_cache` (cache hit): {result["cache_hit_s"]} s.
Both pipelines include train-time augmentation (random resized crop + flip) and normalization.
"""
    )


if __name__ == "__main__":
    main()
