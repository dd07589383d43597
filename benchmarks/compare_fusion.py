"""Compare every registered fusion strategy fairly on one dataset, over several seeds.

Fair means: one saved split, the same encoders (frozen by default, so their features are computed
once through the frozen-encoder feature cache and shared by every strategy and seed), the same
epochs, learning-rate schedule and batch size, and N seeds per strategy; numbers are mean +- std.
The comparison owns the budget: a config's optim.max_steps and run.patience are switched off (and its
run.metric replaced when it does not score the compared task), each said in the log and the report,
and every run's actual epochs and optimizer steps are recorded (a difference between strategies is flagged).
A fused strategy "beats" another only by more than both the seed spread and the test set's sampling noise.

Dataset, in this order: `--config` (a `fusionkit train` config: your own data, column names, labels,
tasks and encoders; the tables score its first classification task, or `--task`); `--dataset` alone
(columns text, image, sentiment); MVSA-Single from ../shared with the pretrained MiniLM-L6 text encoder
and DINOv2-S/14 image encoder when those are present; else the built-in synthetic set with the tiny
random encoders. On MVSA-Single the CLMLF split's test labels are withheld, so the checkpoint is
selected on a seeded, stratified 10% of its train split and the scores reported are on its dev split,
which no run ever trains or selects on.

    python benchmarks/compare_fusion.py             # full run, writes benchmarks/results/compare_fusion*
    python benchmarks/compare_fusion.py --quick     # minutes: 1 epoch, 2 seeds, small data
    python benchmarks/compare_fusion.py --trainable-layers 2 0   # + top 2 text blocks fine-tuned (cached)
    python benchmarks/compare_fusion.py --config my_data.yaml --out my_results   # your own data

Each finished run is appended to WORK_DIR/results.jsonl with its settings and the content hash of the
data (and config) and of the encoders' weights (the feature cache's key); started again with the same
arguments on the same data and weights, the comparison skips the runs already there (an interrupted
comparison continues, the interrupted run from its last checkpoint); an edited data file, or an encoder
saved again into the same folder, is a new comparison. Before the first run it trains, one untimed
one-step warm-up run absorbs the process's start-up, so train times and pairs/s compare like for like.

Every trained model is also scored with the caption removed from every test example and with the
image removed from every example (presence flags on the cached features: the model's placeholder
stands in), so the report shows how each strategy degrades when one modality is missing.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import inspect
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_common import RESULTS, SHARED, machine, minilm_dir

import fusionkit
from fusionkit.config import ConfigError, load_config_file, to_dict
from fusionkit.data import DataError, MultimodalDataset, load_dataset
from fusionkit.models import FUSION_REGISTRY, list_fusions
from fusionkit.models.fusion import sides_read
from fusionkit.registry import load_plugins
from fusionkit.tasks import TASK_REGISTRY, create_task
from fusionkit.training.config import build_config
from fusionkit.training.metrics import check_metric, default_metric
from fusionkit.training.report import keep_previous
from fusionkit.training.rundir import RunDirError
from fusionkit.training.trainer import Trainer, reader_kwargs, run_inference
from fusionkit.tune import encoder_identity

METRICS = ("accuracy", "macro_f1", "weighted_f1")
# test-time modality conditions: (column name, caption kept, image kept)
CONDITIONS = (("acc_complete", True, True), ("acc_no_text", False, True), ("acc_no_image", True, False))
INTERRUPTED = "interrupted.jsonl"  # in WORK_DIR: the run dirs an interrupted comparison left, continued when rerun


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def setup(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], str, str, Any]:
    """Base config overrides, a description of dataset + encoders, and the data every run shares.

    MVSA: `mvsa_recipe.selection_view()` (fit on 90% of CLMLF train, select on 10%, score CLMLF dev), so
    the feature caches of both benchmarks are the same files. Otherwise: one saved split file per data content."""
    mvsa, dino, minilm = SHARED / "data" / "mvsa-single", SHARED / "weights" / "dinov2-small", minilm_dir()
    if args.config is None and args.dataset is None and mvsa.is_dir() and dino.is_dir() and minilm:
        from mvsa_recipe import selection_view

        data = selection_view()
        if args.quick:  # a seeded sample (the files are ordered by label, so never a prefix)
            rng = random.Random(0)
            splits = {k: rng.sample(v, n) for (k, v), n in zip(data.splits.items(), (400, 100, 150))}
            data = MultimodalDataset(data.subset([i for v in splits.values() for i in v]), data.label_names,
                                     splits=splits, name="mvsa-single[quick]")  # fmt: skip
        overrides = {
            "preset": "minilm-dinov2-small",
            "model.text.name": minilm,
            "model.image.name": str(dino),
            "model.fusion.dim": 128,
            "model.fusion.depth": 2,
            "model.fusion.num_heads": 4,
            "model.fusion.image_grid": 4,
            "model.fusion.dropout": 0.1,
        }
        return overrides, "MVSA-Single (CLMLF split)", "MiniLM-L6 (text) + DINOv2-S/14 (image)", data
    if args.config is not None:  # the user's data, columns, tasks and encoders, as `fusionkit train` reads them
        base: dict[str, Any] = {} if args.dataset is None else {"data.dataset": args.dataset}
        cfg = build_config(args.config, base)
        dataset, encoders = str(cfg.data.dataset), f"{cfg.model.text.name} (text) + {cfg.model.image.name} (image)"
    else:
        dataset = args.dataset or f"synthetic:{600 if args.quick else 3000}"
        # frozen, as on MVSA (the tiny preset trains its encoders): features cached once, shared by every run
        base = {"preset": "tiny", "model.freeze": "encoders", "data.dataset": dataset}
        cfg, encoders = build_config(None, base), "tiny random BERT + tiny random ViT"
    try:  # the table, its columns and labels, read once before any training (as each run will read them)
        table = load_dataset(cfg.data.dataset, **reader_kwargs(cfg.data, cfg.model.tasks))
    except DataError as e:
        if args.config is None:
            e.args = (f"{e.args[0]}\n(--dataset alone reads columns text, image, sentiment; name your columns, "
                      "labels and tasks in a fusionkit train config and pass it as --config)",)  # fmt: skip
        raise
    # the content (not the path) names the split and keys the results: an edited table or a replaced image
    # (the rows' texts, labels and image bytes: the fingerprint fusionkit's caches use) is a new comparison
    digest = table.fingerprint[:16]
    # the split made for it depends on the ratios and seed too; a split file of the user's, on its content
    made = hashlib.sha256(json.dumps([digest, cfg.data.split_ratios, cfg.data.split_seed]).encode()).hexdigest()
    base["data.split_file"] = cfg.data.split_file or str(work / f"split-{made[:16]}.json")
    base["_data_content"] = digest
    own = Path(cfg.data.split_file) if cfg.data.split_file else None
    base["_split_content"] = hashlib.sha256(own.read_bytes()).hexdigest()[:16] if own and own.is_file() else None
    base["_config_content"] = to_dict(cfg) if args.config else None
    for strategy in args.strategies:  # every run's config and metric, checked before the first one trains
        run_cfg = build_config(args.config, {**config_keys(base), "model.fusion.strategy": strategy})
        tasks = {t.name: create_task(t) for t in run_cfg.model.tasks}
        check_metric(run_cfg.run.metric or default_metric(tasks), tasks)
    return base, dataset, encoders, None


def config_keys(base: dict[str, Any]) -> dict[str, Any]:
    """The config overrides in `base` (the `_`-keys are the content digests that key the results)."""
    return {k: v for k, v in base.items() if not k.startswith("_")}


def scored_task(args: argparse.Namespace, base: dict[str, Any]) -> str:
    """`--task`, else the config's first classification task (the one every table scores)."""
    tasks = build_config(args.config, config_keys(base)).model.tasks
    names = [t.name for t in tasks if t.type == "classification"]
    args.trained_tasks = [t.name for t in tasks]  # every run trains them all; the tables score one
    task = args.task or (names[0] if names else None)
    if task not in names:
        raise ConfigError(f"--task {task!r}: the config's classification tasks are {names}")
    return task


