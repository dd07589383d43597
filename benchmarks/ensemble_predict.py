"""`fusionkit predict --ensemble` of frozen-encoder seeds: one encoder pass for all members, against one each.

Members that share frozen encoders (the seeds of the MVSA recipe) read the encoders' outputs from the
feature cache, so the encoders run once for the ensemble, or not at all when `fusionkit train` already
cached the split. Baseline: each member predicted on its own, which is what `--ensemble` cost before
(every member ran its encoders on the raw pairs). All in one process, on one copy of the data cache.

    python benchmarks/ensemble_predict.py RUNS_DIR CACHE_DIR   # e.g. the `mvsa_recipe.py endtoend` runs
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import RESULTS, machine

from fusionkit.cli import main as cli


def probs(path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    cols = [c for c in rows[0] if c.startswith("sentiment_prob_")]
    return [r["id"] for r in rows], np.array([[float(r[c]) for c in cols] for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path, help="a folder of run dirs (seeds of one frozen recipe)")
    p.add_argument("cache", type=Path, help="their data cache dir (only its data caches are copied)")
    p.add_argument("--split", default="test")
    p.add_argument("--work-dir", type=Path, default=Path("runs/ensemble_predict"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    members = sorted(d for d in args.runs.iterdir() if (d / "config.json").is_file())
    work, cache = args.work_dir, args.work_dir / "cache"
    if work.exists():
        shutil.rmtree(work)
    cache.mkdir(parents=True)
    for d in args.cache.iterdir():  # decoded + tokenized pairs only: no feature store
        if not d.name.startswith("features-"):
            shutil.copytree(d, cache / d.name)
    common = ["--split", args.split, "--cache-dir", str(cache)]
    steps, outputs = [], {}

    def timed(label: str, argv: list[str], out: Path) -> None:
        t0 = time.perf_counter()
        if cli(["predict", *argv, *common, "--output", str(out)]) != 0:
            sys.exit(f"{label} failed")
        steps.append({"step": label, "seconds": round(time.perf_counter() - t0, 1)})
        outputs[label] = out
        print(steps[-1], flush=True)

    for m in members:
        timed(f"alone: {m.name}", [str(m)], work / f"{m.name}.csv")
    ens = [str(members[0]), "--ensemble", *map(str, members[1:])]
    timed("ensemble, feature cache empty", ens, work / "ensemble_cold.csv")
    timed("ensemble, features cached", ens, work / "ensemble_warm.csv")
    ids, mean = probs(outputs[f"alone: {members[0].name}"])[0], np.mean(
        [probs(outputs[f"alone: {m.name}"])[1] for m in members], 0
    )
    ens_ids, ens_p = probs(work / "ensemble_cold.csv")
    assert ens_ids == ids
    baseline = sum(s["seconds"] for s in steps if s["step"].startswith("alone"))
    result = {
        "machine": machine(),
        "threads": args.threads,
        "members": len(members),
        "pairs": len(ids),
        "steps": steps,
        "baseline_seconds (members one by one = --ensemble before)": round(baseline, 1),
        "speedup_cold": round(baseline / steps[-2]["seconds"], 2),
        "speedup_warm": round(baseline / steps[-1]["seconds"], 2),
        "max_abs_prob_diff_vs_mean_of_members": float(np.abs(ens_p - mean).max()),
        "label_agreement_vs_mean_of_members": float((ens_p.argmax(1) == mean.argmax(1)).mean()),
    }
    (RESULTS / "ensemble_predict.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
