"""`fusionkit train | eval | predict | embed | export`.

`fusionkit train` with no arguments trains the tiny preset on the built-in synthetic dataset (about
two minutes on 2 CPU cores). Any config key can be overridden as `--section.key value`, e.g.
`fusionkit train configs/mvsa_minilm_dinov2.yaml --model.fusion.strategy gated --optim.lr 3e-4`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, close_key, config_keys, parse_value
from .precision import PRECISIONS

log = logging.getLogger("fusionkit")

# runs anywhere (the default: the tiny preset on the built-in synthetic data), as installed by pip
EXAMPLE = "fusionkit train --optim.epochs 3 --model.fusion.strategy gated"


# `fusionkit export`'s default graphs: every entry point (`model` left out for a model without labelled tasks)
EXPORT_PARTS = "model,encode,encode_text,encode_image"


def _overrides(extra: list[str], options: Sequence[str] = ()) -> dict[str, Any]:
    """`--a.b value` / `--a.b=value` pairs -> {"a.b": parsed value}. A key that is no config key is an unknown
    option (with a did-you-mean over the config keys and the command's own `options`), not an override
    missing its value."""
    from .training.config import TrainConfig

    keys = config_keys(TrainConfig)
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("-") and not arg.startswith("--"):  # `-x`, or `fusionkit -v train`: no such option
            raise ConfigError(f"unrecognized arguments: {arg}; see fusionkit -h and fusionkit train -h")
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --optim.lr 1e-3")
        key, eq, value = arg[2:].partition("=")
        if not eq and any(c.isspace() for c in key):  # `"--model.tasks [...]"` quoted as one word
            key, _, value = key.partition(next(c for c in key if c.isspace()))
            if _is_config_key(key, keys):
                raise ConfigError(f"--{key} and its value reached fusionkit as one word ({arg!r}): write them as two "
                                  f"words (--{key} VALUE, quoting the value alone) or as --{key}=VALUE")  # fmt: skip
            key = arg[2:]
        if key == "config":
            raise ConfigError("CONFIG is positional, not an option: fusionkit train|tune CONFIG [--section.key VALUE ...]")
        if not _is_config_key(key, keys):
            spelled = {k: f"--{k}" for k in keys} | {o[2:].replace("-", "_"): o for o in options}
            close = close_key(key, spelled)
            hint = f"; did you mean {spelled[close]}?" if close else ""
            raise ConfigError(f"unknown option --{key}{hint} (fusionkit train --print-config lists every config key)")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"--{key} has no value: give one (--{key} VALUE, or --{key}=VALUE for a value "
                                  "that starts with --)")  # fmt: skip
            i += 1
            value = extra[i]
        try:
            parsed = parse_value(value)
        except ConfigError as e:
            raise ConfigError(f"--{key}: {e}") from None
        if key in out and out[key] != parsed:  # the last one wins, as in argparse, but not without a word
            log.warning("--%s is given twice (%r, then %r): the last one is used", key, given[key], value)
        out[key], given[key] = parsed, value
        i += 1
    return out


def _is_config_key(key: str, keys: list[str]) -> bool:
    """Whether `--key` sets config: a key, a whole section, or a key inside a mapping or list setting
    (`model.text.config_overrides.x`, `model.tasks.<task>.<option>`), whose own check names what is wrong."""
    parts = key.split(".")
    return any(".".join(parts[:n]) in keys for n in range(1, len(parts) + 1)) or any(
        k.startswith(f"{key}.") for k in keys
    )


def _positive_int(text: str) -> int:
    """argparse type: 0 rows per batch (or shard, or trials) would do nothing and say it succeeded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _split_name(text: str) -> str:
    """A split as `--split` takes it: a DatasetDict's names for the validation split are val's."""
    from .data.sources.hf import SPLIT_ALIASES

    return SPLIT_ALIASES.get(text, text)


def _folder(text: str) -> str:
    """argparse type: a folder that exists (a typo would otherwise fail on every row's image)."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return str(Path(text).expanduser())


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusionkit", description="Multimodal text-image fusion: train, evaluate, embed."
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"fusionkit {__version__} (torch {_torch_version()})")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        usage="fusionkit train [CONFIG] [--resume RUN_DIR] [--section.key VALUE ...]",
        help="train a model",
        description="CONFIG: a YAML/JSON config (default: the tiny preset on the synthetic dataset). Every "
        "config key can be set as --section.key VALUE; --print-config lists them all with their values.",
        epilog=f"example: {EXAMPLE}",
    )
    t.add_argument("--print-config", action="store_true",
                   help="print every config key with its resolved value (as YAML) and exit")  # fmt: skip
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--accept-changes", action="store_true",
                   help="let --resume go on although the config or data changed (recorded in resume_log.jsonl)")

    def data_args(sp: argparse.ArgumentParser, split: str) -> None:
        sp.add_argument("checkpoint", help="model dir or run dir (uses its best/ checkpoint)")
        sp.add_argument("--data", help="a dataset (default: the run's own); all its rows unless --split is given")
        sp.add_argument("--split", choices=("train", "val", "test", "all"), type=_split_name,  # before the model
                        help=f"default: {split} of the run's data; all rows of --data (validation, valid, dev: val, "
                        "as a DatasetDict names it)")  # fmt: skip
        sp.add_argument("--split-file", help="split JSON (default: the run dir's split.json)")
        sp.add_argument("--batch-size", type=_positive_int, default=128,
                        help="rows per forward pass (default 128); lower it if memory runs out")
        sp.add_argument("--cache-dir", help="data cache dir (default: data.cache_dir, $FUSIONKIT_CACHE, ~/.cache/fusionkit)")
        sp.add_argument("--device", default="auto",
                        help="auto (this process's GPU, else the CPU), cpu, cuda or cuda:N (default auto)")
        sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (as training): bf16 on GPUs with bf16 tensor cores and on CPUs with Intel AMX or "
                        "Arm BF16, else fp32 (AVX512-BF16 alone too: --precision bf16 opts in)")  # fmt: skip
        sp.add_argument("--on-error", choices=("raise", "skip"),
                        help="a row or image that cannot be read: raise naming it, or skip it and report it "
                        "(default: the run's data.on_error)")  # fmt: skip
        for col in ("text", "image", "id"):
            sp.add_argument(f"--{col}-column", help=f"column of the {col}s in --data (default: the data.{col}_column "
                            "of the run, or that a saved model recorded)")
        sp.add_argument("--image-root", type=_folder, metavar="DIR",
                        help="folder that relative image paths are read from (default: the folder of a --data "
                        "file; of the run's own data, the run's data.image_root)")  # fmt: skip

    e = sub.add_parser("eval", help="evaluate a checkpoint on a split or a labelled file")
    data_args(e, "val")
    ensemble_help = ("more model or run dirs (e.g. other seeds) whose outputs are averaged with CHECKPOINT's "
                     "(class probabilities); data and split come from CHECKPOINT; frozen encoders that members "
                     "share run once, through the feature cache in --cache-dir")  # fmt: skip
    e.add_argument("--ensemble", nargs="+", default=[], metavar="CHECKPOINT", help=ensemble_help)
    e.add_argument("--output", help="also write the metrics JSON here")
    e.add_argument("--label-column", action="append", default=[], metavar="[TASK=]COLUMN",
                   help="the column of --data that holds a task's labels (default: the column it trained on)")
    pr = sub.add_parser(
        "predict",
        help="predict labels: one raw pair (--text/--image), every row of a file (--data), or a split",
        epilog='examples: fusionkit predict RUN --text "what a day" --image photo.jpg | '
        "fusionkit predict RUN --data new.csv --output preds.csv | fusionkit predict RUN --split test --output p.csv",
    )
    data_args(pr, "test")
    pr.add_argument("--ensemble", nargs="+", default=[], metavar="CHECKPOINT", help=ensemble_help)
    pr.add_argument("--text", help="one caption to predict (with --image, or alone)")
    pr.add_argument("--image", help="one image file to predict (with --text, or alone)")
    pr.add_argument("--output", help=".csv, .jsonl or .parquet (required unless --text/--image)")
    em = sub.add_parser("embed", help="joint (or text/image) vectors for a dataset or CSV")
    data_args(em, "all")
    for sp in (e, pr, em):
        sp.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: bars on a terminal, unless the run set run.progress: false)")  # fmt: skip
    em.add_argument("--output", required=True, help=".npy, .parquet, or DIR/ for resumable Parquet shards")
    em.add_argument("--modality", choices=("joint", "text", "image"),
                    help="default: joint, or text (image) when no row has an image (a caption), as fusionkit.embed")  # fmt: skip
    em.add_argument("--shard-size", type=_positive_int, help="rows per shard when --output is a directory (default 10000)")
    tu = sub.add_parser(
        "tune",
        usage="fusionkit tune CONFIG --trials N [--space SPACE.yaml] [--output-dir DIR] [--section.key VALUE ...]",
        help="search hyperparameters with Optuna (each trial a training run; bad trials pruned)",
        description="Trials train CONFIG (+ overrides) with values drawn from SPACE (default: lr, weight decay, "
        "dropout, modality dropout, fusion dim/depth, label smoothing, class weights, logit adjustment); the tune dir gets "
        "trials.csv, trials.md, history.png and best.yaml, and keeps the study (study.jsonl): tuning the "
        "same CONFIG and SPACE there again adds N trials. Needs `pip install 'fusionkit[tune]'`.",
    )
    tu.add_argument("--trials", type=_positive_int, required=True, help="number of trials")
    tu.add_argument("--space", help="search space YAML: {config.key: {type: float|int|categorical, ...}}")
    tu.add_argument("--output-dir", help="tune dir (default: run.output_dir/tune-<run.name>)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    al = sub.add_parser(
        "align",
        usage="fusionkit align DATA [--section.key VALUE ...]",
        help="align text and image vectors on unlabelled pairs (contrastive + image-text matching)",
        description="Trains the label-free tasks (contrastive InfoNCE + image-text matching) on a table of "
        "pairs (no label column needed), then reports text->image and image->text recall@1/5/10 on the "
        "held-out split against chance (retrieval.json). Afterwards encode_text and encode_image vectors "
        "share one space. Any config key can be set as --section.key VALUE (e.g. --data.text_column).",
    )
    al.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ex = sub.add_parser("export", help="ONNX graphs of a model (fp32, optionally int8), checked against PyTorch")
    ex.add_argument("checkpoint", help="model dir, run dir (uses its best/ checkpoint) or hub id")
    ex.add_argument("--format", choices=("onnx",), default="onnx", help="onnx, the only format (default)")
    ex.add_argument("--int8", action="store_true", help="also write int8 (dynamic quantization) graphs")
    ex.add_argument("--output", required=True, help="directory for the .onnx files, export.json and the processor")
    ex.add_argument("--parts", default=EXPORT_PARTS,
                    help=f"comma-separated graphs to export, of {EXPORT_PARTS} (default: all; a model without a "
                    "labelled task has no model graph)")  # fmt: skip
    for sp in (t, tu, al, e, pr, em, ex):  # the options a mistyped one may have meant (`--print_config`, `--splt`)
        sp.set_defaults(options=[o for o in sp._option_string_actions if o.startswith("--")])
    return p


ALIGN_TASKS = [{"name": "align", "type": "contrastive"}, {"name": "match", "type": "itm", "weight": 0.5}]


def _align(args: argparse.Namespace, extra: list[str]) -> int:
    """`fusionkit align DATA`: `train` with the label-free tasks, then retrieval recall on held-out pairs."""
    import yaml

    from .config import to_dict
    from .data import load_dataset, split_dataset
    from .embedding import embed, retrieval_recall
    from .models import FusionModel
    from .training.config import build_config
    from .training.report import json_text
    from .training.rundir import write_atomic
    from .training.trainer import reader_kwargs, train

    if not extra or extra[0].startswith("--"):
        raise ConfigError("fusionkit align needs the table of pairs: fusionkit align DATA [--section.key VALUE]")
    data, overrides = extra[0], _overrides(extra[1:], args.options)
    cfg = build_config(None, {"data.dataset": data, "model.tasks": ALIGN_TASKS,
                              "run.metric": "val/align/r@1", **overrides})  # fmt: skip
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if not any(t.type == "contrastive" for t in cfg.model.tasks):  # its retrieval.json would be at chance
        raise ConfigError("fusionkit align puts text and image vectors in one space with a contrastive task, which "
                          f"--model.tasks {[t.name for t in cfg.model.tasks]} lacks: add one "
                          '({"name": "align", "type": "contrastive"}), or train other tasks with fusionkit train')  # fmt: skip
    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    model = FusionModel.from_pretrained(run_dir)
    ds = load_dataset(cfg.data.dataset, **reader_kwargs(cfg.data, [], labels=False))
    parts = split_dataset(ds, path=run_dir / "split.json")
    split = "test" if len(parts["test"]) > 1 else "val"
    held = [ex for ex in parts[split] if ex.text is not None and ex.image is not None]  # only pairs retrieve
    if len(held) < 2:
        raise ConfigError(f"the {split} split has {len(held)} complete pairs: retrieval needs at least 2")
    vectors = embed(model, [ex.text for ex in held], [ex.image for ex in held], modalities=("text", "image"),
                    progress=False)  # fmt: skip
    recall = {"split": split, "pairs": len(held), "rows_without_a_side": len(parts[split]) - len(held),
              **retrieval_recall(vectors["text"], vectors["image"])}  # fmt: skip
    write_atomic(run_dir / "retrieval.json", json_text(recall, indent=2))
    print(f"\nrun dir: {run_dir}\nretrieval on {len(held)} {split} pairs (recall@k, chance in brackets):")
    for k in (1, 5, 10):
        print(f"  R@{k}: text->image {recall[f't2i_r@{k}']:.3f}, image->text {recall[f'i2t_r@{k}']:.3f} "
              f"({recall[f'chance_r@{k}']:.3f})")  # fmt: skip
    return 0


def _tune(args: argparse.Namespace, extra: list[str]) -> int:
    from .training.config import build_config
    from .tune import tune

    try:
        import optuna  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"fusionkit tune needs optuna ({e}): pip install 'fusionkit[tune]'") from None
    if not extra or extra[0].startswith("--"):
        raise ConfigError("fusionkit tune needs a CONFIG file first: fusionkit tune CONFIG --trials N")
    config = extra.pop(0)
    if args.space and not Path(args.space).is_file():
        raise ConfigError(f"--space {args.space}: the search space file " + ("is a directory" if Path(args.space).is_dir()
                          else "does not exist"))  # fmt: skip
    cfg = build_config(config, _overrides(extra, args.options))
    result = tune(cfg, args.trials, args.space, args.output_dir, seed=args.seed)
    print(json.dumps(result, indent=2))
    print(f"best config: {Path(result['output_dir']) / 'best.yaml'}")
    return 0


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from .training.config import build_config
    from .training.trainer import run_config, train

    # The config is the leading positional; parsed here because argparse would take an override's value for it.
    config = extra.pop(0) if extra and not extra[0].startswith("-") else None
    if config is not None and not config.strip():  # `fusionkit train "$CFG"` with CFG unset
        raise ConfigError("CONFIG is empty (an unset shell variable?): give a YAML/JSON config file, or leave it "
                          "out for the defaults")  # fmt: skip
    overrides = _overrides(extra, args.options)
    if args.resume is not None and not args.resume.strip():  # `--resume "$RUN"` with RUN unset: not a new run
        raise ConfigError("--resume is empty (an unset shell variable?): give the run dir to continue, or leave "
                          "--resume out to start a new run")  # fmt: skip
    if args.accept_changes and not args.resume:  # before --print-config: the command is wrong either way
        raise ConfigError("--accept-changes only applies to --resume RUN_DIR")
    if args.resume:
        run_dir = Path(os.path.abspath(Path(args.resume).expanduser()))  # `--resume .` inside the run dir: its name
        if config:
            raise ConfigError("give either a config or --resume RUN_DIR, not both")
        if not (run_dir / "config.yaml").is_file() and (found := _run_dir_of(run_dir)) not in (None, run_dir.resolve()):
            raise ConfigError(f"--resume {run_dir}: not a run dir (no config.yaml); the run dir is {found}")
        cfg = run_config(run_dir, overrides)
    else:
        cfg = build_config(config, overrides)
    if args.print_config:
        import yaml

        from .config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    summary = train(cfg, resume=bool(args.resume), accept_changes=args.accept_changes)
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch: one summary, from rank 0
        return 0
    print(f"\nrun dir: {summary['run_dir']}")
    print(f"best checkpoint: {summary['best_checkpoint']} ({summary['metric']} = {summary['best']})")
    for split in ("val", "test"):
        if split in summary:
            scores = [f"{k.split('/', 1)[1]}={v:.4f}" for k, v in summary[split].items() if isinstance(v, float)]
            # a split without labels (e.g. a benchmark's withheld test set) has predictions but no scores
            print(f"{split}: " + (", ".join(scores) or f"no labels to score; predictions in predictions_{split}.csv"))
    print(f"train time: {summary['train_seconds']:.1f}s; details in summary.json, metrics.jsonl, *.png")
    return 0


def _ensemble_members(args: argparse.Namespace) -> list[str]:
    """The model and its --ensemble members. A model listed twice (by any path to the same checkpoint: a run dir
    and its best) is refused: it would count twice in the average, and is a typo, mostly."""
    from .hub import resolve_pretrained_dir
    from .models.fusion_model import _find_checkpoint_dir

    members = [args.checkpoint, *args.ensemble]
    seen: dict[Path, str] = {}
    for m in members:
        key = _find_checkpoint_dir(resolve_pretrained_dir(m)).resolve()
        if key in seen:
            raise ConfigError(f"--ensemble: {m} is the model of {seen[key]} again ({key}): an ensemble averages "
                              "different models (e.g. other seeds); list each once")  # fmt: skip
        seen[key] = m
    return members


def _run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run dir holding a checkpoint (the run dir itself, `RUN/best`, `RUN/checkpoints/step-N`), if any.

    Found on the resolved path (`../ckpt` run from inside another run dir is not that run's) and only where a
    run keeps its models: a model copied beside a run's or a project's files is a model folder (its own
    saved columns; no split.json says which rows it trained on)."""
    from .training.rundir import CHECKPOINTS, is_run_dir

    ckpt = Path(checkpoint).expanduser()
    if not ckpt.exists():  # a hub id
        return None
    ckpt = ckpt.resolve()
    if is_run_dir(ckpt):
        return ckpt
    if ckpt.name in ("best", "last", "model") and is_run_dir(ckpt.parent):
        return ckpt.parent
    if ckpt.parent.name == CHECKPOINTS and is_run_dir(ckpt.parent.parent):
        return ckpt.parent.parent
    return None


def _check_unseen(checkpoint: str, ids: list[str], split: str, first: str, ensemble: bool = True,
                  scoring: bool = True) -> None:  # fmt: skip
    """A model must not be scored or predicted on a held-out split's rows that it trained on (another run's
    split file; ensemble seeds trained on different splits): the result would be inflated."""
    run_dir = _run_dir_of(checkpoint)
    if run_dir is None:  # a folder of save_pretrained: no split.json says which rows it trained on
        cost = "the score is inflated" if scoring else "their predictions are not held-out ones"
        log.warning("%s%s is a model folder, not a run dir: the rows it trained on are unknown, so if they include "
                    "some of the %d %s rows used here, %s", "--ensemble: " if ensemble else "",
                    checkpoint, len(ids), split, cost)  # fmt: skip
        return
    seen = set(json.loads((run_dir / "split.json").read_text()).get("train", []))
    overlap = [i for i in ids if i in seen]
    if overlap and not ensemble:
        raise ConfigError(
            f"{checkpoint} was trained on {len(overlap)} of the {len(ids)} {split} rows used here (e.g. "
            f"{overlap[:3]}): scoring them would inflate the result. Score its own held-out split (leave out "
            "--split-file), or pass --split train to see how it fits rows it trained on"
        )
    if overlap:
        older = _older_split_of(run_dir, _run_dir_of(first))
        if older:  # the same seed, split by two versions' schemes: say that, not "use the same data.split_seed"
            from .data.dataset import OLDER_SPLITS

            cause = (f"{older[0]}'s split.json was drawn by {OLDER_SPLITS} and {older[1]}'s by this version, which "
                     "orders each class's rows by a seeded hash of their ids: the same data.split_seed splits "
                     f"otherwise since fusionkit 0.3. Train {older[1]} again on {older[0]}'s split (--data.split_file "
                     f"{older[0]}/split.json) to ensemble them")  # fmt: skip
        else:
            cause = (f"its run made another split than {first}'s, and would inflate the score. Score rows no member "
                     "trained on (k-fold runs: their shared test split, --split test), or ensemble runs trained on "
                     "one split: the same data.split_seed (the default keeps it apart from run.seed), or "
                     f"--data.split_file {_run_dir_of(first) or first}/split.json")  # fmt: skip
        raise ConfigError(f"--ensemble: {checkpoint} was trained on {len(overlap)} of the {len(ids)} {split} rows "
                          f"used here (e.g. {overlap[:3]}): {cause}")  # fmt: skip


def _older_split_of(a: Path, b: Path | None) -> tuple[Path, Path] | None:
    """(older, newer) when two runs' split.json were drawn with the same seed and ratios, one by an older fusionkit's
    scheme and the other by this version's (`split_scheme`), else None."""
    from .data.dataset import SPLIT_SCHEME, split_scheme

    if b is None or not (b / "split.json").is_file():
        return None
    x, y = (json.loads((run / "split.json").read_text()) for run in (a, b))
    if (x.get("seed"), x.get("ratios")) != (y.get("seed"), y.get("ratios")):
        return None
    schemes = [split_scheme(x), split_scheme(y)]
    if schemes == [1, SPLIT_SCHEME]:
        return a, b
    return (b, a) if schemes == [SPLIT_SCHEME, 1] else None


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars of eval/predict: on a terminal only (a log file gets no carriage-return lines), and not
    where they were turned off: --no-progress, or the run's run.progress: false."""
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        return False
    run_dir = _run_dir_of(args.checkpoint)
    saved = json.loads((run_dir / "config.json").read_text()).get("run", {}) if run_dir is not None else {}
    return saved.get("progress", True) is not False


def _run_data_config(args: argparse.Namespace, model: Any = None) -> tuple[Any, Path | None]:
    """The run's `data` config (columns, policies, dataset) when the checkpoint is in a run dir, and that dir,
    with the command line's choices. The run's `data.image_root` is where its own data's images are: another
    `--data` file's relative paths are read from that file's folder (or `--image-root`), never from it.
    A model folder (`save_pretrained`) has no run config: its columns are those the model saved (`model`)."""
    import dataclasses

    from .config import from_dict
    from .training.config import DataConfig

    run_dir = _run_dir_of(args.checkpoint)
    data = DataConfig()
    if run_dir is not None:
        saved = json.loads((run_dir / "config.json").read_text()).get("data", {})
        known = {f.name for f in dataclasses.fields(DataConfig)}
        data = from_dict(DataConfig, {k: v for k, v in saved.items() if k in known}, "data")
    elif model is not None:
        data = dataclasses.replace(data, **model.data_columns)
    changes = {f"{c}_column": getattr(args, f"{c}_column") for c in ("text", "image", "id")}
    data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
    if args.cache_dir:
        data = dataclasses.replace(data, cache_dir=args.cache_dir)
    if args.on_error:
        data = dataclasses.replace(data, on_error=args.on_error)
    own = args.data is None or (run_dir is not None and _same_file(Path(args.data), Path(data.dataset)))
    if args.image_root is not None or not own:
        data = dataclasses.replace(data, image_root=args.image_root)
    return data, run_dir


def _split(args: argparse.Namespace, model: Any, with_labels: bool = False, build: bool = True,
           member: bool = False) -> Any:  # fmt: skip
    """(dataset, data cache) of what the command reads: the run's own data and split (default), or
    every row of `--data` (a `--split` of it uses the run's split.json or `--split-file`).

    `with_labels`: read and bind the model's label columns (eval); predict and embed need none, and
    keep rows that lack a caption or an image (the model predicts from the side that is there)."""
    import dataclasses
    import functools

    from .data import DataError, build_cache, load_dataset, read_split_file
    from .data.cache import SplitView
    from .data.dataset import LEGACY_IDS, legacy_spelled
    from .data.sources.registry import data_gone, source_name
    from .tasks import bind_labels
    from .training.feature_cache import build_features
    from .training.trainer import IN_MEMORY, cache_root, reader_kwargs

    data, run_dir = _run_data_config(args, model)
    if getattr(args, "label_column", None):
        model.config.tasks = _label_columns(model.config.tasks, args.label_column)
    if args.data is None and run_dir is None:
        raise ConfigError("--data is required when the checkpoint is not inside a run dir")
    source = args.data or data.dataset
    if str(source).startswith(IN_MEMORY):
        raise ConfigError(f"{args.checkpoint} was trained on an in-memory dataset ({source[len(IN_MEMORY):]}), "
                          "which it cannot read again: pass --data FILE with those rows (and --split NAME to use "
                          "the run's split.json on them)")  # fmt: skip
    split = args.split or ("all" if args.data else {"eval": "val", "embed": "all"}.get(args.command, "test"))
    gone = data_gone(source) if args.data is None else ""
    if gone:
        raise FileNotFoundError(f"{source}, the data {args.checkpoint} trained on, {gone}: if it moved, "
                                f"pass --data NEW_PATH --split {split} (the run's split.json names its rows; their content is "
                                "checked against the run's)")  # fmt: skip
    trained = data  # the policies training read the rows with
    kept = set(model.trained_without)  # the sides some of its training rows lacked
    if not with_labels or args.data is not None:  # a row without a caption or an image is predicted (and, in
        # another file, scored) from the side it has ...
        data = dataclasses.replace(data, missing_text="keep", missing_image="keep")

    def read(cfg: Any, labels: bool, on_error: str = "raise", only: Any = None) -> Any:
        kw = reader_kwargs(cfg, model.config.tasks, labels=labels, source=source)
        if kw and (args.data is not None or (not with_labels and trained.missing_image != "keep")):
            kw["missing_image_file"] = "error"  # ... but an image path that names no file is a mistake, not that
            # (in a new file always; in the run's own rows unless training read such rows as imageless)
        if kw and only is not None:
            kw["only_ids"] = only  # a split is read alone: a broken row of another split is not its problem
        if kw and with_labels:  # eval scores the tasks whose label column the file has (bind_labels names the rest)
            kw["label_columns"] = None
        if kw and args.command == "embed" and on_error == "skip":  # a row with neither side: a NaN vector in its
            kw["keep_empty"] = True  # place (fusionkit.embed's rule), so rows and ids stay those of the file
        if kw and args.command in ("predict", "eval") and not model.config.fusion.modality_dropout:
            # a renamed column must not turn into predictions from one side, which this model never learned
            kw["required_sides"] = tuple(s for s, n in (("text", "caption"), ("image", "image"))
                                         if n in model.sides_read and n not in kept)  # fmt: skip
        return bind_labels(load_dataset(source, **kw), model.config.tasks, require_columns=with_labels and "any",
                           on_error=on_error)[0]  # fmt: skip

    read_pool = None  # reads every row the split file names, to find training's cache of them all
    own = None  # --data with splits of its own (a DatasetDict, MVSA's folder): --split names one of them
    if split != "all" and args.data is not None and not args.split_file and source_name(source) not in (None, "table"):
        whole = read(data, with_labels, data.on_error)
        if whole.splits and split in whole.splits:
            own = whole.subset([i for i in whole.splits[split] if i in set(whole.ids)], name=f"{whole.name}[{split}]")
            log.info("%s: its own %s split (%d rows), not the run's split.json", source, split, len(own))
    if split == "all":
        ds = read(data, with_labels, data.on_error)
    elif own is not None:
        ds = own
    else:
        split_file = Path(args.split_file) if args.split_file else (run_dir / "split.json" if run_dir else None)
        if args.split_file and not split_file.is_file():
            raise ConfigError(f"--split-file {split_file} " + ("is a directory" if split_file.is_dir() else "does not "
                              "exist") + "; give the split JSON (a run's split.json), or --split all for every row")  # fmt: skip
        if split_file is None or not split_file.is_file():
            raise ConfigError(f"--split {split} needs the run's split.json or --split-file; use --split all for every row")
        ids = read_split_file(split_file)
        if split not in ids:
            raise ConfigError(f"unknown split {split!r}; use train, val, test or all")
        ds = read(data, with_labels, data.on_error, only=ids[split])
        read_ids = set(ds.ids)
        lost = [i for i in ids[split] if i not in read_ids]
        # its own split (not --split-file's) is checked below against what the run recorded of its rows
        checked = args.split_file is None and run_dir is not None and not member
        if lost:
            skipped = " or were skipped as unreadable (see the report above)" if data.on_error == "skip" else ""
            problem = (f"{len(lost)} of the {len(ids[split])} rows its {split} split names are missing from "
                       f"{source}{skipped} (e.g. {lost[:3]})")  # fmt: skip
            if one_based := _one_based(ids):
                raise DataError(problem, source=str(split_file), hint=one_based)
            if legacy_spelled(lost):  # ids of numbers: perhaps 0.2's spelling of the file's "007.0"
                problem += f"; if {source} writes them with '.0' (007.0, +5.0): {LEGACY_IDS}"
            if checked and split in _recorded(run_dir).get("splits", {}) and (with_labels or _named_by_position(ids[split])):
                # the run recorded its held-out rows as a whole: the rest cannot be told from edited rows
                raise DataError(
                    f"{problem}: the run's record of its {split} split covers all {len(ids[split])} rows, so it "
                    "is scored whole or not at all",
                    source=str(split_file),
                    hint=f"restore the missing rows in {source}, or score the rows that are there: --data {source} "
                    f"--split all (every row of it), or --split-file FILE (a copy of {split_file.name} without "
                    "the missing ids)",
                )
            if data.on_error != "skip":
                raise DataError(problem, source=str(split_file), hint=f"restore them in {source}, skip them "
                                "(--on-error skip), or score the data as it is now: --data FILE --split all")  # fmt: skip
            log.warning("%s: %s; they are left out", split_file, problem)  # `problem` names the skipped rows
        ds = ds.subset([i for i in ids[split] if i in read_ids], name=f"{ds.name}[{split}]")
        named = [i for k in ids for i in ids[k]]
        if with_labels or args.data is None:  # training cached its rows as it read them: labels bound, its policies
            cfg, on_error = (data, data.on_error) if with_labels else (trained, trained.on_error)
            read_pool = functools.partial(read, cfg, True, on_error, named)
        else:
            read_pool = functools.partial(read, data, False, data.on_error, named)
        if checked:
            # its own split (of its own file, or of --data: a moved copy must hold the rows it held out, not
            # edited ones); once, for the first model: another member binds the labels to its own class order.
            # predict reads no labels: the split is read again with them, as training fingerprinted it
            held = ds if with_labels else None
            if held is None:
                with contextlib.suppress(DataError, ConfigError), _quiet_data():  # label columns gone: nothing
                    labelled = read(trained, True, trained.on_error, ids[split])  # to compare with
                    held = labelled.subset([i for i in ids[split] if i in set(labelled.ids)])
            try:
                if held is not None:
                    _check_same_rows(run_dir, split, held, source)
            except DataError as e:  # predict of rows named by an id: an edited label changes no prediction
                if with_labels or _named_by_position(held.ids):  # rows named by position: other rows
                    raise
                log.warning("%s", e)
        if len(ds) == 0:
            raise ConfigError(f"the {split} split of {split_file} is empty: pass --split with another one, or "
                              "--data FILE (every row of it, or --split of it)")  # fmt: skip
    if len(ds) == 0:  # every row skipped as unreadable: an empty output would look like success
        raise DataError(f"no readable rows left in {source} to {args.command} (see the skipped-rows report above)",
                        hint="fix the rows the report names, e.g. the file's encoding or its columns")  # fmt: skip
    if args.command in ("predict", "eval", "embed"):  # eval scores rows as predict predicts them: the same checks
        no_text, no_image = sum(ex.text is None for ex in ds), sum(ex.image is None for ex in ds)
        absent = {"caption": no_text, "image": no_image}
        if args.command != "embed" and ds and all(absent[side] == len(ds) for side in model.sides_read):
            raise ConfigError(f"none of the {len(ds)} rows of {source} has {' or '.join(('an ' if s == 'image' else 'a ') + s for s in model.sides_read)}, the "
                              f"only input of this {model.config.fusion.strategy} model: every prediction would be "
                              "the same")  # fmt: skip
        if args.command == "embed" and args.modality is None:  # a whole side absent: embed writes the other
            no_text, no_image = (0 if n == len(ds) else n for n in (no_text, no_image))  # side's vectors (no guess)
        if args.command == "embed" and args.modality in ("text", "image"):  # one side's own vectors: no fusion
            side, absent = ("caption", no_text) if args.modality == "text" else ("image", no_image)
            if absent:
                log.warning("%d of %d rows of %s have no %s: their %s vectors are NaN", absent, len(ds), source,
                            side, args.modality)  # fmt: skip
        else:
            model.warn_one_sided(no_text, no_image, len(ds), source, trained_without=kept, said=vars(args).setdefault(
                "said", set()))  # an ensemble's members read the same rows: a warning once, not once per member
    labelled = [t.name for t in model.config.tasks if t.name in model.tasks and model.tasks[t.name].needs_labels]
    if args.command == "eval" and labelled and not any(ex.labels.get(t) is not None for ex in ds for t in labelled):
        raise ConfigError(f"no labelled rows to score in {split!r} ({len(ds)} rows, none with a label for tasks "
                          f"{labelled}); `fusionkit predict` writes their predictions")  # before any encoder runs  # fmt: skip
    args.split = split
    if not build:
        return ds, None
    pool, root, prefix = None, Path(cache_root(data)), ds.name.rpartition("[")[0].replace("/", "_") + "-"
    if read_pool is not None and root.is_dir() and any(p.name.startswith(prefix) for p in root.iterdir()):
        # a cache of this table exists (else skip reading and hashing every row to look one up)
        with contextlib.suppress(DataError, ConfigError), _quiet_data():  # a broken row elsewhere costs the
            pool = read_pool()  # lookup, not the split
    cache = functools.partial(build_cache, tokenizer=model.tokenizer, image_preprocess=model.image_preprocess,
                              cache_dir=cache_root(data), max_length=model.config.text.max_length,
                              on_error=data.on_error, progress=_progress(args))  # fmt: skip
    with _quiet_data():
        whole = None if pool is None else cache(pool, only_if_built=True)
    covered = whole is not None and set(ds.ids) <= {*whole.ids, *(row["item"] for row in whole.skipped)}
    if covered and (not args.ensemble or model.feature_splits is None or build_features(
            model, whole, whole.path.parent, only_if_built=True) is not None):  # fmt: skip
        # the split as a view of what training cached; an ensemble member with frozen encoders reads its
        # features from the stores its training built, else (below) its encoders run on this split alone
        cached = SplitView(whole, ds.ids, ds.fingerprint)
    else:
        cached = cache(ds)
    if len(cached) == 0:  # every row's image failed to decode: an empty output would look like success
        raise DataError(f"no readable rows left in {source} to {args.command}: every row was skipped when its "
                        "image was decoded (see the skipped-rows report above)", hint="fix or replace the "
                        "image files the report names")  # fmt: skip
    return ds, cached


def _quiet_data() -> Any:
    """Reads besides the scored rows' (training's cache of every split, labels to check a split against the run,
    another ensemble member's): their warnings (other splits' rows, other counts) are not about what the command
    scores; errors still show."""
    from .tasks.base import quiet

    return quiet("fusionkit.data", "fusionkit.tasks")


def _label_columns(tasks: list[Any], specs: list[str]) -> list[Any]:
    """`--label-column [TASK=]COLUMN`: read a task's labels from another column (TASK may be left out when
    the model has one labelled task)."""
    import dataclasses

    from .tasks import create_task

    labelled = [t.name for t in tasks if create_task(t).needs_labels]
    columns = {}
    for spec in specs:
        task, _, column = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if not task and len(labelled) != 1:
            raise ConfigError(f"--label-column {spec}: name the task, one of {labelled} (TASK=COLUMN)")
        task = task or labelled[0]
        if task not in labelled:
            raise ConfigError(f"--label-column {spec}: the model has no labelled task {task!r}; its tasks are {labelled}")
        columns[task] = column
    return [dataclasses.replace(t, column=columns[t.name]) if t.name in columns else t for t in tasks]


def _one_based(ids: dict[str, list[str]]) -> str:
    """A hint when a split's ids look like row numbers counted from 1: fusionkit 0.1 numbered the rows of a file
    without an id column so (they count from 0 since 0.2), and each such id now names the next row."""
    named = [i for k in ids for i in ids[k]]
    if not named or not all(i.isdecimal() for i in named) or min(map(int, named)) != 1:
        return ""
    return ("its ids look like row numbers counted from 1, as fusionkit 0.1 numbered the rows of a file without an id "
            "column (they count from 0 since 0.2: each id names the next row); if so, subtract 1 from each id in a "
            "copy of the split file and pass it with --split-file")  # fmt: skip


def _named_by_position(ids: Sequence[str]) -> bool:
    """Whether ids may be row numbers (a file without an id column): a row gone or moved renames the others."""
    return all(i.isdigit() for i in ids)


def _recorded(run_dir: Path) -> dict[str, Any]:
    """The run's data_fingerprint.json (what its splits held when it trained); {} for a run without one."""
    path = run_dir / "data_fingerprint.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_same_rows(run_dir: Path, split: str, ds: Any, source: Any) -> None:
    """Scoring a run's own split must score the rows it held out: refuse if their content changed since."""
    from .data import DataError, read_split_file
    from .training.rundir import same_split, written_by

    recorded = _recorded(run_dir)
    saved = recorded.get("splits", {}).get(split)
    if saved is None or same_split(recorded, split, ds):  # by the scheme it was recorded with (an older fusionkit's)
        return
    raise DataError(
        f"the {split} split of {run_dir} (trained by {written_by(recorded, run_dir)}; {saved.get('n')} rows when it trained, "
        f"{len(ds)} now) changed content "
        "(a caption, an image or a label was edited, or, in a file without an id column, rows moved: rows are "
        "then named by their position): these are not the rows the run held out",
        source=str(source),
        hint=_one_based(read_split_file(run_dir / "split.json")) or f"restore the data the run trained on, or score "
        f"the file as it is now: --data {source} --split all (every row), or --split-file FILE (a split of its rows "
        "of your own)",
    )


def _inference(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from .models import FusionModel
    from .models.fusion_model import align_classes
    from .precision import inference_precision
    from .training.inference import inference_loader, resolve_device, run_inference

    results, first = [], None
    members = _ensemble_members(args)
    amp = inference_precision(args.precision, resolve_device(args.device), "--precision").dtype  # training's choice
    configs = {c: FusionModel.read_config(c).tasks for c in members}
    schemas = {c: {t.name: t.class_names or [] for t in tasks} for c, tasks in configs.items()}
    for checkpoint in members[1:]:  # before any model or data is read; classes are matched by name, in any order
        if {k: sorted(v) for k, v in schemas[checkpoint].items()} != {k: sorted(v) for k, v in schemas[args.checkpoint].items()}:
            raise ConfigError(f"--ensemble: {checkpoint} has other tasks or classes than {args.checkpoint} "
                              f"({schemas[checkpoint]} vs {schemas[args.checkpoint]}); ensemble models of one task set")  # fmt: skip
        first_params = {t.name: t.params.get("threshold") for t in configs[args.checkpoint] if t.type == "multilabel"}
        for t in configs[checkpoint]:
            if t.type == "multilabel" and t.params.get("threshold") != first_params.get(t.name):
                log.warning("--ensemble: task %s of %s has threshold %s, %s has %s: the averaged probabilities are "
                            "decided at %s's (the first model's)", t.name, checkpoint, t.params.get("threshold", 0.5),
                            args.checkpoint, first_params.get(t.name) or 0.5, args.checkpoint)  # fmt: skip
    for i, checkpoint in enumerate(members):
        model = FusionModel.from_pretrained(checkpoint, map_location=resolve_device(args.device))
        first = first or model
        with _quiet_data() if i else contextlib.nullcontext():  # another member reads the same rows: said once
            ds, data = _split(args, model, with_labels=args.command == "eval", member=i > 0)
        if i == 0 and args.split not in ("all", "train"):  # the train split: fit on rows it trained on, as asked
            for member in dict.fromkeys(members):  # every member, before any of them runs
                _check_unseen(member, ds.ids, args.split, args.checkpoint, ensemble=len(members) > 1,
                              scoring=args.command == "eval")  # fmt: skip
        if len(members) > 1 and model.feature_splits is not None:
            loader, transform = _feature_loader(model, data, args.batch_size, _progress(args)), None
        else:
            loader, transform = inference_loader(model, data, args.batch_size)
        result = run_inference(model, loader, transform, amp, desc=args.split, progress=_progress(args))
        align_classes(model, first, result["outputs"])  # classes matched by name: columns in the first's order
        results.append(result)
    assert first is not None
    result = results[0]
    if len(results) > 1:  # one prediction from several models: each task averages its outputs
        result["outputs"] = {name: task.combine([r["outputs"][name] for r in results])
                             for name, task in first.tasks.items()}  # fmt: skip
        result["loss"] = None  # each model's loss is its own; the ensemble has none
    return first, result


def _feature_loader(model: Any, data: Any, batch_size: int, progress: bool = True) -> Any:
    """An ensemble member with frozen encoders (or frozen bottoms) reads their outputs from the feature cache,
    keyed by the encoders' weights: members that share encoders (seeds of a frozen recipe) run them once,
    and the stores a training run built for the same rows are reused, as its own evaluation read them."""
    import torch

    from .data.cache import SplitView
    from .training.feature_cache import FeatureCollator, build_features

    if isinstance(data, SplitView):  # of training's cache of all splits, whose features `_split` found built
        features: Any = SplitView(build_features(model, data.base, data.base.path.parent, batch_size, progress),
                                  data.ids, data.fingerprint)  # fmt: skip
    else:
        features = build_features(model, data, data.path.parent, batch_size, progress)
    collate = FeatureCollator(list(model.tasks.values()))
    return torch.utils.data.DataLoader(features, batch_size=batch_size, collate_fn=collate)


def _eval(args: argparse.Namespace) -> int:
    from .training.metrics import evaluation_metrics, scores_by_sides
    from .training.report import json_text

    model, result = _inference(args)
    flat, details = evaluation_metrics(model.tasks, result, args.split)
    sides = scores_by_sides(model.tasks, result)
    if sides:  # rows without a caption or an image: scored apart too (details.by_sides)
        details["by_sides"] = sides
    if not details and not any(k.count("/") >= 2 for k in flat):  # a task's metric: "all/rating/mae"
        raise ConfigError(f"no labelled rows to score in {args.split!r} ({len(result['ids'])} rows, none with a "
                          f"label for tasks {list(model.tasks)}); `fusionkit predict` writes their predictions")  # fmt: skip
    text = json_text({**flat, "details": details}, indent=2, ensure_ascii=False)  # a NaN loss: null, as summary.json
    print(text)
    print(_scored_rows(model.tasks, result, args.split, sides), file=sys.stderr)  # stdout stays the JSON (for jq)
    if args.output:
        with _replacing(Path(args.output)) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return 0


def _scored_rows(tasks: Mapping[str, Any], result: Mapping[str, Any], split: str,
                 sides: Mapping[str, Any]) -> str:  # fmt: skip
    """What eval scored: the rows read, per task how many had a label (rows without one are left out), and the
    rows of each side group where some lack a caption or an image (`scores_by_sides`)."""
    from .training.metrics import SIDE_GROUPS

    total = len(result["ids"])
    counts = []
    for name in tasks:
        mask = result["label_mask"].get(name)
        if mask is not None:
            labelled = int(mask.sum())
            counts.append(f"{name} {labelled}" + (f" ({total - labelled} without a label left out)"
                                                  if labelled < total else ""))  # fmt: skip
    rows = {group: sides.get(group, {}).get("rows", 0) for group in SIDE_GROUPS}
    said = (f" ({rows['caption and image']} with caption and image, {rows['caption only']} caption only, "
            f"{rows['image only']} image only: details.by_sides scores each)" if sides else "")  # fmt: skip
    return f"scored {total} rows of the {split!r} split{said}: " + ", ".join(counts)


def _predict(args: argparse.Namespace) -> int:
    from .training.metrics import prediction_rows
    from .training.report import write_predictions

    if args.text is not None or args.image is not None:
        if args.data or args.output:
            raise ConfigError("--text/--image predict one pair; --data/--output predict a file: not both")
        from .data.image import load_image
        from .models import FusionModel
        from .training.inference import resolve_device

        image = args.image  # a relative path is read from --image-root when given, as a --data file's are
        if image is not None and not image.strip():  # `--image ""`: no image, as `--text ""` is no caption
            image = None
        if image is not None and args.image_root is not None and not Path(image).expanduser().is_absolute():
            image = str(Path(args.image_root) / image)
        if image is not None:  # a missing or unreadable file is said first: not after a warning of a missing side
            load_image(image)
        device = resolve_device(args.device)
        model, *others = [FusionModel.from_pretrained(c, map_location=device) for c in _ensemble_members(args)]
        [row] = model.predict(texts=[args.text], images=[image], ensemble=others, precision=args.precision,
                              where="--text/--image")  # fmt: skip
        print(json.dumps(row, indent=2, ensure_ascii=False))
        return 0
    if not args.output:
        raise ConfigError("predict needs --output FILE (.csv/.jsonl/.parquet), or --text/--image for one pair")
    model, result = _inference(args)
    path = Path(args.output)
    with _replacing(path) as tmp:
        # the run's own split: its rows' labels beside the predictions, as the run's predictions_<split>.csv has them
        write_predictions(tmp, prediction_rows(model.tasks, result, true=args.data is None))
    print(f"wrote {len(result['ids'])} predictions to {path}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .embedding import default_modality, embed
    from .models import FusionModel
    from .training.inference import resolve_device

    if not _sharded_embed(args) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("under torchrun / accelerate launch, give --output DIR/ to write one set of shards")
    model = FusionModel.from_pretrained(args.checkpoint, map_location=resolve_device(args.device))
    ds, _ = _split(args, model, build=False)  # embed streams the raw pairs itself
    on_error = _run_data_config(args)[0].on_error
    if args.modality is None:  # a whole side absent: the other side's vectors, as `fusionkit.embed` gives them
        args.modality = default_modality(ds)
        if args.modality != "joint":
            log.warning("no row of the data has %s: writing %s vectors (--modality joint for joint vectors with "
                        "that side missing)", "an image" if args.modality == "text" else "a caption", args.modality)  # fmt: skip
    if _sharded_embed(args):
        from .embed_shards import embed_to_shards

        manifest = embed_to_shards(model, ds, args.output, shard_size=args.shard_size or 10_000,
                                   batch_size=args.batch_size, modality=args.modality, precision=args.precision,
                                   on_error=on_error, progress=_progress(args),
                                   source=f"{Path(args.data or args.checkpoint).resolve()} split={args.split}")  # fmt: skip
        if os.environ.get("RANK", "0") == "0":  # one line for the whole launch
            print(f"{manifest['rows']} vectors in {len(manifest['shards'])} shards in {args.output}")
        return 0
    texts = (ex.text for ex in ds) if args.modality != "image" else None
    images = (ex.image for ex in ds) if args.modality != "text" else None
    vectors = embed(model, texts, images, batch_size=args.batch_size, precision=args.precision, ids=ds.ids,
                    on_error=on_error, progress=_progress(args))[0]  # fmt: skip
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with _replacing(out) as tmp:
            pq.write_table(pa.table({"id": ds.ids, "embedding": list(vectors)}), tmp)
    else:
        from .training.report import backup_number

        ids = out.with_suffix(".ids.json")
        number = backup_number(out, ids)  # vec.npy.~N~ and its ids, vec.ids.json.~N~
        with _replacing(out, number) as tmp, _replacing(ids, number, what=f"{out.name} and {ids.name}") as ids_tmp:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name ending ".NPY"
                np.save(f, vectors)
            ids_tmp.write_text(json.dumps(ds.ids, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {out}")
    return 0


OUTPUT_SUFFIXES = {"eval": (".json",), "predict": (".csv", ".jsonl", ".parquet"), "embed": (".npy", ".parquet")}


@contextlib.contextmanager
def _replacing(path: Path, backup: int | None = None, what: str | None = None) -> Any:
    """A temp file beside `path`, renamed over it once written: another name for the same file (a hard link
    to a model's weights, a symlink to an image) keeps its bytes, and a failed write leaves no half file.
    A file already there is kept as `path.~N~` (`backup`: that N, shared with a companion file)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    for stale in path.parent.glob(f".{glob.escape(path.stem)}.tmp-*{glob.escape(path.suffix)}"):
        pid = stale.name[len(path.stem) + 6 : len(stale.name) - len(path.suffix)]
        if pid.isdigit() and not _alive(int(pid)):  # left by a writer that was killed (SIGKILL skips `finally`)
            stale.unlink(missing_ok=True)
    try:
        try:
            yield tmp
        except Exception as e:
            from .store import no_room

            full = no_room(e, path.parent, what or path.name)
            if full is None:
                raise
            raise full from e
        from .training.report import keep_previous

        keep_previous(path, backup)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _sharded_embed(args: argparse.Namespace) -> bool:
    """`fusionkit embed --output DIR/` (or --shard-size): a resumable directory of Parquet shards."""
    out = args.output
    return args.command == "embed" and (args.shard_size is not None or out.endswith(("/", os.sep)) or Path(out).is_dir())


def _check_output(args: argparse.Namespace) -> None:
    """Before any work: refuse an `--output` that would overwrite an input (the data, the model, a run's
    own results) or be written under another name than the one given; create its folder."""
    if not getattr(args, "output", None):
        return
    out = Path(args.output).expanduser()
    sharded = _sharded_embed(args)
    allowed = None if sharded else OUTPUT_SUFFIXES.get(args.command)
    if allowed and out.suffix.lower() not in allowed:
        raise ConfigError(f"--output {out}: {args.command} writes {' or '.join(allowed)} files; "
                          f"name the output e.g. {out.with_suffix(allowed[0]).name}")  # fmt: skip
    if out.is_dir() and not sharded:
        raise ConfigError(f"--output {out} is a directory; give a file name")
    if sharded and not out.is_dir() and out.suffix.lower() in OUTPUT_SUFFIXES["embed"]:
        raise ConfigError(f"--output {out}: --shard-size writes a folder of Parquet shards; name a folder "
                          f"({out.with_suffix('')}/), or leave out --shard-size for one {out.suffix} file")  # fmt: skip
    if sharded and (out / "config.json").is_file():
        raise ConfigError(f"--output {out} is a run or model folder; write the shards to a folder of their own")
    from .store import is_built

    data, run_dir = _run_data_config(args)
    # the file read now, and the run's own training data (it is needed again to evaluate the run)
    inputs = [Path(p).expanduser() for p in dict.fromkeys((args.data, data.dataset, getattr(args, "split_file", None))) if p]
    if run_dir is None:  # a bare model dir; runs' files (this run's or another's) are covered by _owner
        inputs.append(Path(args.checkpoint).expanduser())
    written = [out] + ([out.with_suffix(".ids.json")] if args.command == "embed" and out.suffix.lower() == ".npy" else [])
    for target in written:
        for src in inputs:
            if src.exists() and (_same_file(target, src) or (src.is_dir() and _inside(target, src))):
                raise ConfigError(f"--output {out} would overwrite the input {src}; write somewhere else")
        store = next((p for p in target.resolve().parents if is_built(p)), None)  # a cache entry (data, features)
        if store is not None:  # a cache file replaced would break every later run on that data
            raise ConfigError(f"--output {out} is inside the cache folder {store}; write somewhere else")
        owner = _owner(target)
        if owner is not None:
            kind, folder = ("run", "run dir") if (owner / "split.json").is_file() else ("model", "model folder")
            where = (f"would overwrite a file of the {kind} in {owner}" if target.exists() else
                     f"is inside the {folder} {owner} (its files are the {kind}'s own)")  # fmt: skip
            raise ConfigError(f"--output {out} {where}; write somewhere else (a new file beside a run's own "
                              "files is fine)")  # fmt: skip
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the folder of --output {out}: {e.strerror or e}") from e
    if not os.access(out.parent, os.W_OK):
        raise OSError(f"cannot write --output {out}: its folder {out.parent} is not writable")


def _check_columns_named(args: argparse.Namespace) -> None:
    """Before the model loads (seconds with real encoders): a column named on the command line that the
    header of a CSV/TSV or Parquet file lacks is a typo. Other sources are checked as they are read."""
    if args.command == "predict" and (args.text is not None or args.image is not None):
        return  # one pair, no file
    given = {f"--{c}-column {getattr(args, f'{c}_column')}": getattr(args, f"{c}_column") for c in ("text", "image", "id")}
    given.update({f"--label-column {spec}": spec.rpartition("=")[2] for spec in getattr(args, "label_column", [])})
    given = {option: column for option, column in given.items() if column}  # "": the file has no such column
    if not given:
        return
    source = args.data or _run_data_config(args)[0].dataset
    columns = _table_header(Path(source))
    for option, column in given.items():
        if columns is not None and column not in columns:
            raise ConfigError(f"{option}: {source} has no column {column!r}; its columns are {columns}")


def _table_header(path: Path) -> list[str] | None:
    """The column names of a CSV, TSV or Parquet file; None where they cannot be read cheaply (the reader
    then says what is wrong)."""
    import csv

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), None)
            return None if header is None else [h.strip() for h in header]
    except (OSError, ValueError, csv.Error):  # unreadable, not UTF-8, not Parquet (ArrowInvalid is a ValueError)
        return None
    return None


def _owner(target: Path) -> Path | None:
    """The run dir (any run's, not only the one read) that wrote or will write `target`, or the saved model
    folder it lies in; None if it is nobody's file."""
    from .models.fusion_model import is_model_folder
    from .training.rundir import RunDir

    for path in dict.fromkeys((Path(os.path.abspath(target)), target.resolve())):  # and where a symlink leads
        for d in path.parents:
            if is_model_folder(d) or ((d / "split.json").is_file() and (d / "config.json").is_file()
                                      and RunDir(d).owns(path)):  # fmt: skip
                return d
    return None


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _export(args: argparse.Namespace) -> int:
    from .export import PARTS, check_export_dir, export_onnx, missing_export_packages
    from .models import FusionModel

    if missing_export_packages():
        raise ConfigError(f"export needs {missing_export_packages()}: pip install 'fusionkit[export]'")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    out, ckpt = Path(args.output).expanduser().resolve(), Path(args.checkpoint).expanduser().resolve()
    if ckpt.exists() and (out == ckpt or ckpt in out.parents or out in ckpt.parents):
        raise ConfigError(f"--output {args.output} overlaps the model at {args.checkpoint}; write somewhere else")
    check_export_dir(out)  # before the model loads
    model = FusionModel.from_pretrained(args.checkpoint)
    if "model" in parts and not any(t.needs_labels for t in model.tasks.values()):
        if args.parts != EXPORT_PARTS:  # asked for by name: say why it cannot be
            raise ConfigError(f"{args.checkpoint} has no labelled task, so no logits to export: drop 'model' from "
                              "--parts (its encode parts export)")  # fmt: skip
        parts = [p for p in parts if p != "model"]  # e.g. an `align` run: its vectors are what it is for
        log.info("no labelled task: exporting %s only", ", ".join(parts))
    report = export_onnx(model, out, parts=parts, int8=args.int8)
    for kinds in report["parts"].values():
        for kind, entry in kinds.items():
            d = entry["parity"]
            print(f"{out / entry['file']}: max |diff| vs PyTorch {d['max_abs_diff']:.2e}, "
                  f"min cosine {d['min_cosine']:.5f} ({kind})")  # fmt: skip
    return 0


# the options that name a file or folder (a quoted "~/p.csv" reaches us unexpanded by the shell)
PATH_ARGS = ("checkpoint", "ensemble", "data", "split_file", "cache_dir", "output", "output_dir", "space", "image",
             "resume")  # fmt: skip


def _expand_home(args: argparse.Namespace) -> None:
    """`~` in a path option is the home folder, as in the config's path keys (`build_config`): never a folder
    named `~` created in the working directory."""
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) for v in value])
        elif isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fusionkit` command; returns the exit status."""
    from .tasks.base import new_warning_scope

    # fusionkit says what it does at INFO; other libraries only warn (onnx's export passes log hundreds of lines).
    # Called in-process (a notebook, tests), the caller's logging is put back when the command ends.
    root, ours = logging.getLogger(), logging.getLogger("fusionkit")
    handlers, level = list(root.handlers), ours.level
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
    new_warning_scope()  # each command says its warnings, whatever an earlier one in this process said
    try:
        return _command(argv)
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        ours.setLevel(level)


def _command(argv: list[str] | None) -> int:
    from .data import DataError
    from .training.trainer import NonFiniteLossError, TrainingInterrupted

    args, extra = _parser().parse_known_args(argv)
    _expand_home(args)
    try:
        if args.command == "train":
            return _train(args, extra)
        if args.command == "tune":
            return _tune(args, extra)
        if args.command == "align":
            return _align(args, extra)
        if extra:
            from .config import close_key

            spelled = {o[2:].replace("-", "_"): o for o in args.options}
            guess = next((close for x in extra if x.startswith("--")
                          if (close := close_key(x[2:].partition("=")[0], spelled))), None)  # fmt: skip
            raise ConfigError(f"unexpected arguments {extra}" + (f"; did you mean {spelled[guess]}?" if guess else ""))
        if args.command == "export":
            return _export(args)
        _check_output(args)
        _check_columns_named(args)
        return {"eval": _eval, "predict": _predict, "embed": _embed}[args.command](args)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except (ConfigError, DataError, NonFiniteLossError, FileNotFoundError, OSError, ValueError) as e:
        print(f"fusionkit {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":  # `python -m fusionkit.cli ...` (what some launchers are given) is the command too
    sys.exit(main())
