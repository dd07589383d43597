"""The `Trainer`: data -> model -> AdamW + warmup/cosine -> per-epoch eval, checkpoints, early stopping.

Design points that matter for users:

* Resumable to the bit (on CPU): the data order of epoch e comes from a generator seeded with
  (seed, e), a checkpoint stores the position inside the epoch and every RNG state, and evaluation
  runs under `fork_rng`, so `--resume` replays exactly what an uninterrupted run would do.
* Crash-safe: checkpoints are written to a temp dir and swapped in (see `checkpoint.py`); a NaN loss,
  SIGTERM or Ctrl-C never leaves a half-written checkpoint behind.
* Frozen encoders train on cached features (see `feature_cache.py`).
* Distributed: launched with `torchrun` or `accelerate launch`, Accelerate wraps the model in DDP, or
  shards it with FSDP2 when the launch's Accelerate config turns FSDP on (checkpoints stay whole
  files); `optim.batch_size` stays the global batch. Evaluation is sharded across ranks and gathered, a NaN,
  a SIGTERM or early stopping stops every rank at once, and checkpoints hold every rank's RNG state
  (see `distributed.py`).
* Precision (`fusionkit.precision`): bf16 autocast on GPUs and AMX / Arm BF16 CPUs, fp32 elsewhere,
  fp16 + GradScaler on request on CUDA; the choice and its reason are logged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..config import ConfigError, to_dict
from ..data import Collator, ImageTransform, build_cache, load_dataset, move_batch, split_dataset
from ..data.cache import SplitView
from ..data.dataset import OLDER_SPLITS, MultimodalDataset
from ..data.sources.registry import data_gone, source_name
from ..models import FusionModel, create_model, model_inputs
from ..models.fusion_model import DATA_COLUMNS
from ..precision import choose_precision
from ..tasks import bind_labels, create_task, fit_train_statistics
from ..tasks.base import new_warning_scope
from . import checkpoint as ckpt
from . import distributed as D
from .config import IN_MEMORY, DataConfig, TrainConfig, build_config, unused_settings
from .ema import ModelEMA, ema_applied
from .feature_cache import FeatureCollator, build_features
from .inference import inference_loader, resolve_device, run_inference, split_loss  # noqa: F401 (re-exported)
from .metrics import (
    check_metric,
    default_metric,
    evaluation_metrics,
    higher_is_better,
    metric_task,
    prediction_rows,
)
from .optim import build_optimizer, build_scheduler
from .report import json_text, plot_confusion, plot_curves, write_jsonl, write_predictions
from .rundir import LOCK as RUN_LOCK
from .rundir import (
    OPERATIONAL_KEYS,
    RunDir,
    RunDirError,
    append_atomic,
    config_changes,
    data_changes,
    data_fingerprint,
    environment,
    older_splits,
    replace_file,
    saved_checkpoints,
    write_atomic,
)

log = logging.getLogger("fusionkit.training")

# data.dataset as saved by a run that trained on a DataFrame / datasets.Dataset / MultimodalDataset


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the epoch, step and batch ids."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT arrived: the current step was finished and a checkpoint saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


# ---------------------------------------------------------------------------------------- setup


def seed_everything(seed: int, deterministic: bool = True) -> Callable[[], None]:
    """Seed Python's, numpy's and torch's global generators (as HF's `set_seed`); `deterministic` also turns on
    torch's deterministic algorithms. Returns what puts them (their states, and CUBLAS_WORKSPACE_CONFIG,
    cudnn.benchmark) back as they were: a notebook that trained keeps its own random stream and settings (the
    trainer calls it when fit ends)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None  # noqa: NPY002
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (user code and libraries may use the global generator)
    torch.manual_seed(seed)
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, workspace = torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")

    def restore() -> None:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return restore


