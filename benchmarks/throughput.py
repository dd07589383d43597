"""Training samples/s and embedding pairs/s: fusionkit's data path vs the pipeline people write first.

Both sides train/embed the SAME model (same initial weights, same batch size, same optimizer) on the
same examples in the same run; only the input pipeline differs:

* naive: per-item tokenization padded to max_length=128 and per-item PIL/torchvision transforms
  (decode, resize, crop, flip, to-tensor, normalize) inside `Dataset.__getitem__`, fp32, no cache;
* fusionkit: the preprocessing cache (tokenized once, images decoded+resized once to uint8), dynamic
  padding in `Collator`, uint8 through the DataLoader and `ImageTransform` on the model's device,
  and, when the encoders are frozen, training on the frozen-encoder feature cache (the naive side
  then still runs the frozen encoders every step).

It also counts model FLOPs per sample (torch.utils.flop_counter) and measures this machine's matmul
peak in the same run, so "how close to the limit" is a number. Results go to benchmarks/results/.

    python benchmarks/throughput.py            # tiny model on synthetic data + real encoders if present
    python benchmarks/throughput.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_common import RESULTS, SHARED, NaiveDataset, bind_sentiment, machine, minilm_dir
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import fusionkit
from fusionkit.data import Collator, ImageTransform, MultimodalDataset, build_cache, load_dataset, move_batch
from fusionkit.models import FusionModel, create_model, model_inputs
from fusionkit.training import build_features
from fusionkit.training.feature_cache import FeatureCollator


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 2.0
) -> float:
    """Achieved FLOP/s of a large square matmul: the practical ceiling for this machine and dtype."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ naive
