"""Precision, sharded embedding and multi-process figures: what `run.precision=auto` picks and what it buys.

* precision: the choice `fusionkit.precision.choose_precision("auto")` makes here, and why;
* embed: `embed_to_shards` rows/s and peak GPU memory in fp32 and bf16 autocast, and the smallest
  cosine between the two vectors of a pair (a ViT-S/14 image encoder at 224 px, random weights);
* embed scaling: the same sharded embed launched with `torchrun` on 1, 2, 4 CPU processes (gloo);
* train: `Trainer` samples/s and peak GPU memory in fp32 and bf16 (end to end, encoders training).

    python benchmarks/distributed.py --out benchmarks/results   # GPU figures need a GPU
    python benchmarks/distributed.py --quick                    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionkit.data import make_synthetic
from fusionkit.embed_shards import embed_to_shards, read_embeddings
from fusionkit.models import create_model
from fusionkit.precision import choose_precision
from fusionkit.training.config import build_config
from fusionkit.training.trainer import Trainer

VIT_S = {"backend": "timm", "name": "vit_small_patch14_dinov2", "pretrained": False,
         "model_kwargs": {"img_size": 224}}  # fmt: skip


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def bench_embed(device: torch.device, n: int, tmp: Path) -> dict[str, Any]:
    model = create_model("tiny", image=VIT_S).to(device)
    data = make_synthetic(n, image_size=224)
    out: dict[str, Any] = {"rows": n, "image_encoder": "vit_small_patch14_dinov2 @224 (random init)"}
    vectors = {}
    for precision in ("fp32", "bf16"):
        embed_to_shards(model, data[:64], tmp / f"warm-{precision}", shard_size=64, batch_size=64,
                        precision=precision, progress=False)  # fmt: skip
        _reset_peak(device)
        start = time.perf_counter()
        embed_to_shards(model, data, tmp / precision, shard_size=1024, batch_size=128, precision=precision,
                        progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        vectors[precision] = read_embeddings(tmp / precision)[1]
        out[precision] = {"rows_per_s": round(n / seconds, 1), "peak_gpu_mib": _peak_mib(device)}
    cos = (vectors["fp32"] * vectors["bf16"]).sum(1) / (
        np.linalg.norm(vectors["fp32"], axis=1) * np.linalg.norm(vectors["bf16"], axis=1)
    )
    out["min_cosine_fp32_vs_bf16"] = round(float(cos.min()), 6)
    return out


SCALING_WORKER = """
import json, sys, time, torch
from fusionkit.data import make_synthetic
from fusionkit.embed_shards import embed_to_shards
from fusionkit.models import create_model
from fusionkit.training import distributed as D
out, n = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model, data = create_model("tiny"), make_synthetic(n, image_size=64)
rank, world = D.init_distributed("cpu")
D.barrier()
start = time.perf_counter()
embed_to_shards(model, data, out, shard_size=256, batch_size=64, precision="fp32", progress=False)
if rank == 0:
    print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def bench_scaling(n: int, tmp: Path, worlds: tuple[int, ...]) -> dict[str, Any]:
    """Rows/s of the sharded embed itself (start-up and data generation excluded) on 1..N CPU processes."""
    script = tmp / "scaling.py"
    script.write_text(SCALING_WORKER)
    cores = os.cpu_count() or 1
    out: dict[str, Any] = {"rows": n, "model": "tiny", "cpu_cores": cores}
    for world in worlds:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // world))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(script), str(tmp / f"scale-{world}"), str(n)]  # fmt: skip
        done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        out[f"{world}_processes_rows_per_s"] = round(n / seconds, 1)
    return out


def bench_train(device: torch.device, n: int, steps: int, tmp: Path) -> dict[str, Any]:
    """Steady-state Trainer throughput: a short warm-up run per precision first, then the timed run
    (its time includes the epoch-end evaluation and checkpoint; run.deterministic off, as for speed)."""
    out: dict[str, Any] = {"examples": n, "steps": steps, "batch_size": 64}

    def fit(precision: str, name: str, max_steps: int) -> dict[str, Any]:
        cfg = build_config(None, {
            "model.image": VIT_S, "data.dataset": f"synthetic:{n}", "data.split_ratios": (0.98, 0.02, 0.0),
            "data.cache_dir": str(tmp / "cache"), "optim.batch_size": 64, "optim.max_steps": max_steps,
            "run.precision": precision, "run.output_dir": str(tmp / "runs"), "run.name": name,
            "run.progress": False, "run.plots": False, "run.device": str(device), "run.checkpoint_every": 0,
            "run.deterministic": False,
        })  # fmt: skip
        trainer = Trainer(cfg)
        _reset_peak(device)
        return trainer.fit()

    for precision in ("fp32", "bf16"):
        fit(precision, f"warmup-{precision}", 3)
        summary = fit(precision, precision, steps)
        out[precision] = {
            "train_seconds": summary["train_seconds"],
            "samples_per_s": round(steps * 64 / summary["train_seconds"], 1),
            "peak_gpu_mib": _peak_mib(device),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=("embed", "scaling", "train"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision_auto": {
            d: choose_precision("auto", d).reason for d in ["cpu"] + ["cuda"] * (device.type == "cuda")
        },
    }
    print(json.dumps(result, indent=2), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "embed" not in args.skip:
            result["embed"] = bench_embed(device, 128 if args.quick else 4096, Path(tmp))
            print(json.dumps(result["embed"]), flush=True)
        if "scaling" not in args.skip:
            worlds = (1, 2) if args.quick else (1, 2, 4)
            result["embed_scaling_cpu"] = bench_scaling(256 if args.quick else 4096, Path(tmp), worlds)
            print(json.dumps(result["embed_scaling_cpu"]), flush=True)
        if "train" not in args.skip:
            result["train"] = bench_train(
                device, 160 if args.quick else 3300, 4 if args.quick else 100, Path(tmp)
            )
            print(json.dumps(result["train"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