def train_one(
    base: dict[str, Any], extra: dict[str, Any], args: argparse.Namespace, work: Path, name: str, data: Any
) -> dict[str, Any]:
    """Train (or find in WORK/results.jsonl, trained before with the same settings) one run and score it."""
    log = work / "results.jsonl"
    cfg = build_config(args.config, {**config_keys(base), **extra})
    settings = json.dumps({**base, **extra, "_code": code_digest(cfg), "_encoders": encoders_of(cfg, args.encoders), "epochs": args.epochs,
                           "lr": args.lr, "batch_size": args.batch_size, "modality_dropout": args.modality_dropout,
                           "scored_task": args.task}, sort_keys=True)  # fmt: skip
    for line in log.read_text().splitlines() if log.is_file() else ():
        done = json.loads(line)
        if done["name"] == name and done["settings"] == settings:
            return {**done["result"], "reused": True}
    if not getattr(args, "warmed_up", False):  # once, before the first timed run of this invocation
        warm_up(base, extra, args, work, data)
        args.warmed_up = True
    result = _train_and_score(base, extra, args, work, name, data, settings)
    if result["accuracy"] is None:  # nothing scored (no labelled rows): not a result to read back later
        return result
    with log.open("a") as f:
        f.write(json.dumps({"name": name, "settings": settings, "result": result}) + "\n")
    return result