def naive_batches(loader: DataLoader, device: torch.device, task: str):
    for b in loader:
        labels = b.pop("label")
        yield {
            **{k: v.to(device) for k, v in b.items()},
            "labels": {task: labels.clamp_min(0).to(device)},
            "label_mask": {task: (labels >= 0).to(device)},
        }


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    samples: int = 0
    seconds: float = 0.0
    tokens: int = 0  # text positions fed to the model (real + padding)
    batches: int = 0

    @property
    def rate(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def run_steps(
    model: FusionModel, batches, steps: int, warmup: int, train: bool, device: torch.device
) -> Timing:
    """Time `steps` batches after `warmup` untimed ones; the data loading is inside the timed region."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) if train else None
    model.train(train)
    timing, it = Timing(), iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        batch = next(it)
        if train:
            out = model(**model_inputs(batch))
            loss = model.loss(out, batch["labels"], batch["label_mask"])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode():
                model.encode(**model_inputs(batch), normalize=True)
        if i >= warmup:
            n = len(batch["input_ids"]) if "input_ids" in batch else len(batch["attention_mask"])
            timing.samples += n
            timing.tokens += batch["attention_mask"].numel()
            timing.batches += 1
    _sync(device)
    timing.seconds = time.perf_counter() - t0
    return timing


def flops_per_sample(model: FusionModel, batch: dict[str, Any], train: bool) -> float:
    model.train(train)
    inputs = model_inputs(batch)
    with FlopCounterMode(display=False) as counter:
        if train:
            out = model(**inputs)
            model.loss(out, batch["labels"], batch["label_mask"])["loss"].backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model.encode(**inputs)
    return counter.get_total_flops() / len(batch["attention_mask"])


def cycle(loader: DataLoader):
    while True:
        yield from loader


def bench_scenario(
    name: str,
    model_cfg: Any,
    ds: MultimodalDataset,
    args: argparse.Namespace,
    device: torch.device,
    peak: float,
    workdir: Path,
    steps: int,
    batch_size: int,
) -> dict[str, Any]:
    print(f"\n== {name}: {len(ds)} examples", flush=True)
    ds = bind_sentiment(ds, fusionkit.get_config(model_cfg).tasks)
    torch.manual_seed(0)
    model = create_model(model_cfg).to(device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tok, pre = model.tokenizer, model.image_preprocess
    task = next(iter(ds.label_names))
    workers = args.workers
    loader_kw = dict(
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
    )

    t0 = time.perf_counter()
    cached = build_cache(ds, tok, pre, workdir / "cache", max_length=128)
    cache_seconds = time.perf_counter() - t0
    collate = Collator(tok.pad_token_id, cached.label_names)
    row: dict[str, Any] = {
        "scenario": name,
        "examples": len(ds),
        "batch_size": batch_size,
        "steps": steps,
        "cache_build_s": round(cache_seconds, 2),
        "trainable_params": model.num_parameters(True),
    }

    for mode, train in (("train", True), ("embed", False)):
        transform = ImageTransform(pre, train=train).to(device).train(train)
        if train and model.encoders_frozen:  # fusionkit trains on the frozen-encoder feature cache
            t0 = time.perf_counter()
            feats = build_features(model, cached, workdir / "cache", args.batch_size, progress=False)
            row["feature_cache_build_s"] = round(time.perf_counter() - t0, 2)
            collate_feats = FeatureCollator(feats.label_names, feats.task_types)
            fast_loader = DataLoader(feats, shuffle=True, collate_fn=collate_feats, **loader_kw)
            transform = None
        else:
            fast_loader = DataLoader(cached, shuffle=train, collate_fn=collate, **loader_kw)
        fast = (move_batch(b, device, transform) for b in cycle(fast_loader))
        naive_loader = DataLoader(NaiveDataset(ds, tok, pre, train), shuffle=train, **loader_kw)
        naive = naive_batches(cycle(naive_loader), device, task)
        results = {}
        for label, batches in (("naive", naive), ("fusionkit", fast)):
            model.load_state_dict(init)
            results[label] = run_steps(model, batches, steps, args.warmup, train, device)
            print(
                f"  {mode:5s} {label:9s} {results[label].rate:8.1f} samples/s "
                f"({results[label].tokens / results[label].batches:.0f} text positions/batch)",
                flush=True,
            )
        sample = move_batch(next(iter(fast_loader)), device, transform)
        flops = flops_per_sample(model, sample, train)
        row[mode] = {
            "naive_per_s": round(results["naive"].rate, 2),
            "fusionkit_per_s": round(results["fusionkit"].rate, 2),
            "speedup": round(results["fusionkit"].rate / results["naive"].rate, 2),
            "naive_tokens_per_batch": results["naive"].tokens / results["naive"].batches,
            "fusionkit_tokens_per_batch": results["fusionkit"].tokens / results["fusionkit"].batches,
            "model_gflops_per_sample": round(flops / 1e9, 4),
            "fraction_of_peak": round(flops * results["fusionkit"].rate / peak, 4),
        }
    return row


def scenarios(args: argparse.Namespace) -> list[tuple[str, Any, MultimodalDataset, int, int]]:
    """(name, model config, data, timed steps, batch size) per scenario."""
    n = 256 if args.quick else args.examples
    out = [
        ("tiny model, synthetic data", "tiny", load_dataset(f"synthetic:{n}"), args.steps, args.batch_size)
    ]
    minilm = minilm_dir()
    dino, mvsa = SHARED / "weights" / "dinov2-small", SHARED / "data" / "mvsa-single"
    if minilm and dino.is_dir() and mvsa.is_dir() and not args.tiny_only:
        cfg = fusionkit.get_config(
            "minilm-dinov2-small",
            text={"name": minilm},
            image={"name": str(dino)},
            freeze="none",
            fusion={"dim": 256, "depth": 2, "image_grid": 4},
        )
        real = load_dataset(str(mvsa))
        real = real.subset(range(min(len(real), 64 if args.quick else args.real_examples)))
        steps, batch = (
            (args.steps, args.batch_size) if args.quick else (args.real_steps, args.real_batch_size)
        )
        out.append(("MiniLM-L6 + DINOv2-S/14 fine-tuned, MVSA-Single", cfg, real, steps, batch))
        frozen = fusionkit.get_config(cfg, freeze="encoders")
        out.append(("MiniLM-L6 + DINOv2-S/14 frozen, MVSA-Single", frozen, real, steps, batch))
    else:
        print("real encoders or MVSA-Single not found: running the tiny scenario only", file=sys.stderr)
    return out


def one_off(row: dict[str, Any]) -> str:
    """One-off preprocessing cost, paid once per dataset (and once per encoders for the feature cache)."""
    text = f"{row['cache_build_s']:.1f}"
    if "feature_cache_build_s" in row:
        text += f" + {row['feature_cache_build_s']:.1f} (encoder features)"
    return text


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Throughput: fusionkit vs the naive pipeline",
        "",
        f"Machine: {meta['machine']}  ",
        f"Measured matmul peak (fp32, 2048^3, this run): {meta['peak_gflops']:.1f} GFLOP/s  ",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}",
        "",
        "Same model, same initial weights, same batch size and optimizer on each side; only the input "
        "pipeline differs. Naive = per-item tokenization padded to 128 + per-item PIL/torchvision transforms "
        "in `__getitem__`, fp32, no cache. Rates are samples (pairs) per second; ratio = fusionkit / naive.",
        "",
        "| scenario | mode | naive /s | fusionkit /s | ratio | text positions per batch (naive -> fusionkit) "
        "| model GFLOP/sample | fraction of measured peak | one-off cache build (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for mode in ("train", "embed"):
            m = r[mode]
            lines.append(
                f"| {r['scenario']} (batch {r['batch_size']}, {r['steps']} timed steps) | {mode} | {m['naive_per_s']:.1f} | {m['fusionkit_per_s']:.1f} | "
                f"**{m['speedup']:.2f}x** | {m['naive_tokens_per_batch']:.0f} -> {m['fusionkit_tokens_per_batch']:.0f} | "
                f"{m['model_gflops_per_sample']:.3f} | {100 * m['fraction_of_peak']:.1f}% | {one_off(r)} |"
            )
    lines += [
        "",
        "Train FLOPs count forward + backward of one optimizer step (torch.utils.flop_counter); "
        "the fraction of peak is model FLOPs x fusionkit rate / measured matmul peak.",
    ]
    (RESULTS / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, small data")
    p.add_argument("--tiny-only", action="store_true", help="skip the real-encoder scenario")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--real-examples", type=int, default=256)
    p.add_argument(
        "--real-steps", type=int, default=4, help="timed steps with the real encoders (slow on CPU)"
    )
    p.add_argument("--real-batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size = 3, 1, 16
    device = torch.device(args.device)
    peak = matmul_peak(device)
    print(f"machine: {machine()}\nmatmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, ds, steps, batch_size in scenarios(args):
            rows.append(bench_scenario(name, cfg, ds, args, device, peak, Path(tmp), steps, batch_size))
    meta = {
        "machine": machine(),
        "peak_gflops": peak / 1e9,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if not args.quick:
        write_report(rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