def check_writable(directory: Path) -> None:
    """Fail before any work if the run dir cannot be written (read-only mount, wrong owner, full disk)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"output directory {directory} is not writable ({e.strerror or e}); set run.output_dir"
        ) from e


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one epoch in an order seeded by (seed, epoch), starting at batch `start`.

    The seed per epoch is what makes mid-epoch resume exact. Each global batch is split across
    ranks, so a DDP run with world size W sees the same examples per step as one process would.

    With `lengths` (one per item), each shuffled run of `group * batch_size` items is sorted by
    length before it is cut into batches, and the full batches are then shuffled: batches of
    similar length, hence little padding, in a random order (HF's `LengthGroupedSampler`).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1,
        lengths: Sequence[int] | None = None, group: int = 50,
    ) -> None:  # fmt: skip
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} items")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.lengths = None if lengths is None else torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        self.group = group
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def num_batches(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world)  # a tail smaller than the world size would leave a rank idle

    def __len__(self) -> int:
        return self.num_batches() - self.start

    def global_size(self, b: int) -> int:
        """Rows in global batch `b` (over all ranks): the batch size, but for the epoch's last one."""
        return min(self.batch_size, self.n - b * self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
            if self.lengths is not None:
                order = self._grouped(order, g)
        else:
            order = torch.arange(self.n)
        for b in range(self.start, self.num_batches()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch.tensor_split(self.world)[self.rank].tolist()

    def _grouped(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        assert self.lengths is not None
        bs = self.batch_size
        chunks = order.split(bs * self.group)
        order = torch.cat([c[torch.sort(self.lengths[c], descending=True, stable=True).indices] for c in chunks])
        full = self.n // bs  # the tail batch (if any) stays last, as without grouping
        batches = order[: full * bs].view(full, bs)[torch.randperm(full, generator=g)]
        return torch.cat([batches.reshape(-1), order[full * bs :]])


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the defaults of keys it lacks (an older fusionkit wrote it), so that a key added
    since is not a change on resume; as saved if this version cannot read it (the comparison names why)."""
    from .rundir import upgraded_config

    try:
        return to_dict(build_config(upgraded_config(saved)))
    except (ConfigError, TypeError, ValueError):
        return saved


def _without_derived(task: Any) -> Any:
    """`task` without its type's `derived_params` (a regression's target mean and std): statistics of a train
    split, which a new run fits on its own (training `OLD_RUN/config.yaml` on other data or another split would
    standardize by the old run's, silently: r2 -754 on targets scaled by 1000). Said when some were dropped."""
    from ..tasks import get_task_class

    derived = [k for k in get_task_class(task.type).derived_params if k in task.params]
    if not derived:
        return task
    log.warning("task %s: %s are statistics of a train split, which each new run fits on its own: the config's "
                "(another run's config.yaml?) are not used (params.standardize: false trains on the raw targets)",
                task.name, ", ".join(f"params.{k}" for k in derived))  # fmt: skip
    return dataclasses.replace(task, params={k: v for k, v in task.params.items() if k not in derived})


def _adopt_data_derived(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    """A resumed run keeps what its data gave each task (class names and count, balanced class weights, the class
    prior, a task type's `derived_params` such as a regression's target statistics) where the config leaves them to
    the data: the config the run started from is not a change, and a change of one option is that option alone."""
    from ..config import TaskConfig, from_dict
    from ..tasks import get_task_class

    saved_tasks = {t.get("name"): t for t in saved.get("model", {}).get("tasks", []) if isinstance(t, dict)}
    for i, task in enumerate(cfg.model.tasks):
        if task.name not in saved_tasks:
            continue
        old = from_dict(TaskConfig, saved_tasks[task.name], f"model.tasks[{i}]")
        if (task.type, task.column) != (old.type, old.column):  # another task under that name: nothing carries over
            continue
        derived = get_task_class(task.type).derived_params
        params = dict(task.params)
        if {k: v for k, v in params.items() if k not in derived} == {k: v for k, v in old.params.items() if k not in derived}:
            params = {**{k: v for k, v in old.params.items() if k in derived}, **params}
        if task.class_names not in (None, old.class_names) or task.num_classes not in (None, old.num_classes):
            cfg.model.tasks[i] = dataclasses.replace(task, params=params)  # other classes: the data's schema changes
            continue
        balanced = task.class_weights == "balanced" and isinstance(old.class_weights, list)
        prior = task.class_prior is None and bool(task.logit_adjustment) and bool(old.logit_adjustment)
        cfg.model.tasks[i] = dataclasses.replace(
            task, class_names=old.class_names, num_classes=old.num_classes, params=params,
            class_weights=old.class_weights if balanced else task.class_weights,
            class_prior=old.class_prior if prior else task.class_prior,
        )  # fmt: skip


def _check_same_tasks(run_path: Path, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """A resume continues the checkpoint's model, whose heads are those of the run's tasks: a task added or removed
    is refused before any weight is read (with or without --accept-changes), not a weight-loading error."""
    old = [t.get("name") for t in saved.get("model", {}).get("tasks", []) if isinstance(t, dict)]
    new = [t.name for t in cfg.model.tasks]
    changed = {what: names for what, names in (("added", [n for n in new if n not in old]),
                                                ("removed", [n for n in old if n not in new])) if names}  # fmt: skip
    if old and changed:
        listed = "; ".join(f"{what}: {', '.join(names)}" for what, names in changed.items())
        raise RunDirError(f"resuming {run_path}: a resume cannot add or remove tasks ({listed}); its checkpoints hold "
                          f"the heads of tasks {old}. Resume with those tasks, or start a new run (another run.name) "
                          "with the tasks you want")  # fmt: skip


def reader_kwargs(
    data: DataConfig,
    tasks: Any = (),
    *,
    report_path: Path | None = None,
    labels: bool = True,
    source: Any = None,
) -> dict[str, Any]:
    """`load_dataset` options from the data config: columns, missing-modality and bad-row policies, and
    the label column of every labelled task (`labels=False`: none, for prediction on new rows)."""
    source = data.dataset if source is None else source
    if isinstance(source, str) and (source == "synthetic" or source.startswith("synthetic:")):
        return {}
    columns = [t.column for t in map(create_task, tasks) if t.needs_labels] if labels else []
    kw: dict[str, Any] = {
        "text_column": data.text_column,
        "image_column": data.image_column,
        "id_column": data.id_column,
        "label_columns": list(dict.fromkeys(columns)),
        "on_error": data.on_error,
        "missing_text": data.missing_text,
        "missing_image": data.missing_image,
    }
    if data.image_root is not None:
        kw["image_root"] = data.image_root
    if report_path is not None:
        kw["report_path"] = report_path
    return kw


def check_labelled_rows(parts: Mapping[str, Any], tasks: Mapping[str, Any], metric: str, where: str | None) -> None:
    """Before any encoder runs: a task without a labelled train row is an error (its head would stay random);
    one without labelled val or test rows is said, with what that costs (no selection, no test score)."""
    for name, task in tasks.items():
        if not task.needs_labels:
            continue
        counts = {split: sum(ex.labels.get(name) is not None for ex in part) for split, part in parts.items()}
        source = f"column {task.column!r}" + (f" of {where}" if where else "")
        if "train" in parts and counts["train"] == 0:
            raise ConfigError(f"task {name!r} has no labelled row in the train split ({source}, "
                              f"{len(parts['train'])} rows): fill its labels or remove the task")  # fmt: skip
        if "train" in parts and task.class_names:
            seen = {split: _classes_seen(part, name) for split, part in parts.items()}
            unseen = sorted((seen.get("val", set()) | seen.get("test", set())) - seen["train"])
            if unseen:
                log.warning("task %s: class(es) %s have labelled val/test rows but none in train (%s): the model "
                            "cannot learn them, and their rows will score as errors", name,
                            [task.class_names[c] for c in unseen], source)  # fmt: skip
            unscored = sorted(seen["train"] - seen.get("val", set())) if counts.get("val") else []
            if unscored:  # macro-F1 / per-class scores on val leave them out of the checkpoint choice
                log.warning("task %s: class(es) %s have labelled train rows but none in val (%s): the val scores "
                            "that choose the best checkpoint leave them out; put some of their rows in val "
                            "(data.split_file) or select on another metric", name,
                            [task.class_names[c] for c in unscored], source)  # fmt: skip
        for split in ("val", "test"):
            if counts.get(split) == 0 and len(parts[split]):
                cost = (f"{metric} (run.metric) cannot select a checkpoint: the last one is kept"
                        if split == "val" and metric.startswith(f"val/{name}/") else f"no {split} score for it")  # fmt: skip
                log.warning("task %s has no labelled row among the %d rows of the %s split (%s): %s", name,
                            len(parts[split]), split, source, cost)  # fmt: skip
    selected, _ = metric_task(metric, tasks) or (None, None)
    if selected is not None and tasks[selected].cfg.weight == 0:
        log.warning("run.metric %s selects checkpoints on task %s, whose loss weight is 0 (it does not train): "
                    "set run.metric to a trained task's metric", metric, selected)  # fmt: skip


def _classes_seen(part: Any, task: str) -> set[int]:
    """The class indices among a split's labels of `task` (a class index, or a multilabel row's list)."""
    seen: set[int] = set()
    for ex in part:
        value = ex.labels.get(task)
        if isinstance(value, int):
            seen.add(value)
        elif isinstance(value, list | tuple):
            seen.update(v for v in value if isinstance(v, int))
    return seen


# config.json keys that name where an encoder was read from or written by, not what it computes
_CONFIG_PROVENANCE = frozenset({"architectures", "transformers_version", "torch_dtype", "dtype"})


def encoder_folder_changes(model: Any, checkpoint: Path) -> list[str]:
    """How the local encoder folders `model` (a ModelConfig) names differ from the encoders saved in `checkpoint`:
    gone, or another config.json or tokenizer vocabulary (a folder refilled since the run started)."""
    from transformers import AutoConfig, AutoTokenizer

    def settings(folder: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
        values = AutoConfig.from_pretrained(folder, **overrides).to_dict()
        return {k: v for k, v in values.items() if not k.startswith("_") and k not in _CONFIG_PROVENANCE}

    out = []
    sides = [("model.text.name", model.text, "text_encoder", model.text.config_overrides)]
    if model.image.backend == "hf":  # timm builds from its name: no folder of its own to change
        sides.append(("model.image.name", model.image, "image_encoder", model.image.model_kwargs))
    for key, side, saved, overrides in sides:
        folder = Path(side.name).expanduser()
        if not (folder.is_absolute() or side.name.startswith((".", "~")) or folder.exists()):
            continue  # a preset or hub id: nothing local that could have been refilled
        if not (folder / "config.json").is_file():
            out.append(f"{key}: the encoder folder {side.name} is gone or holds no config.json")
            continue
        try:
            changed = [what for what, differs in (
                ("config.json", settings(folder, overrides) != settings(checkpoint / saved, {})),
                ("tokenizer", key == "model.text.name" and AutoTokenizer.from_pretrained(folder).get_vocab()
                 != AutoTokenizer.from_pretrained(checkpoint / saved).get_vocab()),
            ) if differs]  # fmt: skip
        except (OSError, ValueError) as e:
            changed = [f"content (it no longer loads: {type(e).__name__})"]
        if changed:
            out.append(f"{key}: the encoder folder {side.name} now holds another {' and '.join(changed)} than "
                       f"the run trained with")  # fmt: skip
    return out


def data_source_name(data: Any) -> str:
    """The data.dataset a config records for `data` passed in Python: its path, or `in-memory:<type>`, which
    no later run reads (it must be given the data again), never the config's own dataset."""
    return str(data) if isinstance(data, str | Path) else f"{IN_MEMORY}{type(data).__name__}"


def cache_root(data: DataConfig) -> Path:
    """`data.cache_dir`, else $FUSIONKIT_CACHE, else ~/.cache/fusionkit: the one rule every command uses."""
    return Path(data.cache_dir or os.environ.get("FUSIONKIT_CACHE") or "~/.cache/fusionkit").expanduser()


# ---------------------------------------------------------------------------------------- trainer


class Trainer:
    """`Trainer(cfg).fit()` trains, evaluates and writes a run dir; `resume=True` continues its `last/`."""

    def __init__(
        self,
        config: TrainConfig,
        model: FusionModel | None = None,
        resume: bool = False,
        accept_changes: bool = False,
        data: Any = None,
    ) -> None:
        """`data`: an in-memory DataFrame, `datasets.Dataset`/`DatasetDict` or `MultimodalDataset` to
        train on instead of `config.data.dataset` (columns are still named by `config.data`). The trainer works on
        a copy of `config` (it fills in the run's name, the data's classes...): the caller's is not changed."""
        new_warning_scope()  # a warning said once per run (each epoch's val) is said again in the next run
        self.cfg = cfg = copy.deepcopy(config).validate()
        if data is not None:  # what the saved config says it trained on: not data.dataset's value
            cfg.data.dataset = data_source_name(data)
        self.device = resolve_device(cfg.run.device)
        self.rank, self.world = D.init_distributed(self.device)  # sets the CUDA device before collectives
        self.is_main = self.rank == 0
        self.resume, self.accept_changes = resume, accept_changes
        self.run = self._open_run_dir()  # locked by rank 0 until fit ends; refuses before any work
        self.run_dir = self.run.path
        # global torch settings the run changes: the caller's come back when fit ends, or here on an error
        self._restore_torch_settings = seed_everything(cfg.run.seed, cfg.run.deterministic)
        try:
            self._setup(model, data)
        except BaseException:
            self._abandon_run()
            self._restore_torch_settings()
            raise

    def _setup(self, model: FusionModel | None, data: Any) -> None:
        """Everything after the run dir is locked: data, model, precision, optimizer, progress state."""
        cfg = self.cfg
        self.fsdp = D.launch_engine(cfg, self.world) == "fsdp"  # refuses DeepSpeed, and what FSDP cannot run
        # Accelerate where it is needed (several processes, experiment trackers): DDP/FSDP and the trackers
        self.accelerator = D.make_accelerator(self.device, cfg.run.report_to, self.run_dir)
        self.progress = cfg.run.progress and self.is_main
        # Cheap checks first: read the table, bind labels to tasks, split -- before any model or cache.
        source, parts = self._read_data(data, model)
        self.parts = parts  # their examples: a resume compares an older version's fingerprints by its scheme
        self.model = (model or self._create_model()).to(self.device)
        # the sides some training rows really lacked (a `keep` policy that kept none trained no placeholder):
        # predict and eval warn about, or refuse, files without the others
        train = list(parts["train"])
        self.model.trained_without = tuple(side for side, absent in (("caption", any(ex.text is None for ex in train)),
                                                                     ("image", any(ex.image is None for ex in train))) if absent)
        # the columns it read, saved with it: predict / eval / embed of a model folder read a new file by them
        self.model.data_columns = {k: getattr(cfg.data, k) for k in DATA_COLUMNS}
        self.precision = choose_precision(cfg.run.precision, self.device)
        self.amp = self.precision.dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        if self.is_main:
            overruled = cfg.run.precision not in ("auto", self.precision.name)  # e.g. fp16 asked for on a CPU
            log.log(logging.WARNING if overruled else logging.INFO, "precision %s", self.precision.reason)
            for message in unused_settings(cfg):
                log.warning(message)
            contrasting = [n for n, t in self.model.tasks.items() if getattr(t, "contrasts_rows", False)]
            if cfg.optim.accumulation_steps > 1 and contrasting:
                log.warning("optim.accumulation_steps %d: tasks %s contrast the rows of each micro-batch of %d, not of the "
                            "accumulated batch of %d (fewer negatives than one batch that size); for them raise "
                            "optim.batch_size instead", cfg.optim.accumulation_steps, contrasting, cfg.optim.batch_size,
                            cfg.optim.batch_size * cfg.optim.accumulation_steps)  # fmt: skip
        self._build_data(source, parts)

        self.ddp: torch.nn.Module = self.model
        if self.fsdp:  # sharded in place: self.model is the FSDP module (see distributed.shard_model)
            self.ddp = self.model = D.shard_model(self.accelerator, self.model)
        elif self.accelerator is not None and self.world > 1:
            self.ddp = self.accelerator.prepare_model(self.model, device_placement=False)
        if cfg.run.compile:  # the training forward only: evaluation and checkpoints use the plain module
            self.ddp = torch.compile(self.ddp, dynamic=True)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ema = ModelEMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None  # see ema.py
        accum = cfg.optim.accumulation_steps
        self.steps_per_epoch = math.ceil(self.train_sampler.num_batches() / accum)
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        # progress state: everything `--resume` needs besides model/optimizer/RNG
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.best: float | None = None
        self.best_loss: float | None = None  # val/loss at the best epoch: it breaks ties of run.metric
        self.bad_epochs = 0
        self.seconds_before, self.fit_start = 0.0, 0.0  # training time of earlier sessions of a resumed run
        self.history: list[dict[str, Any]] = []
        self._stop_signal: int | None = None
        # called with each epoch's history entry (val metrics) after its checkpoint, e.g. to prune a tuning trial
        self.epoch_callbacks: list[Callable[[dict[str, Any]], None]] = []
        # called with the trainer after each optimizer step (`trainer.step` counts them), before its logging
        # and checkpointing: custom logging, or the fault-injection tests' kill points
        self.step_callbacks: list[Callable[[Trainer], None]] = []
        # train loss summed since the last log line: part of the state, so logs match across a resume
        self.running_loss, self.running_n = torch.zeros((), device=self.device), 0
        # each task's loss summed over the logged steps' batches it was scored in, and their count (a task can
        # have no labelled row in a batch): `train/<task>/loss`, so a multi-task run shows which task moves
        self.running_tasks: dict[str, list[Any]] = {}  # name -> [loss sum (a tensor: no sync per step), batches]
        # training's draws (dropout, augmentation) start from the seed, whatever building the model drew: a task
        # added at weight 0 (its head's initialisation) leaves the other tasks' training as it was
        seed_everything(cfg.run.seed, cfg.run.deterministic)

    def _create_model(self) -> FusionModel:
        """The model the config names. A resume rebuilds it on the encoders its last checkpoint saved (configs,
        tokenizer, image preprocessing; their weights are loaded from it anyway): what the encoder folders hold
        now (moved, deleted, another tokenizer) cannot change a run that is continued."""
        last = self.run.last if self.resume else None
        if last is None or not (last / "text_encoder").is_dir():
            return create_model(self.cfg.model)
        if self.is_main:
            differences = encoder_folder_changes(self.cfg.model, last)
            if differences:
                log.warning("%s; the resume uses the encoders saved in %s, as the run trained with", "; ".join(differences),
                            last)  # fmt: skip
        model = FusionModel.on_saved_encoders(last, self.cfg.model)
        # its weights now, before the feature cache is keyed on (and computed with) the encoders: the rebuilt ones
        # are random until `_load`, and a frozen folder's features computed from them were trained on silently
        model.load_weights(last / "model.safetensors")
        return model.train()

    def _abandon_run(self) -> None:
        """Set-up or the first steps failed (bad data, a wrong metric, a plugin's error...): release the lock; a fresh
        run dir that holds no checkpoint yet is removed, so the corrected command can run under the same name."""
        if not self.is_main:
            return
        self.run.unlock()
        if self.resume or saved_checkpoints(self.run.path):  # a checkpoint to resume from: the run stays
            return
        for name in ("skipped_rows.jsonl", "skipped_labels.jsonl"):  # the log named them: kept, moved out
            report = self.run.file(name)
            if report.is_file():
                kept = Path(tempfile.gettempdir()) / "fusionkit-skipped" / f"{self.run.path.name}-{name}"
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(report, kept)
                log.warning("the run did not start; its report %s is kept as %s", name, kept)
        for name in ("split.json", "config.yaml", "config.json", "data_fingerprint.json", "environment.json",
                     ckpt.FROZEN_WEIGHTS, RUN_LOCK):  # fmt: skip
            self.run.file(name).unlink(missing_ok=True)  # this run's (the frozen encoders of a failed first save too)
        with contextlib.suppress(OSError):  # anything else in it (the user's): the folder stays
            self.run.checkpoints.rmdir()  # made by a first save that failed (a full disk), if nothing else is in it
        with contextlib.suppress(OSError):
            self.run.path.rmdir()
            for made in getattr(self, "_made_dirs", ()):  # innermost first; one that is not empty stays
                made.rmdir()

    # ------------------------------------------------------------------ data
    def _read_data(self, data: Any, model: FusionModel | None) -> tuple[MultimodalDataset, dict[str, Any]]:
        """Read the dataset, bind its labels to the tasks (class names reconciled by name), check
        `run.metric`, split, and fit train-split statistics: everything before the first expensive step.
        Returns the bound dataset and its splits."""
        cfg = self.cfg
        if model is not None:  # a given model's tasks (and class names) are the schema
            cfg.model = copy.deepcopy(model.config)
        source = cfg.data.dataset if data is None else data
        if isinstance(source, str) and source.startswith(IN_MEMORY):
            again = ("this run trained on an in-memory dataset; pass it again (Trainer(cfg, data=..., resume=True))"
                     if self.resume else "this config was written for an in-memory dataset (by fusionkit tune, or a "
                     "run's saved config); train it from Python with the data: fusionkit.train(config, data=...)")  # fmt: skip
            raise ConfigError(f"data.dataset is {source!r}: {again}, or set data.dataset to a file")
        gone = data_gone(source) if self.resume and isinstance(source, str) else ""
        if gone:
            raise FileNotFoundError(f"{source}, the data {self.run_dir} trained on, {gone}: if it moved, "
                                    "resume with --data.dataset NEW_PATH (its content is checked against the run's)")  # fmt: skip
        if cfg.data.image_root is None and not self.resume and isinstance(source, str) and source_name(source) == "hf":
            cfg.data.image_root = os.getcwd()  # its relative image paths: recorded, for eval from another directory
        kw = reader_kwargs(cfg.data, cfg.model.tasks, report_path=self.run_dir / "skipped_rows.jsonl",
                           source=source)  # fmt: skip
        ds, cfg.model.tasks = bind_labels(load_dataset(source, **kw), cfg.model.tasks, on_error=cfg.data.on_error,
                                          report_path=self.run_dir / "skipped_labels.jsonl")  # fmt: skip
        if model is not None:
            for t in cfg.model.tasks:
                if (t.num_classes or 0) != (model.tasks[t.name].num_classes or 0):
                    raise ConfigError(
                        f"task {t.name!r}: the data has {t.num_classes} classes {t.class_names} but the given "
                        f"model's head has {model.tasks[t.name].num_classes}; set its class_names"
                    )
        tasks = {t.name: create_task(t) for t in cfg.model.tasks}
        self.metric = cfg.run.metric or default_metric(tasks)
        check_metric(self.metric, tasks)
        own_split = self.run_dir / "split.json"
        split_path = Path(cfg.data.split_file).expanduser() if cfg.data.split_file else own_split
        if self.resume and not split_path.is_file() and own_split.is_file():  # a new split would differ from
            # the one it trained on (a moved or deleted split file, or one saved as `~/...` that was never read)
            log.warning("data.split_file %s does not exist: resuming on the split the run trained on, %s",
                        split_path, own_split)  # fmt: skip
            split_path = own_split
        drawn = not self.resume and not split_path.is_file()  # a new split, by this version's scheme
        with self._main_first():
            # rank 0 first (it writes a new split), then every rank reads that same file
            report = self.run_dir / "skipped_rows.jsonl"  # rows this run's reading policy left out
            skipped = {json.loads(line).get("item") for line in report.read_text().splitlines()} if report.is_file() else ()
            parts = split_dataset(ds, cfg.data.split_ratios, cfg.data.split_seed, split_path,
                                  allow_new_rows=cfg.data.allow_new_rows, skipped=skipped)  # fmt: skip
        if drawn and self.is_main:
            self._warn_older_splits(parts)
        if split_path != own_split and self.is_main and split_path.is_file():
            # the split this run trained on: the file's, plus any rows allow_new_rows put in train
            own = {**json.loads(split_path.read_text()), **{k: part.ids for k, part in parts.items()}}
            write_atomic(own_split, json.dumps(own, indent=1))
        for name, ratio in zip(("val", "test"), cfg.data.split_ratios[1:], strict=True):
            if ratio > 0 and name in parts and len(parts[name]) == 0 and self.is_main:
                # say whose split it is: the ratios are not applied to a split file or to the data's own splits
                sizes = ", ".join(f"{k} {len(v)}" for k, v in parts.items())
                whence = (f"data.split_file {split_path}: {sizes}" if cfg.data.split_file else
                          f"the data's own splits were used, not data.split_ratios: {sizes}" if ds.splits is not None
                          else f"data.split_ratios {list(cfg.data.split_ratios)} of {len(ds)} rows")  # fmt: skip
                log.warning("the %s split is empty (%s)%s", name, whence,
                            ": no epoch is selected, the last one is kept" if name == "val" else "")  # fmt: skip
        check_labelled_rows(parts, tasks, self.metric, str(source) if isinstance(source, str | Path) else None)
        if "train" in parts and model is None:
            if not self.resume:  # a new run fits its own: a config.yaml of another run carries that run's
                cfg.model.tasks = [_without_derived(t) for t in cfg.model.tasks]
            cfg.model.tasks = fit_train_statistics(cfg.model.tasks, parts["train"])
        cfg.model.validate()
        return ds, parts

    def _warn_older_splits(self, parts: Mapping[str, MultimodalDataset]) -> None:
        """Say so before training when a run beside this one split the same data with the same seed otherwise, by
        an older fusionkit's scheme: this is no repeat of that run (the likely intent when training its
        config.yaml again), and its split.json is the way to get its split."""
        data = self.cfg.data
        ids = {k: part.ids for k, part in parts.items()}
        older = older_splits(self.run_dir, data.dataset, data.split_seed, data.split_ratios, ids)
        if older:
            other, moved, n = older[0]
            also = f" (as did {', '.join(str(o) for o, _, _ in older[1:])})" if older[1:] else ""
            log.warning(
                "%s was split from this data with the same data.split_seed %d and data.split_ratios %s by %s%s; this "
                "version orders each class's rows by a seeded hash of their ids, so %d of its %d train rows are not "
                "in this run's train split. To train on that run's split, pass --data.split_file %s (data.split_file "
                "in a config)", other, data.split_seed, list(data.split_ratios), OLDER_SPLITS, also, moved, n,
                other / "split.json",
            )  # fmt: skip

    def _build_data(self, source: MultimodalDataset, parts: dict[str, Any]) -> None:
        cfg, model = self.cfg, self.model
        cache_dir = cache_root(cfg.data)
        max_length = cfg.model.text.max_length
        # Frozen encoders, or frozen bottoms under freeze=top_k: train on their cached outputs.
        self.use_features = cfg.data.feature_cache and model.feature_splits is not None
        # One cache for the rows of all splits (in the dataset's order), each split a view of it: another
        # split of the same rows (split_seed, ratios, a fold) finds it, and the encoders never rerun.
        used = {i for part in parts.values() for i in part.ids}
        pool = source.subset([i for i in source.ids if i in used], name=source.name)
        with self._main_first():
            data = build_cache(pool, model.tokenizer, model.image_preprocess, cache_dir, max_length,
                               cfg.data.num_proc, cfg.data.on_error, progress=self.progress)  # fmt: skip
            undecoded = data.skip_report
            if self.use_features:
                data = build_features(model, data, cache_dir, cfg.optim.eval_batch_size, self.progress)
        if self.is_main and undecoded is not None:  # images the cache could not decode: listed in the run dir
            self._note_skipped(undecoded)  # too, beside the rows the reader left out
        self.datasets: dict[str, Any] = {
            split: SplitView(data, part.ids, part.fingerprint) for split, part in parts.items() if len(part)
        }
        if "train" not in self.datasets:
            raise ValueError(f"dataset {cfg.data.dataset!r} has no training examples")
        unused = [f"run.{k}" for k in ("patience", "metric") if getattr(cfg.run, k) is not None]
        if "val" not in self.datasets and unused and self.is_main:
            log.warning("%s set, but there is no val split to evaluate: ignored (the last checkpoint is kept); give "
                        "val rows a share in data.split_ratios, or remove %s", " and ".join(unused),
                        "it" if len(unused) == 1 else "them")  # fmt: skip
        train = self.datasets["train"]
        if self.use_features:
            self.collate: Any = FeatureCollator(list(model.tasks.values()))
            self.train_transform = self.eval_transform = None
        else:
            self.collate = Collator(model.tokenizer.pad_token_id, list(model.tasks.values()))
            preprocess = model.image_preprocess
            self.train_transform = ImageTransform(preprocess, train=cfg.data.augment).to(self.device)
            self.eval_transform = ImageTransform(preprocess, train=False).to(self.device)
        self.train_sampler = EpochBatchSampler(
            len(train), cfg.optim.batch_size, cfg.run.seed, shuffle=True, rank=self.rank, world=self.world,
            lengths=train.text_lengths() if cfg.data.group_by_length else None,
        )  # fmt: skip
        tail = len(train) % cfg.optim.batch_size
        if self.is_main and 0 < tail < self.world:
            log.warning("the last %d train row(s) of each epoch are left out: a batch of %d cannot be split over %d "
                        "processes (choose optim.batch_size so that %d rows leave no such tail)", tail, tail,
                        self.world, len(train))  # fmt: skip
        self.train_loader = self._loader(train, self.train_sampler)

    def _note_skipped(self, cache_report: Path) -> None:
        """Append the cache's skipped items to the run's skipped_rows.jsonl (once: a resume reads them again)."""
        report = self.run_dir / "skipped_rows.jsonl"
        have = set(report.read_text(encoding="utf-8").splitlines()) if report.is_file() else set()
        new = [line for line in cache_report.read_text(encoding="utf-8").splitlines() if line not in have]
        if new:
            append_atomic(report, new)

    def _loader(self, data: Any, sampler: torch.utils.data.Sampler) -> torch.utils.data.DataLoader:
        # An explicit generator keeps DataLoader from drawing from the global RNG (which resume restores).
        return torch.utils.data.DataLoader(
            data, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator(),
        )  # fmt: skip

    def eval_loader(self, split: str) -> torch.utils.data.DataLoader:
        """This rank's share of a split: whole batches in order (`distributed.ShardedBatchSampler`).

        Under FSDP every forward is a collective, so every rank runs every batch (ranks could hold
        different numbers of them otherwise)."""
        data = self.datasets[split]
        rank, world = (0, 1) if self.fsdp else (self.rank, self.world)
        sampler = D.ShardedBatchSampler(len(data), self.cfg.optim.eval_batch_size, rank, world)
        return self._loader(data, sampler)

    @contextlib.contextmanager
    def _main_first(self) -> Iterator[None]:
        """Rank 0 builds shared caches first; the other ranks then find them."""
        if not self.is_main:
            D.barrier()
        yield
        if self.is_main:
            D.barrier()

    # ------------------------------------------------------------------ run dir
    def _open_run_dir(self) -> RunDir:
        """Rank 0 creates (or opens to resume) and locks the run dir; the other ranks learn its name.

        A resume compares the config with the saved one here, before any work: changes that alter
        what is learned are refused unless `accept_changes` (see `rundir.OPERATIONAL_KEYS`)."""
        cfg, run = self.cfg, None
        if self.resume and cfg.run.name is None:
            raise ConfigError("--resume needs the run's name (run.name) or its directory")
        if self.is_main:
            if self.resume:
                run = RunDir.open_for_resume(Path(cfg.run.output_dir) / cfg.run.name)
            else:
                # the folders this run creates above its own (`runs/` on a first run): a failed start removes them
                above = Path(cfg.run.output_dir).absolute()
                self._made_dirs = [p for p in (above, *above.parents) if not p.exists()]
                run = RunDir.create(cfg.run.output_dir, cfg.run.name, cfg.run.name_exists)
        if self.world > 1:
            name = D.broadcast_object(run.path.name if run else None)
            run = run or RunDir(Path(cfg.run.output_dir) / name)
        assert run is not None
        cfg.run.name = run.path.name
        try:
            if self.is_main:
                check_writable(run.path)
            self.config_changes: dict[str, list[Any]] = {}
            if self.resume:
                saved = _with_defaults(run.read_config() or {})
                _check_same_tasks(run.path, saved, cfg)
                _adopt_data_derived(cfg, saved)
                self.config_changes = config_changes(saved, to_dict(cfg))
                # a moved dataset is not a change when its content is checked against the run's (data_fingerprint.json)
                moved = {"data.dataset"} if run.read_data_fingerprint() is not None else set()
                guarded = {k: v for k, v in self.config_changes.items() if k not in OPERATIONAL_KEYS | moved}
                if guarded and not self.accept_changes:
                    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in guarded.items())
                    raise RunDirError(
                        f"resuming {run.path} with a changed config: {listed}. Resume with the saved config, "
                        "or pass --accept-changes to train on with these values (recorded in resume_log.jsonl)"
                    )
        except BaseException:
            run.unlock()
            raise
        return run

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "best": self.best,
            "best_loss": self.best_loss,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "running_loss": float(self.running_loss),
            "running_n": self.running_n,
            "running_tasks": {name: [float(total), n] for name, (total, n) in self.running_tasks.items()},
            "precision": self.precision.name,
            "train_seconds": self.seconds_before + (time.perf_counter() - self.fit_start if self.fit_start else 0.0),
            **({"ema": self.ema.state_dict(self.model)} if self.ema else {}),  # the raw weights; the model file holds the EMA
        }

    def _save(self, best: bool = False) -> None:
        rngs = D.all_gather_object(ckpt.rng_state())  # every rank's random stream, so each resumes its own
        optimizer = D.full_optimizer_state(self.model, self.optimizer)  # FSDP: gathered (None: not sharded)
        with D.gathered_weights(self.model):  # FSDP: the whole model on rank 0, written as one file
            if not self.is_main:
                return
            state = {**self.state_dict(), **({"rng_per_rank": rngs} if self.world > 1 else {})}
            if optimizer is not None:
                state["optimizer"] = optimizer
            with ema_applied(self.ema, self.model):  # the model file gets the EMA weights, the state the raw ones
                ckpt.save_checkpoint(self.run_dir, self.step, self.model, state, best=best,
                                     keep=self.cfg.run.keep_checkpoints)  # fmt: skip
            replace_file(self.run_dir / "metrics.jsonl", lambda tmp: write_jsonl(tmp, self.history))

    def _load(self) -> None:
        last = self.run.last
        if last is None:
            raise FileNotFoundError(f"nothing to resume: {self.run_dir} has no `last` checkpoint")
        with D.loading_whole_weights(self.model):  # FSDP: each rank keeps its shard of the whole file
            self.model.load_weights(last / "model.safetensors")
        state = ckpt.load_state(last)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        D.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if any(k.startswith("optim.") and k not in OPERATIONAL_KEYS for k in self.config_changes):  # accepted
            for group, values, base, factor in zip(self.optimizer.param_groups, configured, base_lrs,
                                                   self.scheduler.lr_lambdas, strict=True):  # fmt: skip
                group.update(values, initial_lr=base, lr=base * factor(self.scheduler.last_epoch))
            self.scheduler.base_lrs = base_lrs
        self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_per_rank")
        if ranks is not None and len(ranks) != self.world:
            log.warning("the checkpoint was saved by %d processes, this run has %d: every rank resumes rank 0's "
                        "random stream", len(ranks), self.world)  # fmt: skip
        own = ranks is not None and len(ranks) == self.world
        ckpt.set_rng_state(ranks[self.rank] if own else state["rng"])
        if state.get("precision", self.precision.name) != self.precision.name:
            log.warning("the run trained in %s and resumes in %s (%s); set run.precision to keep it exact",
                        state["precision"], self.precision.name, self.precision.reason)  # fmt: skip
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best, self.bad_epochs, self.history = state["best"], state["bad_epochs"], state["history"]
        self.best_loss = state.get("best_loss")
        # A raised max_steps (accepted change) after a first run's max_steps cut an epoch short: count the
        # epochs from here, or the loop would end a short epoch early.
        made = self.batch_in_epoch // self.cfg.optim.accumulation_steps  # steps already made in this epoch
        left = math.ceil((self.total_steps - self.step + made) / self.steps_per_epoch)
        self.epochs = max(self.epochs, self.epoch + left)
        self.running_loss.fill_(state["running_loss"])
        self.seconds_before = state.get("train_seconds", 0.0)
        self.running_n = state["running_n"]
        self.running_tasks = {name: [torch.tensor(total, device=self.device), n]
                              for name, (total, n) in state.get("running_tasks", {}).items()}  # fmt: skip
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema"), self.model)

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    def _graceful_stop(self) -> Iterator[None]:
        """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and stops. A second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _write_config(self) -> None:
        """Record the config and data this run uses; on resume first refuse unaccepted data changes."""
        fingerprint = data_fingerprint(self.datasets)
        changed: list[str] = []
        if self.resume:
            saved = self.run.read_data_fingerprint()
            changed = data_changes(saved, fingerprint, self.parts, self.run_dir) if saved is not None else []
            if changed and not self.accept_changes:
                from .rundir import data_refusal

                raise RunDirError(data_refusal(self.run_dir, saved, changed))
        if not self.is_main:
            return
        # the start's, by a fresh run only: a run begun by an older fusionkit has none, and a resume is no start
        env = environment() if self.resume else self.run.write_environment()  # a resume's goes in its log line
        if self.resume:
            self.run.log_resume({"from_step": self.step, "config_changes": self.config_changes,
                                 "data_changes": changed, "environment": env})  # fmt: skip
        if not (self.resume and not self.config_changes and self.run.read_config() is not None):
            self.run.write_config(to_dict(self.cfg))  # a resume that changes nothing leaves the saved config as it is
        self.run.write_data_fingerprint(fingerprint)

    def fit(self) -> dict[str, Any]:
        """Train to the end (or early stop), then evaluate the best checkpoint; returns the summary."""
        if self.is_main:
            self.run.lock()  # a no-op unless fit() runs a second time
        try:
            if self.resume:
                self._load()
            self._write_config()  # on resume, refuses a changed config or data first
            if self.resume:
                log.info("resumed from %s (step %d, %d epochs done)", self.run.last, self.step, self.epoch)
                if self.step >= self.total_steps:  # nothing left: say it, rather than seem to train
                    saved = self.run.file("summary.json")
                    if self.is_main:
                        log.warning("%s had finished (step %d of %d): %s; to train on, raise optim.epochs or "
                                    "optim.max_steps (--accept-changes)", self.run_dir, self.step, self.total_steps,
                                    f"its results stay as written (fusionkit eval {self.run_dir} evaluates it again)"
                                    if saved.is_file() else "its best checkpoint is evaluated")  # fmt: skip
                    if saved.is_file():  # its summary and predictions are the run's record: never rewritten,
                        recorded = json.loads(saved.read_text(encoding="utf-8"))
                        here = _moved_to(recorded, self.run_dir)
                        if here != recorded and self.is_main:  # but for its paths, after a `mv` of the run dir
                            write_atomic(saved, json_text(here, indent=2, ensure_ascii=False))
                        return here
            if self.cfg.run.report_to:
                self.accelerator.init_trackers(self.run_dir.name, config=_scalar_config(to_dict(self.cfg)))
            start = self.fit_start = time.perf_counter()
            log.info("run dir %s: %d train examples, %d steps, %s", self.run_dir, len(self.datasets["train"]),
                     self.total_steps, "cached encoder features" if self.use_features else "end to end")  # fmt: skip
            with self._graceful_stop():
                while self.epoch < self.epochs and self.step < self.total_steps and not self._early_stopped():
                    self._train_epoch()
                    self._end_epoch()  # also when max_steps ended the epoch early: the final eval + checkpoint
            if self._early_stopped() and self.step < self.total_steps and self.is_main:
                log.warning("stopped early after epoch %d of %d: %s did not improve for %d epochs (run.patience)",
                            self.epoch, self.epochs, self.metric, self.cfg.run.patience)  # fmt: skip
            return self._finish(self.seconds_before + time.perf_counter() - start)  # over every session
        except BaseException:
            self._abandon_run()  # before its first checkpoint: nothing to resume, the name is free again
            raise
        finally:
            self.run.unlock()
            self._restore_torch_settings()

    def _early_stopped(self) -> bool:
        return self.cfg.run.patience is not None and self.bad_epochs >= self.cfg.run.patience

    def _train_epoch(self) -> None:
        cfg, model = self.cfg, self.model
        self.train_sampler.set_epoch(self.epoch, self.batch_in_epoch)
        n_batches = self.train_sampler.num_batches()
        model.train()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.epochs}", disable=None if self.progress else True)
        for window in self._windows(bar, n_batches):
            # Each task's loss of a micro-batch is a mean over its own normaliser (labelled rows, their class
            # weights' sum); weighed by that normaliser over the window's total on every rank (x world: DDP averages
            # the ranks' gradients), the window trains as one batch of that size would (HF's num_items_in_batch).
            counts = [{name: task.loss_normaliser(batch["labels"].get(task.label_source),
                                                  batch["label_mask"].get(task.label_source), len(batch["ids"]))
                       for name, task in model.tasks.items()} for batch in window]  # fmt: skip
            totals = dict(zip(model.tasks, D.sum_over_ranks(torch.tensor(
                [sum(c[name] for c in counts) for name in model.tasks], dtype=torch.float64, device=self.device)).tolist()))
            for batch, count in zip(window, counts):
                scales = {name: self.world * n / totals[name] if n else 0.0 for name, n in count.items()}
                losses = self._micro_step(batch, scales, boundary=batch is window[-1])
                self.running_loss += losses["loss"].detach()
                for name in model.tasks if len(model.tasks) > 1 else ():
                    if name in losses:  # its mean times its normaliser: summed over ranks when logged
                        term = self.running_tasks.setdefault(name, [0.0, 0.0])
                        term[0], term[1] = term[0] + losses[name].float() * count[name], term[1] + count[name]
            self.running_n += 1
            self._optimizer_step()
            for callback in self.step_callbacks:
                callback(self)
            if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                # the global batches' loss: each window's total summed over ranks is world x its loss
                avg = float(D.mean_over_ranks(self.running_loss)) / self.running_n
                self.running_loss.zero_()
                self.running_n = 0
                self._log({"step": self.step, "epoch": self.epoch + 1, "train/loss": avg, **self._task_losses(),
                           **self._learned_weights(), "lr": max(self.scheduler.get_last_lr())})  # fmt: skip
                bar.set_postfix(loss=f"{avg:.4f}")
            epoch_done = self.batch_in_epoch == n_batches
            if D.any_rank(self._stop_signal is not None, self.device) and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM  # another rank was told to stop: all stop at this step
            if self._stop_signal is not None:
                self._save()
                name = signal.Signals(self._stop_signal).name
                raise TrainingInterrupted(
                    f"{name}: stopped after step {self.step}; checkpoint saved in {self.run_dir}/last. "
                    "Continue with: " + (f"fusionkit train --resume {self.run_dir}" if not str(cfg.data.dataset).startswith(
                        IN_MEMORY) else f"fusionkit.train(config, data=<the same data>, resume=True), run dir {self.run_dir}"),
                    self._stop_signal,
                )
            if self.step >= self.total_steps:
                break
            if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0 and not epoch_done:
                self._save()
        bar.close()

    def _windows(self, batches: Iterable[dict[str, Any]], n_batches: int) -> Iterator[list[dict[str, Any]]]:
        """The epoch's micro-batches from `batch_in_epoch` on, grouped by optimizer step (accumulation window)."""
        accum, it, b = self.cfg.optim.accumulation_steps, iter(batches), self.batch_in_epoch
        while b < n_batches:
            window = list(itertools.islice(it, min(b - b % accum + accum, n_batches) - b))
            if not window:
                return
            yield window
            b += len(window)

    def _micro_step(self, batch: dict[str, Any], scales: Mapping[str, float], boundary: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch, each task's loss times its share of the window (`scales`)."""
        model = self.model
        batch = move_batch(batch, self.device, self.train_transform)
        self.batch_in_epoch += 1
        # FSDP reduce-scatters every micro-batch's gradients (correct; DDP's no_sync saves the traffic)
        sync = contextlib.nullcontext() if boundary or self.world == 1 or self.fsdp else self.ddp.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                out = self.ddp(**model_inputs(batch))
                losses = model.criterion(out, batch["labels"], batch["label_mask"], scales=scales)
            error = None if torch.isfinite(losses["loss"]) else self._nonfinite_message(losses, batch)
            error = D.first_error(error, self.device)  # one rank's NaN stops every rank (none hangs)
            if error is not None:
                raise NonFiniteLossError(error)
            self.scaler.scale(losses["loss"]).backward()
        return losses

    def _nonfinite_message(self, losses: Mapping[str, torch.Tensor], batch: dict[str, Any]) -> str:
        """Which task(s) gave a NaN/inf loss, where, on which rows, and what to do."""
        bad = [f"{self.model.tasks[name].describe()}: {float(loss)}" for name, loss in losses.items()
               if name != "loss" and not torch.isfinite(loss)]  # fmt: skip
        return (
            f"loss is {losses['loss'].item()}{' from ' + '; '.join(bad) if bad else ''} at epoch {self.epoch + 1}, "
            f"step {self.step + 1} (batch {self.batch_in_epoch} of the epoch); batch ids: {batch['ids']}. The last good "
            f"checkpoint is {self.run.last or 'none'}; lower optim.lr or check these examples."
        )

    def _task_losses(self) -> dict[str, float]:
        """`train/<task>/loss` since the last log line: each task's mean over its normalisers, over every rank."""
        if len(self.model.tasks) < 2:  # its loss is train/loss
            return {}
        names = list(self.model.tasks)
        sums = D.sum_over_ranks(torch.tensor([[float(self.running_tasks.get(n, (0.0, 0.0))[i]) for i in (0, 1)]
                                              for n in names], dtype=torch.float64, device=self.device))  # fmt: skip
        self.running_tasks = {}
        return {f"train/{n}/loss": total / count for n, (total, count) in zip(names, sums.tolist()) if count}

    def _learned_weights(self) -> dict[str, float]:
        """`train/<task>/weight`: the weights uncertainty weighting has learned so far (none under static weights)."""
        criterion = self.model.criterion
        if criterion.weighting != "uncertainty":
            return {}
        return {f"train/{name}/weight": weight for name, weight in criterion.task_weights().items()}

    def _optimizer_step(self) -> None:
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model)

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        entry: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "epoch_end": True}
        improved = False
        if "val" in self.datasets:
            with ema_applied(self.ema, self.model):
                flat, _ = evaluation_metrics(self.model.tasks, self._infer("val"), "val")
            entry.update(flat)
            value = flat.get(self.metric)
            better = higher_is_better(self.metric, self.model.tasks)  # as the task reporting it says
            if value is None:  # e.g. no labelled val row for that task: the latest model is the best we know
                log.warning("%s could not be computed on val (no labelled rows, or too few for it): keeping the latest checkpoint",
                            self.metric)  # fmt: skip
                improved = True
            else:
                loss = flat.get("val/loss")
                # a tie (macro-F1 saturates on a small val split while another task still improves) goes to
                # the lower val/loss, which every task's loss is in
                tie = value == self.best and loss is not None and self.best_loss is not None and loss < self.best_loss
                improved = self.best is None or (value > self.best if better else value < self.best) or tie
            if value is not None and improved:
                self.best, self.best_loss, self.bad_epochs = value, flat.get("val/loss"), 0
            elif value is not None:
                self.bad_epochs += 1
            if self.progress:
                scores = ", ".join(f"{k}={v:.4f}" for k, v in flat.items()) or "no val scores (no labelled val rows)"
                tqdm.write(f"epoch {self.epoch}: {scores}")
        else:
            improved = True  # no val split: the latest model is the best we know
        # ranks computed the same gathered metrics; rank 0's decision is still the one every rank follows
        self.best, self.best_loss, self.bad_epochs, improved = D.broadcast_object(
            (self.best, self.best_loss, self.bad_epochs, improved))
        self._log(entry)
        self._save(best=improved)
        for callback in self.epoch_callbacks:
            callback(entry)

    def _infer(self, split: str) -> dict[str, Any]:
        """The whole split's outputs on every rank: each rank runs its shard, then they are gathered."""
        result = run_inference(self.model, self.eval_loader(split), self.eval_transform, self.amp, split,
                               self.progress)  # fmt: skip
        return result if self.fsdp else D.gather_inference(result, lambda terms: split_loss(self.model, terms))

    def _log(self, entry: dict[str, Any]) -> None:
        """metrics.jsonl always (written with each checkpoint); run.report_to's trackers too."""
        self.history.append(entry)
        if self.accelerator is not None and self.accelerator.trackers:
            numbers = {k: v for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            self.accelerator.log(numbers, step=entry["step"])

    def _finish(self, seconds: float) -> dict[str, Any]:
        """Reload the best checkpoint, evaluate it on val and test, write predictions, plots and summary.json."""
        best_dir = self.run.best or self.run_dir / "best"
        if (best_dir / "model.safetensors").is_file():
            with D.loading_whole_weights(self.model):
                self.model.load_weights(best_dir / "model.safetensors")
        summary: dict[str, Any] = {
            "fusionkit_version": __version__,  # which version wrote it: formats change between versions
            "run_dir": str(self.run_dir.absolute()),  # as a resume writes it: valid from any working directory
            "best_checkpoint": str(best_dir.absolute()),
            "metric": self.metric,
            "best": self.best,
            "epochs": self.epoch,
            "steps": self.step,
            "stopped_early": self._early_stopped() and self.step < self.total_steps,
            "precision": self.precision.name,
            "train_seconds": round(seconds, 2),
            "trainable_parameters": self.model.num_parameters(trainable_only=True),
            "feature_cache": self.use_features,
            "task_weights": self.model.criterion.task_weights(),  # the best checkpoint's: learned, or the config's
        }
        for split in ("val", "test"):
            if split not in self.datasets:
                continue
            result = self._infer(split)
            flat, details = evaluation_metrics(self.model.tasks, result, split)
            summary[split] = {**flat, "details": details}
            if self.is_main:
                replace_file(self.run_dir / f"predictions_{split}.csv", functools.partial(
                    write_predictions, rows=prediction_rows(self.model.tasks, result, true=True)))
                if self.cfg.run.plots:
                    for name, d in details.items():
                        if "confusion" in d:
                            replace_file(self.run_dir / f"confusion_{split}_{name}.png", functools.partial(
                                plot_confusion, np.array(d["confusion"]), d["class_names"],
                                title=f"{name} ({split}, best checkpoint)"))  # fmt: skip
        if self.is_main:
            if self.cfg.run.plots and self.history:
                replace_file(self.run_dir / "curves.png", functools.partial(plot_curves, self.history))
            write_atomic(self.run_dir / "summary.json", json_text(summary, indent=2, ensure_ascii=False))
        for tracker in self.accelerator.trackers if self.accelerator is not None else []:
            tracker.finish()  # not Accelerator.end_training: that would also end the process group
        return summary


def _moved_to(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A finished run's summary with its paths where the run is now: after `mv` of the run dir, the recorded ones
    name a folder that is gone, or another run made there since."""
    recorded, here = Path(summary.get("run_dir") or "."), run_dir.absolute()
    out = {**summary, "run_dir": str(here)}
    with contextlib.suppress(TypeError, ValueError):  # a best checkpoint outside the recorded run dir: as it is
        out["best_checkpoint"] = str(here / Path(summary.get("best_checkpoint")).relative_to(recorded))
    return out


def _scalar_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as flat `section.key: value` scalars, as trackers' hyperparameter tables want it."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and k not in ("config_overrides", "model_kwargs", "params"):
            out.update(_scalar_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
    return out


def train(
    config: TrainConfig | dict[str, Any] | str | Path | None = None,
    resume: bool = False,
    accept_changes: bool = False,
    data: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train from a config (a `TrainConfig`, a dict, a YAML/JSON path); the entry point behind `fusionkit train`.

    `overrides`: dotted keys set on top of the config, as the command line's `--optim.lr 1e-4` does
    (`{"optim.lr": 1e-4, "model.tasks.mood.label_smoothing": 0.1}`); their relative paths are the working directory's.

    `data`: train on an in-memory pandas DataFrame, `datasets.Dataset`/`DatasetDict` or
    `MultimodalDataset` instead of `config.data.dataset`.

    `resume`: continue the run `config` names: its run dir (`train("runs/x", resume=True)`, its config.yaml read
    as `fusionkit train --resume runs/x` does), or a config naming it. `accept_changes`: let a resume go on with a
    config or data that differ from the saved run (recorded in the run dir's resume_log.jsonl); without it such a
    resume is refused.

    Relative paths of a `TrainConfig` or dict are the working directory's; the run saves them absolute, so
    `fusionkit eval RUN` works from anywhere. The given `TrainConfig` is not changed.

    Returns the run's summary, as written to its summary.json: `run_dir`, `best_checkpoint`, `metric` and its
    `best` value, `epochs`, `steps`, and the best checkpoint's `val` and `test` metrics."""
    if resume and isinstance(config, str | Path) and Path(config).expanduser().is_dir():  # a run dir to continue
        return Trainer(run_config(config, overrides), resume=True, accept_changes=accept_changes, data=data).fit()
    # a TrainConfig too goes through build_config: its relative paths resolved, and a copy is trained
    config = build_config(to_dict(config) if isinstance(config, TrainConfig) else config, dict(overrides or {}))
    return Trainer(config, resume=resume, accept_changes=accept_changes, data=data).fit()


def run_config(run_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config a run dir trained with (its config.yaml, paths as the run used them), for the run where it is
    now, with `overrides` on top: what `fusionkit train --resume RUN_DIR` and `train(RUN_DIR, resume=True)` go on
    with."""
    from ..config import load_config_file

    run_dir = Path(os.path.abspath(Path(run_dir).expanduser()))  # `--resume .` inside the run dir: its name
    moved = sorted({"run.name", "run.output_dir", "run.name_exists"} & set(overrides or {}))
    if moved:  # the run stays where it is: a new name or folder would be silently ignored
        raise ConfigError(f"resuming {run_dir} continues that run where it is; {', '.join(moved)} cannot change it "
                          "(copy the run dir elsewhere and resume the copy to move it)")  # fmt: skip
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run dir (no config.yaml)")
    cfg = build_config(load_config_file(run_dir / "config.yaml"), dict(overrides or {}))
    cfg.run.output_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    return cfg