def code_digest(cfg: Any) -> str:
    """fusionkit's version and the source files of a run's fusion strategy and task classes: a result logged before
    one of them was edited (a user's own strategy, above all) is not read back as this code's result."""
    classes = [FUSION_REGISTRY.get_class(cfg.model.fusion.strategy),
               *(TASK_REGISTRY.get_class(t.type) for t in cfg.model.tasks)]  # fmt: skip
    digest = hashlib.sha256(fusionkit.__version__.encode())
    for source in sorted({inspect.getsourcefile(c) or "" for c in classes}):
        digest.update(Path(source).read_bytes() if Path(source).is_file() else source.encode())
    return digest.hexdigest()[:16]


def encoders_of(cfg: Any, known: dict[str, str]) -> str:
    """The run's encoders as the feature cache keys them (config + a hash of their weights): a result logged
    before other weights were saved in the same folder is not read back as theirs. `known`: this invocation's,
    so each encoder config (and seed, for random ones) is loaded and hashed once."""
    key = json.dumps([to_dict(cfg.model.text), to_dict(cfg.model.image), cfg.model.freeze, cfg.model.trainable_layers,
                      cfg.run.seed])  # fmt: skip
    if key not in known:
        known[key] = encoder_identity(cfg)
    return known[key]


def warm_up(base: dict[str, Any], extra: dict[str, Any], args: argparse.Namespace, work: Path, data: Any) -> None:
    """One untimed optimizer step, evaluation and inference pass of the first run to train, in a folder removed
    after: the process's one-time start-up (lazy imports and initialisation, thread pools, the allocator) is
    not charged to whichever strategy trains first (3.6 s vs 0.7 s for the next seed)."""
    with tempfile.TemporaryDirectory(prefix="warm-up-", dir=work) as tmp:
        trainer = Trainer(run_config(base, {**extra, "optim.max_steps": 1}, args, work, "warm-up", tmp), data=data)
        trainer.fit()
        split = "test" if "test" in trainer.datasets else "val"
        run_inference(trainer.model, trainer.eval_loader(split), trainer.eval_transform, trainer.amp, split,
                      progress=False)  # fmt: skip


def run_config(base: dict[str, Any], extra: dict[str, Any], args: argparse.Namespace, work: Path, name: str,
               output_dir: str | Path) -> Any:  # fmt: skip
    """A run's config: the comparison's base and this run's keys, with the budget every run shares."""
    overrides = {
        **config_keys(base),
        **extra,
        "data.cache_dir": args.cache_dir or str(work / "cache"),
        "optim.epochs": args.epochs,
        "optim.lr": args.lr,
        "optim.batch_size": args.batch_size,
        "run.output_dir": str(output_dir),
        "run.name": name,
        "run.name_exists": "increment",  # a run interrupted before it was logged starts again beside it
        "run.progress": False,
        "run.plots": False,
        "run.checkpoint_every": 0,
    }
    if args.modality_dropout:
        overrides["model.fusion.modality_dropout"] = args.modality_dropout
    return build_config(args.config, overrides)


def resumed_trainer(cfg: Any, work: Path, name: str, settings: str, data: Any) -> Trainer | None:
    """A Trainer continuing the run dir that this run (same name, same settings) left when a comparison was
    interrupted, or None (nothing left, no checkpoint in it, or fusionkit refuses to resume it: train afresh)."""
    marks = work / INTERRUPTED
    left = [m for m in map(json.loads, marks.read_text().splitlines() if marks.is_file() else ())
            if m["name"] == name and m["settings"] == settings]  # fmt: skip
    if not left or not Path(left[-1]["run_dir"]).is_dir():
        return None
    run_dir = Path(left[-1]["run_dir"])
    cfg = copy.deepcopy(cfg)  # a refused resume may have adopted the saved run's settings into it
    cfg.run.name = run_dir.name
    try:
        trainer = Trainer(cfg, data=data, resume=True)
    except (RunDirError, FileNotFoundError, ConfigError) as e:
        print(f"  {name}: cannot continue {run_dir} ({e}); training it afresh", flush=True)
        return None
    print(f"  {name}: continuing the interrupted run {run_dir}", flush=True)
    return trainer


def _train_and_score(
    base: dict[str, Any], extra: dict[str, Any], args: argparse.Namespace, work: Path, name: str, data: Any,
    settings: str,
) -> dict[str, Any]:
    cfg = run_config(base, extra, args, work, name, work / "runs")
    trainer = resumed_trainer(cfg, work, name, settings, data)  # the run an interrupted comparison left, if any
    try:
        trainer = trainer or Trainer(cfg, data=data)
        summary = trainer.fit()
        split = "test" if "test" in trainer.datasets else "val"
        loader = trainer.eval_loader(split)
        t0 = time.perf_counter()
        res = run_inference(trainer.model, loader, trainer.eval_transform, trainer.amp, split, progress=False)
        pairs_per_s = len(trainer.datasets[split]) / (time.perf_counter() - t0)
        scored = missing_modality_accuracy(trainer, split, args.task)
    except KeyboardInterrupt:  # noted, so that the same comparison run again continues this run dir
        if trainer is not None:
            with (work / INTERRUPTED).open("a") as f:
                f.write(json.dumps({"name": name, "settings": settings, "run_dir": str(trainer.run_dir)}) + "\n")
        raise
    return {
        **{m: summary[split].get(f"{split}/{args.task}/{m}") for m in METRICS},
        **scored,
        "n_scored": int(res["label_mask"][args.task].sum()),  # the rows the scores above are over
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "stopped_early": summary["stopped_early"],
        "train_seconds": summary["train_seconds"],
        "trainable_params": summary["trainable_parameters"],
        "pairs_per_s": pairs_per_s,
        "feature_cache": summary["feature_cache"],
        "split": split,
    }


