"""`TrainConfig`: everything a training run needs, as nested dataclasses on top of `fusionkit.config`.

A run is fully described by its resolved `TrainConfig` (saved as `config.yaml` in the run dir), so
`fusionkit train <run>/config.yaml` reproduces it. Files and CLI overrides go through the same strict
`merge`, so a typo fails before any data is read.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    MISSING_POLICIES,
    TIMM_LOCAL_DIR,
    ConfigError,
    ModelConfig,
    check_seed,
    check_split,
    check_types,
    from_dict,
    load_config_file,
    merge,
    to_dict,
)
from ..data.sources.registry import is_spec
from ..models import get_config
from ..models.fusion import FUSION_REGISTRY, scores_pairs, sides_read
from ..precision import PRECISIONS
from .distributed import TRACKERS
from .rundir import NAME_EXISTS

log = logging.getLogger(__name__)

# dict-typed config fields: a nested mapping there is a value, not a section to merge into
_DICT_VALUES = ("config_overrides", "model_kwargs")


@dataclass
class DataConfig:
    dataset: str = "synthetic:2000"  # anything `fusionkit.data.load_dataset` accepts
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Seeds a new split; apart from run.seed so that the seeds of one recipe train on one split (an
    # ensemble of them is then scored on rows none of them saw) and reuse its caches.
    split_seed: int = 0
    split_file: str | None = None  # reuse this split (written there if missing); default <run>/split.json
    text_column: str = "text"  # table / HF dataset columns; task label columns are model.tasks[].column
    image_column: str = "image"
    id_column: str | None = "id"  # None or absent column: row numbers become ids
    # What relative image paths are relative to. Default: a table file's own folder; a DataFrame's or Hugging Face
    # dataset's, the working directory. Recorded by the run so that eval and predict find its images from anywhere
    # (another --data file's images are read from that file's folder, or --image-root).
    image_root: str | None = None
    missing_text: str = "error"  # empty caption: "error" | "skip" the row | "keep" it image-only
    missing_image: str = "error"  # no image / file not found: "error" | "skip" | "keep" it text-only
    cache_dir: str | None = None  # tokenized/resized cache; default $FUSIONKIT_CACHE or ~/.cache/fusionkit
    allow_new_rows: bool = False  # a reused split file missing some rows: error (default), or put them in train
    num_workers: int = 0
    num_proc: int = 1
    on_error: str = "raise"  # "raise" | "skip" bad items
    augment: bool = True  # train-time image augmentation (not applied with the feature cache)
    feature_cache: bool = True  # frozen encoders: train on cached encoder features
    # Train on batches of captions of similar length (HF Trainer's `group_by_length`): less padding, so
    # fewer text positions per step where the text side runs (fine-tuned or top_k text blocks, cross-attention)
    group_by_length: bool = False


@dataclass
class OptimConfig:
    epochs: int = 8  # the default run (tiny + synthetic) reaches 94-98% val accuracy across seeds
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 32  # global batch per forward pass (split across ranks under DDP)
    eval_batch_size: int = 128
    accumulation_steps: int = 1
    lr: float = 2e-3  # fusion + heads
    encoder_lr_scale: float = 0.1  # pretrained encoders train at lr * this
    # Layer-wise lr decay (BEiT, timm `layer_decay`): encoder block i (0-based) of L trains at
    # lr * encoder_lr_scale * layer_decay ** (L - 1 - i); None = one rate for the whole encoder
    layer_decay: float | None = None
    weight_decay: float = 0.01  # matrices only; biases, norms, embeddings' scales get none
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    # Evaluate, checkpoint and serve an exponential moving average of the weights (e.g. 0.999); None = off
    ema_decay: float | None = None


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str | None = None  # run dir = output_dir/name; default: a timestamp
    name_exists: str = "error"  # fresh run whose dir holds a run: "error" | "increment" (name-1, name-2, ...)
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    precision: str = "auto"  # auto: bf16 on GPUs and AMX / Arm BF16 CPUs, else fp32 (fusionkit.precision)
    checkpoint_every: int = 100  # optimizer steps between mid-epoch checkpoints; 0 = epoch ends only
    keep_checkpoints: int = 2  # besides the best one
    metric: str | None = None  # early-stopping metric, e.g. "val/sentiment/macro_f1"; default: first task's
    patience: int | None = None  # epochs without improvement before stopping; None = never stop early
    log_every: int = 10
    progress: bool = True
    plots: bool = True
    report_to: list[str] = field(default_factory=list)  # trackers via Accelerate: tensorboard, wandb, mlflow
    compile: bool = False  # torch.compile the training forward (dynamic shapes; pays off on long GPU runs)


# set by a TrainConfig on its model: the preset the model was built on, to tell a preset changed under it
_BUILT_ON = "_fusionkit_preset"


@dataclass
class TrainConfig:
    preset: str = "tiny"  # model preset: the base that `model`'s values were built on
    # None: the preset's model (`TrainConfig(preset="minilm-dinov2-small")`). A model given is taken whole, as
    # a file's complete `model:` section (a run's config.yaml) is, and must stay on this preset (see _check_preset)
    model: ModelConfig = None  # type: ignore[assignment]
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # a section as a plain dict reads as a file's section: `model` over the preset's model, the others whole
        if isinstance(self.model, Mapping):
            self.model = get_config(_check_preset_name(self.preset), **self.model)
        for name, section in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig), ("run", RunConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, from_dict(section, dict(value)))
            elif not isinstance(value, section) and value is not None:
                raise ConfigError(f"{name}: expected a {section.__name__} or a dict, got {type(value).__name__}")
        self._check_preset()

    def _check_preset(self) -> None:
        """The model is the preset's (None), or was built on it: a preset changed after its model was made
        (`dataclasses.replace(cfg, preset=...)`, `cfg.preset = ...`) would train the old preset's model under
        the new name, so it is refused, as is a model that another preset's config built. A model given that no
        TrainConfig built is taken as built on this preset (`get_config(...)`, a file's complete `model:`)."""
        _check_preset_name(self.preset)
        if self.model is None:
            self.model = get_config(self.preset)
        built_on = getattr(self.model, _BUILT_ON, self.preset)
        if built_on != self.preset:
            raise ConfigError(
                f"preset is {self.preset!r} but model was built on preset {built_on!r} (a dataclasses.replace or "
                f"assignment changed one of them): the {built_on!r} model would be trained under the name "
                f"{self.preset!r}. For the model of preset {self.preset!r}, give it too: dataclasses.replace(cfg, "
                f"preset={self.preset!r}, model=fusionkit.get_config({self.preset!r}, ...your model changes)); "
                f"to train this model, keep preset={built_on!r}"
            )
        setattr(self.model, _BUILT_ON, self.preset)

    def validate(self) -> TrainConfig:
        self._check_preset()
        check_types(self)  # a config built in code: the types a file's values are held to
        self.model.validate()
        check_split(self.data.split_ratios, self.data.split_seed)
        check_seed(self.run.seed, "run.seed")
        checks = [
            (self.run.precision in PRECISIONS, f"run.precision must be one of {PRECISIONS}"),
            (set(self.run.report_to) <= set(TRACKERS), f"run.report_to: use any of {TRACKERS}"),
            (self.data.on_error in ("raise", "skip"), "data.on_error must be 'raise' or 'skip'"),
            (self.data.missing_text in MISSING_POLICIES, f"data.missing_text must be one of {MISSING_POLICIES}"),
            (self.data.missing_image in MISSING_POLICIES, f"data.missing_image must be one of {MISSING_POLICIES}"),
            (
                self.optim.batch_size > 0 and self.optim.eval_batch_size > 0,
                f"optim.batch_size and optim.eval_batch_size must be positive, got {self.optim.batch_size} "
                f"and {self.optim.eval_batch_size}",
            ),
            (self.optim.accumulation_steps > 0, "optim.accumulation_steps must be positive"),
            (
                self.optim.ema_decay is None or 0 < self.optim.ema_decay < 1,
                f"optim.ema_decay must be in (0, 1) or null (no EMA), got {self.optim.ema_decay}",
            ),
            (
                self.optim.epochs > 0 or (self.optim.max_steps or 0) > 0,
                "optim.epochs or max_steps must be > 0",
            ),
            (0 <= self.optim.warmup_ratio < 1, "optim.warmup_ratio must be in [0, 1)"),
            (0 < self.optim.lr < 1e3, f"optim.lr must be in (0, 1000), got {self.optim.lr}"),
            (math.isfinite(self.optim.encoder_lr_scale), f"optim.encoder_lr_scale must be finite, got {self.optim.encoder_lr_scale}"),
            (math.isfinite(self.optim.weight_decay), f"optim.weight_decay must be finite, got {self.optim.weight_decay}"),
            (all(0 <= b < 1 for b in self.optim.betas), f"optim.betas must be in [0, 1), got {self.optim.betas}"),
            (0 < self.optim.eps < 1, f"optim.eps must be in (0, 1), got {self.optim.eps}"),
            (self.optim.encoder_lr_scale >= 0, f"optim.encoder_lr_scale must be >= 0, got {self.optim.encoder_lr_scale}"),
            (self.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.optim.weight_decay}"),
            (0 <= self.optim.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}"),
            (self.optim.grad_clip is None or self.optim.grad_clip >= 0,
             f"optim.grad_clip must be >= 0 or null (0 and null: no clipping), got {self.optim.grad_clip}"),
            (
                self.optim.layer_decay is None or 0 < self.optim.layer_decay <= 1,
                f"optim.layer_decay must be in (0, 1] or null (no decay), got {self.optim.layer_decay}",
            ),
            (self.optim.max_steps is None or self.optim.max_steps > 0, "optim.max_steps must be positive or null"),
            (self.optim.epochs >= 0, "optim.epochs must be >= 0"),
            (self.run.patience is None or self.run.patience > 0, "run.patience must be positive or null (never stop)"),
            (self.run.log_every > 0, "run.log_every must be positive"),
            (self.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0 = epoch ends only)"),
            (self.run.keep_checkpoints >= 1, "run.keep_checkpoints must be at least 1"),
            (self.run.name_exists in NAME_EXISTS, f"run.name_exists must be one of {NAME_EXISTS}"),
            (self.run.name is None or not _name_problem(self.run.name),
             f"run.name must be a plain folder name ({_name_problem(self.run.name or '')}), got {self.run.name!r}; "
             "leave it out for an automatic one"),
            (self.data.num_workers >= 0, "data.num_workers must be >= 0"),
            (self.data.num_proc >= 1, "data.num_proc must be at least 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


def _check_preset_name(preset: Any) -> str:
    if not isinstance(preset, str):
        raise ConfigError(f"preset: expected a preset name, got {preset!r}")
    return preset


def _name_problem(name: str) -> str:
    """Why `name` cannot be a run's folder ("" if it can): one that shells, `ls` or the file system trip over."""
    for bad, why in (
        (not name.strip(), "it is empty"),
        (name in (".", "..") or "/" in name or "\\" in name, "no / or .."),
        (any(c.isspace() and c != " " or not c.isprintable() for c in name), "no newline or control character"),
        (name != name.strip(), "no leading or trailing space"),
        (name.startswith("-"), "no leading '-': commands would read it as an option"),
        (len(name.encode()) > 255, "at most 255 bytes"),
    ):
        if bad:
            return why
    return ""


def unused_settings(cfg: TrainConfig) -> list[str]:
    """Settings this run will not read (said at start: a recipe moved to another freeze mode keeps them)."""
    out = []
    model, fusion = cfg.model, cfg.model.fusion
    if model.freeze == "encoders":
        for key, value, default in (("optim.layer_decay", cfg.optim.layer_decay, None),
                                    ("optim.encoder_lr_scale", cfg.optim.encoder_lr_scale, 0.1)):  # fmt: skip
            if value != default:
                out.append(f"{key}={value} has no effect: model.freeze is 'encoders', so no encoder block trains "
                           "(use freeze: top_k or none to train them)")  # fmt: skip
    if model.freeze != "top_k":
        for key, value in (("model.trainable_layers", model.trainable_layers),
                           ("model.text.trainable_layers", model.text.trainable_layers),
                           ("model.image.trainable_layers", model.image.trainable_layers)):  # fmt: skip
            if value:
                out.append(f"{key}={value} has no effect: it counts the blocks freeze: top_k trains, and "
                           f"model.freeze is {model.freeze!r}")  # fmt: skip
    image_k = model.trainable_layers if model.image.trainable_layers is None else model.image.trainable_layers
    if model.freeze == "top_k" and image_k and cfg.data.feature_cache and cfg.data.augment:
        out.append(f"data.augment has no effect: the top {image_k} image block(s) train on hidden states cached once "
                   "from the un-augmented images (data.feature_cache: false augments, at the cost of running the "
                   "whole image encoder every step)")  # fmt: skip
    strategy = FUSION_REGISTRY.get_class(fusion.strategy)  # a plugin's flags count as the built-ins' do
    sides = sides_read(strategy)
    if len(sides) == 1 and fusion.modality_dropout:
        out.append(f"model.fusion.modality_dropout={fusion.modality_dropout} has no effect on the {fusion.strategy} "
                   "baseline, which reads one side only")  # fmt: skip
    if "image" not in sides and fusion.image_grid:
        out.append(f"model.fusion.image_grid={fusion.image_grid} has no effect: {fusion.strategy} reads no image")
    if not scores_pairs(strategy):
        why = f"reads the {sides[0]} only" if len(sides) == 1 else "scores caption and image apart"
        out.extend(f"task {t.name!r} (itm) cannot be learned with model.fusion.strategy {fusion.strategy}, which "
                   f"{why}: it cannot tell a caption's own image from another's, so its accuracy stays at chance "
                   "(use a strategy that joins them, e.g. cross_attention or concat)"
                   for t in model.tasks if t.type == "itm")  # fmt: skip
    weighted = {t.name: t.weight for t in model.tasks if t.weight != 1.0}
    if model.loss_weighting == "uncertainty" and weighted:
        out.append(f"task weights {weighted} have no effect: model.loss_weighting is 'uncertainty', which learns "
                   "each task's weight (use loss_weighting: static to set them)")  # fmt: skip
    return out


def _flatten(data: dict[str, Any], base: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested file sections -> dotted keys, so `model: {fusion: {depth: 2}}` keeps the preset's other fields."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None and isinstance(base.get(key), dict) and key not in _DICT_VALUES:
            items = {}  # `optim:` with all its keys commented out: nothing set, the preset's values stay
        elif isinstance(value, dict) and isinstance(base.get(key), dict) and key not in _DICT_VALUES:
            items = _flatten(value, base[key], f"{prefix}{key}.")
        else:
            items = {f"{prefix}{key}": value}
        for dotted, v in items.items():  # `optim: {lr: 2e-3}` and `optim.lr: 1e-3`: one would be lost
            if dotted in out:
                raise ConfigError(f"{dotted} is given twice (nested and dotted: `{dotted.split('.')[0]}:` and "
                                  f"`{dotted}:`); keep one")  # fmt: skip
            out[dotted] = v
    return out


def build_config(
    source: str | Path | dict[str, Any] | TrainConfig | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A validated `TrainConfig` from a YAML/JSON file, a dict or a `TrainConfig`, then dotted `overrides`
    (CLI `--a.b v`)."""
    if isinstance(source, TrainConfig):  # as `train()` takes one: a copy, the caller's left as it was
        source = to_dict(source)
    data = load_config_file(source, number_text=True) if isinstance(source, str | Path) else dict(source or {})
    overrides = dict(overrides or {})
    preset = _check_preset_name(overrides.pop("preset", data.pop("preset", "tiny")))
    base = TrainConfig(preset=preset)  # the preset's model, which the file's `model:` keys override
    flat = _flatten(data, to_dict(base))
    # relative paths: a file's are relative to it; a dict's and the overrides' (command line) to the working
    # directory. All are stored absolute, so `fusionkit eval RUN` finds the data from any directory later.
    flat = resolve_paths(flat, Path(source).resolve().parent if isinstance(source, str | Path) else Path.cwd())
    flat.update(resolve_paths(_flatten(overrides, to_dict(base)), Path.cwd()))
    task_options = {k: flat.pop(k) for k in list(flat) if k.startswith(TASK_PREFIX)}  # once the tasks are known
    return set_options(merge(base, flat), task_options)


TASK_PREFIX = "model.tasks."  # `model.tasks.<task name>.<option>`: a key of one task in the tasks list


def set_options(cfg: TrainConfig, options: Mapping[str, Any]) -> TrainConfig:
    """`cfg` with dotted `options` set: plain keys (`optim.lr`), a task's option as
    `model.tasks.<name>.<option>`, a task type's own parameter as `model.tasks.<name>.params.<key>`
    (supcon's temperature, say). The command line and `fusionkit tune`'s search space both address tasks so."""
    if options.get("preset", cfg.preset) != cfg.preset:  # its complete model would win: the old model, renamed
        raise ConfigError(f"preset {options['preset']!r} cannot be set on a config whose model is built (on preset "
                          f"{cfg.preset!r}): it would train that model under the new name; give the preset where "
                          "the config starts (a config file's or build_config's `preset:`)")  # fmt: skip
    data = to_dict(cfg)
    plain: dict[str, Any] = {}
    for key, value in options.items():
        if not key.startswith(TASK_PREFIX):
            plain[key] = value
            continue
        rest = key[len(TASK_PREFIX) :]
        name, _, param = rest.partition(".params.")
        task = next((t for t in data["model"]["tasks"] if t["name"] == name), None)
        if param and task is not None:  # checked by the task type when the config validates
            task["params"] = {**task.get("params", {}), param: value}
            continue
        name, _, option = rest.rpartition(".")
        task = next((t for t in data["model"]["tasks"] if t["name"] == name), None)
        if task is None:
            names = [t["name"] for t in data["model"]["tasks"]]
            raise ConfigError(f"{key!r}: no task {name!r}; the tasks: {names}")
        if option not in task:
            close = difflib.get_close_matches(option, list(task), n=1)
            hint = f"did you mean {TASK_PREFIX}{name}.{close[0]}? " if close else ""
            raise ConfigError(f"{key!r}: task {name!r} has no option {option!r}; {hint}its options: {sorted(task)}")
        task[option] = value
    return merge(from_dict(TrainConfig, data), plain)


IN_MEMORY = "in-memory:"  # data.dataset of a run trained on a DataFrame / Dataset passed in Python: not a path
# Keys whose relative paths in a config file mean "relative to that file" (outputs stay cwd-relative; `~` is
# expanded in them all).
PATH_KEYS = ("data.dataset", "data.split_file", "data.cache_dir", "data.image_root", "model.text.name", "model.image.name",
             "model.image.checkpoint_path")  # fmt: skip


def resolve_paths(flat: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths resolve against `base` (a config file's folder, or the working directory for a dict
    and the command line), so a config runs, and a run is evaluated, from any directory.

    Encoder names resolve only where that folder exists (else they are hub ids such as
    `facebook/dinov2-small`). A data path or encoder folder that exists only relative to the working directory
    (configs written before this rule) is stored as that absolute path, with a warning: a relative one would
    break later commands run from elsewhere, or (an encoder) read another folder of that name there. A dataset
    that a registered source reads as written (`synthetic:N`, a plugin's `mydb:tweets`) is no path: kept as is.
    """
    out = dict(flat)
    for key in (*PATH_KEYS, "run.output_dir"):  # `~` is the home folder in every path, outputs too: never a
        value = out.get(key)  # folder named `~` in the working directory, nor stored as `~/...` in config.yaml
        if isinstance(value, str) and value.startswith("~"):
            out[key] = os.path.expanduser(value)
    for key in PATH_KEYS:
        value = out.get(key)
        if key == "model.image.name" and isinstance(value, str) and value.startswith(TIMM_LOCAL_DIR):
            # timm's `local-dir:FOLDER`: the folder is a path like any other (a config file's relative to it)
            out[key] = TIMM_LOCAL_DIR + resolve_paths({key: value.removeprefix(TIMM_LOCAL_DIR)}, base)[key]
            continue
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        if value.startswith(("~", IN_MEMORY)) or (key == "data.dataset" and is_spec(value, base)):
            continue  # "synthetic:N" or a spec of the user's own source: kept as written
        candidate = Path(os.path.normpath(base / value))
        if candidate.exists():
            out[key] = str(candidate)
        elif Path(value).exists() and (not key.endswith(".name") or (Path(value) / "config.json").is_file()):
            # an encoder folder (its config.json) too: kept relative, a resume elsewhere would read another one
            out[key] = os.path.abspath(value)
            log.warning("%s: %s is not in %s (paths in a config file are relative to the file) but in the working "
                        "directory: using %s; write it relative to the config file", key, value, base, out[key])  # fmt: skip
        elif key.startswith("model."):
            continue  # a hub id, a timm architecture or "tiny", unless a folder beside the file or in the cwd
        else:
            out[key] = str(candidate)  # to be created there (split file, cache), or named in the error
    return out
