"""`fusionkit train | eval | predict | embed`.

`fusionkit train` with no arguments trains the tiny preset on the built-in synthetic dataset (about
two minutes on 2 CPU cores). Any config key can be overridden as `--section.key value`, e.g.
`fusionkit train configs/mvsa_minilm_dinov2.yaml --model.fusion.strategy gated --optim.lr 3e-4`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, parse_value

EXAMPLE = "fusionkit train configs/tiny_synthetic.yaml --optim.epochs 3 --model.fusion.strategy gated"


def _overrides(extra: list[str]) -> dict[str, Any]:
    """`--a.b value` / `--a.b=value` pairs -> {"a.b": parsed value}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --optim.lr 1e-3")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise ConfigError(f"override {arg} has no value")
            i += 1
            value = extra[i]
        out[key] = parse_value(value)
        i += 1
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusionkit", description="Multimodal text-image fusion: train, evaluate, embed."
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        usage="fusionkit train [CONFIG] [--resume RUN_DIR] [--section.key VALUE ...]",
        help="train a model",
        description="CONFIG: a YAML/JSON config (default: the tiny preset on the synthetic dataset).",
        epilog=f"example: {EXAMPLE}",
    )
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")

    def data_args(sp: argparse.ArgumentParser, split: str) -> None:
        sp.add_argument("checkpoint", help="model dir or run dir (uses its best/ checkpoint)")
        sp.add_argument("--data", help="dataset spec (default: the one in the run's config)")
        sp.add_argument("--split", default=split, help="train | val | test | all")
        sp.add_argument("--split-file", help="split JSON (default: the run dir's split.json)")
        sp.add_argument("--batch-size", type=int, default=128)
        sp.add_argument("--cache-dir", help="data cache dir (default ~/.cache/fusionkit)")
        sp.add_argument("--device", default="auto")

    e = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    data_args(e, "val")
    e.add_argument("--output", help="also write the metrics JSON here")
    pr = sub.add_parser("predict", help="write predictions (id, label, probabilities) for a split")
    data_args(pr, "test")
    pr.add_argument("--output", required=True, help=".csv or .jsonl")
    em = sub.add_parser("embed", help="joint (or text/image) vectors for a dataset or CSV")
    data_args(em, "all")
    em.add_argument("--output", required=True, help=".npy or .parquet")
    em.add_argument("--modality", choices=("joint", "text", "image"), default="joint")
    return p


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from .training.config import build_config
    from .training.trainer import train

    # The config is the leading positional; parsed here because argparse would take an override's value for it.
    config = extra.pop(0) if extra and not extra[0].startswith("--") else None
    overrides = _overrides(extra)
    if args.resume:
        run_dir = Path(args.resume)
        if config:
            raise ConfigError("give either a config or --resume RUN_DIR, not both")
        cfg = build_config(run_dir / "config.yaml", overrides)
        cfg.run.output_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    else:
        cfg = build_config(config, overrides)
    summary = train(cfg, resume=bool(args.resume))
    print(f"\nrun dir: {summary['run_dir']}")
    print(f"best checkpoint: {summary['best_checkpoint']} ({summary['metric']} = {summary['best']})")
    for split in ("val", "test"):
        if split in summary:
            print(f"{split}: " + ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in summary[split].items()
                                        if isinstance(v, float)))  # fmt: skip
    print(f"train time: {summary['train_seconds']:.1f}s; details in summary.json, metrics.jsonl, *.png")
    return 0


def _split(args: argparse.Namespace, model: Any, with_labels: bool = False) -> Any:
    """The requested split of the dataset (as saved in the run dir when there is one), as a data cache.

    `with_labels`: read the model's task labels from a CSV/JSONL table too (eval needs them; predict
    and embed also work on unlabeled tables)."""
    from .data import build_cache, load_dataset, split_dataset
    from .training.trainer import dataset_kwargs

    ckpt = Path(args.checkpoint)
    run_config = next((d / "config.json" for d in (ckpt, ckpt.parent) if (d / "split.json").is_file()), None)
    spec = args.data
    if spec is None and run_config is not None:
        spec = json.loads(run_config.read_text())["data"]["dataset"]
    if spec is None:
        raise ConfigError("--data is required when the checkpoint is not inside a run dir")
    ds = load_dataset(spec, **(dataset_kwargs(spec, model.config.tasks) if with_labels else {}))
    if args.split != "all":
        split_file = args.split_file or (
            run_config.parent / "split.json" if run_config and not args.data else None
        )
        parts = split_dataset(ds, path=split_file)
        if args.split not in parts:
            raise ConfigError(f"unknown split {args.split!r}; use train, val, test or all")
        ds = parts[args.split]
    cache_dir = Path(args.cache_dir or "~/.cache/fusionkit").expanduser()
    return ds, build_cache(
        ds, model.tokenizer, model.image_preprocess, cache_dir, model.config.text.max_length
    )


def _inference(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from .models import FusionModel
    from .training.trainer import inference_loader, resolve_device, run_inference

    model = FusionModel.from_pretrained(args.checkpoint, map_location=resolve_device(args.device))
    _, data = _split(args, model, with_labels=args.command == "eval")
    loader, transform = inference_loader(model, data, args.batch_size)
    return model, run_inference(model, loader, transform, desc=args.split)


def _eval(args: argparse.Namespace) -> int:
    from .training.trainer import evaluation_metrics

    model, result = _inference(args)
    flat, details = evaluation_metrics(model, result, args.split)
    text = json.dumps({**flat, "details": details}, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .training.report import write_predictions
    from .training.trainer import prediction_rows

    model, result = _inference(args)
    path = write_predictions(Path(args.output), prediction_rows(model, result))
    print(f"wrote {len(result['ids'])} predictions to {path}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .embedding import embed
    from .models import FusionModel
    from .training.trainer import resolve_device

    model = FusionModel.from_pretrained(args.checkpoint, map_location=resolve_device(args.device))
    ds, _ = _split(args, model) if args.data is None or args.split != "all" else (None, None)
    if ds is None:
        from .data import load_dataset

        ds = load_dataset(args.data)
    texts = (ex.text for ex in ds) if args.modality != "image" else None
    images = (ex.image for ex in ds) if args.modality != "text" else None
    vectors = embed(model, texts, images, batch_size=args.batch_size)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": ds.ids, "embedding": list(vectors)}), out)
    else:
        np.save(out, vectors)
        (out.with_suffix(".ids.json")).write_text(json.dumps(ds.ids))
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fusionkit` command; returns the exit status."""
    from .data import DataError
    from .training.trainer import NonFiniteLossError, TrainingInterrupted

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, extra)
        if extra:
            raise ConfigError(f"unexpected arguments {extra}")
        return {"eval": _eval, "predict": _predict, "embed": _embed}[args.command](args)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except (ConfigError, DataError, NonFiniteLossError, FileNotFoundError, OSError, ValueError) as e:
        print(f"fusionkit {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