def with_presence(batches: Iterable[dict[str, Any]], text: bool, image: bool) -> Iterator[dict[str, Any]]:
    """The same batches with the caption and/or the image marked absent in every example."""
    for batch in batches:
        n = len(batch["ids"])
        yield {
            **batch,
            "text_present": batch.get("text_present", torch.ones(n, dtype=torch.bool)) & text,
            "image_present": batch.get("image_present", torch.ones(n, dtype=torch.bool)) & image,
        }


def _noting_complete(batches: Iterable[dict[str, Any]], into: list[torch.Tensor]) -> Iterator[dict[str, Any]]:
    """The batches unchanged; `into` gets each one's flags of the rows with both sides in the data."""
    for batch in batches:
        ones = torch.ones(len(batch["ids"]), dtype=torch.bool)
        into.append(batch.get("text_present", ones).cpu() & batch.get("image_present", ones).cpu())
        yield batch


def missing_modality_accuracy(trainer: Trainer, split: str, task: str) -> dict[str, float]:
    """`task`'s accuracy on the pairs of `split` that are complete in the data: as they are, with every caption
    and with every image removed (a pair that lacks a side in the data is no complete pair, whatever is removed)."""
    out = {}
    for key, text, image in CONDITIONS:
        complete: list[torch.Tensor] = []  # per row, in the loader's order, as the data has it
        batches = with_presence(_noting_complete(trainer.eval_loader(split), complete), text, image)
        r = run_inference(trainer.model, batches, trainer.eval_transform, trainer.amp, split, progress=False)
        mask = r["label_mask"][task] & torch.cat(complete).to(r["label_mask"][task].device)
        hits = r["outputs"][task].argmax(-1)[mask] == r["labels"][task][mask]
        out[key] = float(hits.float().mean()) if mask.any() else float("nan")
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": label, "seeds": len(runs)}
    for key in (*METRICS, *(c[0] for c in CONDITIONS), "train_seconds", "pairs_per_s"):
        row[key], row[f"{key}_std"] = mean_std([r[key] for r in runs])
    row["trainable_params"] = runs[0]["trainable_params"]
    row["splits"] = sorted({r.get("split", "test") for r in runs})
    for key in ("epochs", "steps"):  # as trained (each run's summary.json): one number, or the range over seeds
        row[key] = span([r.get(key) for r in runs])
    row["stopped_early"] = sum(bool(r.get("stopped_early")) for r in runs)
    row["n_scored"] = min((r["n_scored"] for r in runs if r.get("n_scored") is not None), default=None)
    return row


def span(values: list[Any]) -> Any:
    """The one value, or "lo..hi" when they differ ("?" for a run that did not record it)."""
    if any(v is None for v in values):
        return "?"
    return values[0] if len(set(values)) == 1 else f"{min(values)}..{max(values)}"


def budget_lines(rows: list[dict[str, Any]], epochs: int) -> list[str]:
    """Report lines on the epochs and optimizer steps the runs actually trained, flagging unequal budgets."""
    trained = {r["name"]: (r["epochs"], r["steps"]) for r in rows}
    if len(set(trained.values())) == 1:
        (e, s), = set(trained.values())
        note = "" if e == epochs else f" (not the {epochs} asked for)"
        return [f"- trained: every run {e} epochs, {s} optimizer steps{note} (each run's summary.json)"]
    listed = "; ".join(f"`{k}` {e} epochs / {s} steps" for k, (e, s) in trained.items())
    return [f"- **UNEQUAL BUDGETS**: the runs did not all train the same epochs and steps, so the comparison is not "
            f"like for like: {listed}"]  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    xs = range(len(rows))
    for j, m in enumerate(METRICS):
        ax.bar([x + (j - 1) * width for x in xs], [100 * r[m] for r in rows], width,
               yerr=[100 * r[f"{m}_std"] for r in rows], capsize=3, label=m.replace("_", "-"))  # fmt: skip
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("% (mean ± std over seeds)")
    lo = min(100 * r[m] - 100 * r[f"{m}_std"] for r in rows for m in METRICS)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", ncol=3, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(row: dict[str, Any], key: str, scale: float = 100, fmt: str = ".2f") -> str:
    """mean ± std over seeds; one seed has no std (not a std of 0)."""
    std = f"{scale * row[f'{key}_std']:{fmt}}" if row["seeds"] > 1 else "n/a (1 seed)"
    return f"{scale * row[key]:{fmt}} ± {std}"


def table(rows: list[dict[str, Any]], cached: bool = True) -> list[str]:
    timed = "fusion+heads" if cached else "whole model"
    out = [
        f"| strategy | accuracy | macro-F1 | weighted-F1 | trainable params | train time (s) | inference pairs/s ({timed}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(_pm(r, m) for m in METRICS)
        out.append(f"| {r['name']} | {cells} | {r['trainable_params']:,} | {_pm(r, 'train_seconds', 1, '.1f')} | "
                   f"{r['pairs_per_s']:.0f} |")  # fmt: skip
    return out


def missing_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| strategy | accuracy, complete pairs | no caption (image only) | no image (caption only) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(_pm(r, k) for k, _, _ in CONDITIONS)
        out.append(f"| {r['name']} | {cells} |")
    return out


def sampling_noise(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Sampling noise of a difference between two rows' scores on a test set of n scored rows, in points: the
    binomial standard error of a difference of two accuracies, 100 * sqrt(2 p (1 - p) / n), p their mean accuracy
    (inf when n is unknown: then no difference counts)."""
    n = min(a.get("n_scored") or 0, b.get("n_scored") or 0)
    if not n:
        return math.inf
    p = (a["accuracy"] + b["accuracy"]) / 2
    return 100 * math.sqrt(2 * p * (1 - p) / n)


NOISE_RULE = (
    "A difference counts only if it exceeds both the seed spread (the sum of the two seed stds) and the test "
    "set's sampling noise: the binomial standard error of a difference of two accuracies on the n scored rows, "
    "100·sqrt(2p(1−p)/n) with p their mean accuracy (also used for weighted-F1)."
)


def unimodal_baseline(row: str) -> bool:
    """A row of a strategy that reads one side (`text_only`, `image_only`, a plugin's with `uses_image = False`),
    by its flags; `row` may carry a suffix ("late (frozen)")."""
    return len(sides_read(FUSION_REGISTRY.get_class(row.split(" ")[0]))) == 1


def verdict(rows: dict[str, dict[str, Any]]) -> str:
    """Plain words: does the best fused strategy beat the better unimodal baseline, beyond the seed spread and
    the test set's sampling noise?"""
    fused = {k: v for k, v in rows.items() if not unimodal_baseline(k)}
    unimodal = {k: v for k, v in rows.items() if unimodal_baseline(k)}
    if not fused or not unimodal:
        return "Run fused strategies and unimodal baselines together to compare them."
    best_name, best = max(fused.items(), key=lambda kv: kv[1]["weighted_f1"])
    uni_name, uni = max(unimodal.items(), key=lambda kv: kv[1]["weighted_f1"])
    gap = 100 * (best["weighted_f1"] - uni["weighted_f1"])
    noise = 100 * (best["weighted_f1_std"] + uni["weighted_f1_std"])
    sampling = sampling_noise(best, uni)
    # only the baselines that ran are claimed: one of them is not "both"
    baselines = (f"the one unimodal baseline run (`{uni_name}`)" if len(unimodal) == 1 else
                 "both unimodal baselines" if len(unimodal) == 2 else f"all {len(unimodal)} unimodal baselines")  # fmt: skip
    if best["seeds"] < 2:
        return (f"One seed per strategy: no seed spread to judge by (run --seeds 3 for a verdict). Best fused "
                f"strategy `{best_name}`: weighted-F1 {100 * best['weighted_f1']:.2f} vs "
                f"{100 * uni['weighted_f1']:.2f} for `{uni_name}` ({gap:+.2f} points).")  # fmt: skip
    if gap > noise and gap > sampling:
        head = f"Fusion beats {baselines}"
    elif gap > 0:
        below = " and ".join(w for w, v in (("the seed spread", noise), ("the test-set noise", sampling)) if gap <= v)
        head = f"Fusion is ahead of {baselines}, but by less than {below} (not a clear win)"
    else:
        head = f"Fusion does NOT beat {'the best unimodal baseline' if len(unimodal) == 2 else baselines}"
    text = (
        f"{head}: best fused strategy `{best_name}` has weighted-F1 {100 * best['weighted_f1']:.2f} vs "
        f"{100 * uni['weighted_f1']:.2f} for `{uni_name}` ({gap:+.2f} points; sum of their seed stds {noise:.2f}; "
        f"test-set noise {sampling:.2f} on {best.get('n_scored') or '?'} scored rows)."
    )
    if "cross_attention" in rows:
        ref = 100 * (rows["cross_attention"]["weighted_f1"] - uni["weighted_f1"])
        text += f" The reference `cross_attention` is {ref:+.2f} points vs `{uni_name}`."
    return text


def cross_vs_pooled(rows: dict[str, dict[str, Any]]) -> str:
    """Does the reference cross-attention beat the best pooled fused strategy, beyond the seed spread and the
    test set's sampling noise?"""
    lines = []
    for suffix in ("", " (frozen)"):
        fused = {k: v for k, v in rows.items() if k.endswith(suffix) and (suffix or not k.endswith(")"))
                 and not unimodal_baseline(k)}  # fmt: skip
        ref = fused.pop("cross_attention" + suffix, None)
        if ref is None or not fused:
            continue
        name, other = max(fused.items(), key=lambda kv: kv[1]["accuracy"])
        gap = 100 * (ref["accuracy"] - other["accuracy"])
        spread = 100 * (ref["accuracy_std"] + other["accuracy_std"])
        sampling = sampling_noise(ref, other)
        word = ("beats" if gap > spread and gap > sampling else
                "is ahead of, within the seed spread or test-set noise," if gap > 0 else "does not beat")  # fmt: skip
        if ref["seeds"] < 2:
            lines.append(f"`cross_attention{suffix}` vs the best other fused strategy `{name}`: accuracy "
                         f"{gap:+.2f} points (one seed: no spread to judge by).")  # fmt: skip
            continue
        lines.append(f"`cross_attention{suffix}` {word} the best other fused strategy `{name}`: accuracy "
                     f"{gap:+.2f} points (sum of their seed stds {spread:.2f}; test-set noise {sampling:.2f} on "
                     f"{ref.get('n_scored') or '?'} scored rows).")  # fmt: skip
    return " ".join(lines)


def timing_note(cached: bool) -> str:
    """How the report's times are measured."""
    timed = ("fusion + heads on the cached encoder features (the encoders cost the same for every strategy)"
             if cached else "the whole model, encoders included (they train in every run: no feature cache)")  # fmt: skip
    return (f"Train time (s): wall-clock seconds of each run's training loop (its epochs with their validation passes "
            f"and checkpoints; not building the model or the feature cache). Inference pairs/s: one pass over the "
            f"scored split, timing {timed}. Both are measured after one untimed warm-up run (one optimizer step, its "
            f"evaluation and an inference pass) before the first timed run, so the process's one-time start-up is "
            f"charged to no strategy.")


def partial_note(layers: list[int] | None, freeze: str) -> str:
    if not layers and freeze != "encoders":  # the user's config trains its encoders end to end
        return f"model.freeze: {freeze} (encoders trained in every run; no shared feature cache)"
    if not layers:
        return "frozen, features cached once and shared by all runs"
    return (f"top {layers[0]} text / {layers[1]} image blocks fine-tuned on the cached hidden states entering "
            "them (shared by all runs), encoder lr x0.05, layer decay 0.8")


def main(argv: list[str] | None = None) -> int:
    # no abbreviations: `--seed 1` is an error, not a silent `--seeds 1`
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument(
        "--config", help="a fusionkit train config (YAML/JSON): your data, columns, tasks and encoders; every run "
        "uses it with the strategy, seed and the budget below set (its freeze setting is kept; its optim.max_steps "
        "and run.patience are switched off, so every run trains --epochs)",
    )
    p.add_argument(
        "--dataset", help="a dataset path or spec (default: see above); without --config its columns must be "
        "text, image and sentiment (labels positive/neutral/negative)",
    )
    p.add_argument("--task", help="the classification task the tables score (default: the config's first)")
    load_plugins()  # a user's own strategies ($FUSIONKIT_PLUGINS) are compared by default too
    p.add_argument("--strategies", nargs="+", default=list_fusions())
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--trainable-layers", type=int, nargs=2, metavar=("TEXT", "IMAGE"),
        help="partial fine-tuning: also train the top TEXT / IMAGE encoder blocks, on cached hidden states "
        "(encoder lr x0.05, layer decay 0.8); results go to compare_fusion_partial.*",
    )
    p.add_argument(
        "--group-by-length", action="store_true", help="batches of similar caption length (data.group_by_length)"
    )
    p.add_argument("--no-multitask", action="store_true", help="skip the sentiment vs sentiment+ITM variant")
    p.add_argument(
        "--modality-dropout", type=float, default=0.0, help="train with model.fusion.modality_dropout"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 epoch, 2 seeds, small data; its runs go to "
        "WORK_DIR/quick and no report is written"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (1 on a busy machine)")
    p.add_argument("--work-dir", default="runs/compare_fusion")
    p.add_argument("--cache-dir", default=os.environ.get("FUSIONKIT_CACHE"), help="default: WORK_DIR/cache")
    p.add_argument("--out", help=f"report folder (default: {RESULTS} for the built-in comparison, WORK_DIR/full for "
                   "--config / --dataset: a comparison of your data never replaces the shipped results)")
    args = p.parse_args(argv)
    args.encoders = {}  # encoders_of's, for this invocation
    if args.quick:
        args.epochs, args.seeds = 1, 2
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir) / ("quick" if args.quick else "full")  # split + caches shared by both modes
    work.mkdir(parents=True, exist_ok=True)
    try:
        try:  # the data, columns and task are checked before any training
            base, dataset, encoders, data = setup(args, work)
            args.task = scored_task(args, base) if data is None else (args.task or "sentiment")
            shared = build_config(args.config, config_keys(base))
            args.metric = shared.run.metric or f"val/{args.task}/macro_f1"
            if not args.metric.startswith(f"val/{args.task}/"):  # the scored task chooses each run's epoch
                args.metric = f"val/{args.task}/macro_f1"
            base["run.metric"] = args.metric
            # the comparison owns the budget: every run trains --epochs, none stops early or at a step count
            base["optim.max_steps"], base["run.patience"] = None, None
            args.overridden = overridden(args, shared)
            for note in args.overridden:
                print(f"note: the config's {note}", flush=True)
            if any(t.type == "itm" for t in shared.model.tasks) and not args.no_multitask:
                print("the config trains an itm task already: no separate +ITM variant", flush=True)
                args.no_multitask = True
        except (ConfigError, DataError, FileNotFoundError) as e:
            print(f"compare_fusion: error: {e}", file=sys.stderr)
            return 2
        try:
            return run_comparison(args, argv, work, base, dataset, encoders, data)
        except (ConfigError, DataError) as e:
            print(f"compare_fusion: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # a run stopped at a step and saved a checkpoint, or stopped between runs
        print(f"\ncompare_fusion: interrupted. To continue, run the same command again (finished runs are read back "
              f"from {work / 'results.jsonl'}, an interrupted one continues from its checkpoint)", file=sys.stderr)
        return 130


def overridden(args: argparse.Namespace, cfg: Any) -> list[str]:
    """The user's config settings this comparison replaces (its budget and selection metric), in words."""
    notes = []
    if cfg.optim.max_steps is not None:
        notes.append(f"optim.max_steps {cfg.optim.max_steps} is switched off: every run trains {args.epochs} epochs")
    if cfg.run.patience is not None:
        notes.append(f"run.patience {cfg.run.patience} is switched off: no run stops early, so every strategy "
                     "trains the same epochs (the best epoch is still chosen on the metric)")  # fmt: skip
    if cfg.run.metric is not None and cfg.run.metric != args.metric:
        notes.append(f"run.metric {cfg.run.metric} is replaced by {args.metric}: each run's epoch is chosen on "
                     f"the scored task `{args.task}`")  # fmt: skip
    written = load_config_file(args.config).get("optim") or {} if args.config is not None else {}
    for key, mine, option in (("epochs", args.epochs, "--epochs"), ("lr", args.lr, "--lr"),
                              ("batch_size", args.batch_size, "--batch-size")):  # fmt: skip
        if isinstance(written, dict) and key in written and getattr(cfg.optim, key) != mine:  # set in the file
            notes.append(f"optim.{key} {getattr(cfg.optim, key)} is replaced by {option} {mine}")
    return notes


def run_comparison(args: argparse.Namespace, argv: list[str] | None, work: Path, base: dict[str, Any],
                   dataset: str, encoders: str, data: Any) -> int:  # fmt: skip
    print(f"dataset: {dataset}\nencoders: {encoders}\nmachine: {machine()}", flush=True)

    started, reused, total = time.time(), 0, 0
    # (row suffix, run-dir tag, overrides): partial fine-tuning runs its frozen baseline beside it
    modes: list[tuple[str, str, dict[str, Any]]] = [("", "", {})]
    if args.trainable_layers:  # the top blocks train on the cached hidden states entering them
        text_k, image_k = args.trainable_layers
        partial = {"model.freeze": "top_k", "model.text.trainable_layers": text_k,
                   "model.image.trainable_layers": image_k, "optim.encoder_lr_scale": 0.05,
                   "optim.layer_decay": 0.8}  # fmt: skip
        frozen = {"model.freeze": "encoders", "model.text.trainable_layers": None,  # the partial keys unset
                  "model.image.trainable_layers": None, "optim.encoder_lr_scale": 0.1, "optim.layer_decay": None}
        modes = [("", f"-top{text_k}{image_k}", partial), (" (frozen)", "-frozen", frozen)]
    base = {**base, **modes[0][2]}
    if args.group_by_length:
        base["data.group_by_length"] = True
    rows: dict[str, dict[str, Any]] = {}
    for suffix, tag, mode in modes:
        for strategy in args.strategies:
            runs = []
            for seed in range(args.seeds):
                extra = {**mode, "model.fusion.strategy": strategy, "run.seed": seed}
                r = train_one(base, extra, args, work, f"{strategy}{tag}-s{seed}", data)
                if r["accuracy"] is None:
                    raise ConfigError(f"task {args.task!r} has no labelled rows in the {r['split']} split of "
                                      f"{dataset}: nothing to score; label them or pick another --task")  # fmt: skip
                print(f"  {strategy + suffix:26s} seed {seed}: acc {r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} "
                      f"weighted-F1 {r['weighted_f1']:.4f} ({r.get('epochs', '?')} epochs, {r.get('steps', '?')} "
                      f"steps, {r['train_seconds']:.0f}s"
                      f"{', read back from results.jsonl' if r.get('reused') else ''})", flush=True)  # fmt: skip
                runs.append(r)
                reused, total = reused + bool(r.get("reused")), total + 1
            rows[strategy + suffix] = aggregate(strategy + suffix, runs)

    multitask: list[dict[str, Any]] = []
    if not args.no_multitask:
        ref = "cross_attention" if "cross_attention" in rows else args.strategies[0]
        own = [to_dict(t) for t in build_config(args.config, config_keys(base)).model.tasks]
        if data is not None:  # MVSA: its sentiment task, as the dataset declares it
            own = [{"name": "sentiment", "type": "classification", "num_classes": 3,
                    "class_names": ["positive", "neutral", "negative"]}]  # fmt: skip
        runs = []
        for seed in range(args.seeds):
            extra = {"model.fusion.strategy": ref, "run.seed": seed,
                     "model.tasks": [*own, {"name": "itm", "type": "itm", "weight": 0.5}]}  # fmt: skip
            runs.append(train_one(base, extra, args, work, f"{ref}-itm{tag}-s{seed}", data))
        multitask = [
            dict(rows[ref], name=f"{ref}: {args.task}"),
            aggregate(f"{ref}: {args.task} + ITM (w=0.5)", runs),
        ]

    scored_on = {r for row in rows.values() for r in row["splits"]}
    split_name = ("CLMLF dev (held out)" if "MVSA" in dataset else "test split" if scored_on == {"test"} else
                  "val split (no test split: the same rows chose each run's epoch, so scores run high)")  # fmt: skip
    counts = {row["n_scored"] for row in rows.values()}
    scored_rows = "/".join(str(c) for c in sorted(counts, key=str)) if counts != {None} else "?"
    shared = build_config(args.config, config_keys(base)).model
    dropout, cached = args.modality_dropout or shared.fusion.modality_dropout, shared.freeze in ("encoders", "top_k")
    lines = [
        "# Fusion strategies compared",
        "",
        f"- dataset: {dataset}; scores of task `{args.task}` on the {split_name} ({scored_rows} scored rows); the "
        "same saved split for every run"
        + (f"; every run trains the tasks {args.trained_tasks}" if len(getattr(args, "trained_tasks", [])) > 1
           else ""),  # fmt: skip
        f"- encoders: {encoders}; {partial_note(args.trainable_layers, shared.freeze)}",
        f"- budget: {args.epochs} epochs, lr {args.lr} (warmup + cosine), batch {args.batch_size}, best epoch chosen on {args.metric}; "
        f"{args.seeds} seeds (0..{args.seeds - 1}) per strategy"
        + ("; batches grouped by caption length" if args.group_by_length else ""),
        *budget_lines(list(rows.values()) + multitask, args.epochs),
        *([f"- overridden in the config: {'; '.join(args.overridden)}"] if args.overridden else []),
        f"- machine: {machine()}",
        f"- command: `python benchmarks/compare_fusion.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" ({(time.time() - started) / 60:.1f} min"
        + (f"; {reused} of {total} runs read back from {work / 'results.jsonl'}, trained by earlier invocations"
           if reused else "") + ")",  # fmt: skip
        "",
        *table(list(rows.values()), cached),
        "",
        verdict({k: v for k, v in rows.items() if not k.endswith(" (frozen)")}),
        "",
        cross_vs_pooled(rows),
        "",
        NOISE_RULE,
        "",
        timing_note(cached),
        "",
        "## Missing modalities at test time",
        "",
        f"Accuracy on the {split_name}'s pairs that have both sides in the data, as they are and when every one "
        f"loses its caption or its image (the model's learned placeholder stands in; trained with modality dropout "
        f"{dropout}).",
        "",
        *missing_table(list(rows.values())),
    ]
    if multitask:
        lines += [
            "",
            f"## Multi-task: does an image-text matching head help {args.task}?",
            "",
            *table(multitask, cached),
        ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.quick:
        folder = args.out or (RESULTS if args.config is None and args.dataset is None else work)
        name = "compare_fusion_partial" if args.trainable_layers else "compare_fusion"
        if data is None:  # your data: one report per scored task; an earlier report of it is kept as .~N~
            name += f"-{args.task}"
        out = Path(folder) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".csv", ".png"):
            if data is None:
                keep_previous(out.with_suffix(suffix))
        out.with_suffix(".md").write_text(report)
        all_rows = list(rows.values()) + multitask
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows)
        plot(list(rows.values()), out.with_suffix(".png"), f"{dataset} (task {args.task}); {encoders}; {args.seeds} seeds")
        print(f"wrote {out}.md, .csv, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
