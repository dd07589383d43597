"""The `Task` base class and its registry: one class per task type owns everything about that task.

A task knows its label schema (source column, class names in order, or float targets), how raw labels
from any reader are parsed and collated, its head, its loss, its predictions (label names +
probabilities), its metrics and the metric early stopping watches by default. Adding a task type is
one new file with one `@register_task` class; nothing else in the package tests a task's type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, TaskConfig
from ..data.dataset import MISSING_SPELLINGS
from ..data.errors import DataError
from ..registry import Registry

TASK_REGISTRY: Registry[type[Task]] = Registry("task type", "type")
register_task = TASK_REGISTRY.register


def list_tasks() -> list[str]:
    """Names a task's `type` takes: the built-ins and every task type registered so far."""
    return list(TASK_REGISTRY)


def get_task_class(type_name: str) -> type[Task]:
    return TASK_REGISTRY.get_class(type_name)


def create_task(cfg: TaskConfig) -> Task:
    return get_task_class(cfg.type)(cfg)


@dataclass
class FusionContext:
    """What a task's `forward` may read: the fusion's views and the projected token sequences.

    `fuse(text, text_mask, image)` re-runs the fusion (image-text matching scores shuffled pairs).
    `paired` (bool [B] or None = all) marks rows that have both modalities: only they can be matched.
    """

    views: torch.Tensor
    text: torch.Tensor | None
    text_mask: torch.Tensor | None
    image: torch.Tensor | None
    fuse: Callable[..., torch.Tensor]
    paired: torch.Tensor | None = None
    # bool [B, V]: views built from a present modality (late fusion); heads average those only. None = all.
    view_mask: torch.Tensor | None = None




_SAID: set[Any] = set()  # warnings said in this scope (a training run, a CLI command)


def warn_once(logger: logging.Logger, key: Any, message: str, *args: Any) -> None:
    """Say `message` once per scope: a split scored every epoch says it once, and the next run in the same
    process (a notebook, tune's trials, `cli.main` called again) says it again (`new_warning_scope`)."""
    if key not in _SAID:
        _SAID.add(key)
        logger.warning(message, *args)


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Only errors from these loggers (and their children) while the block runs: work whose warnings are not about
    what the user asked for (another split's rows, a group's own). Their levels come back after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def new_warning_scope() -> None:
    """Start a scope of `warn_once` (the trainer and each CLI command do)."""
    _SAID.clear()


def is_missing(value: Any) -> bool:
    """Empty cell, None, NaN or a missing-value spelling ("NA", "n/a", "null"): no label for this task on this row."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip() or value.strip().lower() in MISSING_SPELLINGS
    if isinstance(value, float):
        return math.isnan(value)
    return False


def warn_missing_spellings(
    task: str, values: Sequence[Any], where: str, listed: Sequence[str] = (), classes: bool = True
) -> None:
    """Cells spelled like a missing value ("None", "n/a") are missing labels: said once per task, so a class
    meant by such a word is found (a class listed in `listed`, i.e. class_names, stays a class)."""
    spelled = Counter(v.strip() for v in values
                      if isinstance(v, str) and v.strip() and is_missing(v) and v.strip() not in listed)  # fmt: skip
    if spelled:
        logging.getLogger("fusionkit.tasks").warning(
            "task %s: %d labels %s in %s are read as missing%s", task, sum(spelled.values()), sorted(spelled), where,
            "; if one is a class, list it in model.tasks[].class_names" if classes else "")  # fmt: skip


# in a task name: a path separator or a control character (NUL) would turn its files' names into paths or worse
UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")
ID_KEY = "id"  # a prediction row's own key, before any task's


def _rename_hint(cfg: TaskConfig) -> str:
    """The fix for a task name that cannot be used: another name, the same label column."""
    safe = UNSAFE_NAME.sub("_", cfg.name).replace(".", "_")
    fixed = {"name": safe if safe != cfg.name else f"{safe}_", "column": cfg.column or cfg.name}
    return f"name the task otherwise and keep its column: {json.dumps(fixed, ensure_ascii=False)}"


def _keys_overlap(a: str, b: str) -> bool:
    """Whether two prediction keys can be one column (a key ending in '*' stands for every key it starts)."""
    a_any, b_any = a.endswith("*"), b.endswith("*")
    a, b = a.removesuffix("*"), b.removesuffix("*")
    return a == b or (a_any and b.startswith(a)) or (b_any and a.startswith(b))


def check_task_names(tasks: Sequence[Task]) -> None:
    """Refuse, before any work, a task named `id` or two tasks whose predictions write one key or column
    (`mood` and `mood_prob`, or `mood_prob_sad`): one would overwrite the other in each prediction row
    (predictions_*.csv, `fusionkit predict`, `model.predict`) without a word. Each task says which keys its
    `predict` writes (`Task.prediction_keys`)."""
    for task in tasks:
        if task.name == ID_KEY:
            raise ConfigError(f"task name 'id' is the id column of prediction files; {_rename_hint(task.cfg)}")
    for i, task in enumerate(tasks):
        for other in tasks[i + 1 :]:
            clash = next(((a, b) for a in task.prediction_keys() for b in other.prediction_keys()
                          if _keys_overlap(a, b)), None)  # fmt: skip
            if clash is not None:
                rename = json.dumps({"name": "NEW_NAME", "column": other.column}, ensure_ascii=False)
                raise ConfigError(
                    f"tasks {task.name!r} and {other.name!r} would write the same prediction column ({task.name}: "
                    f"{clash[0]}, {other.name}: {clash[1]}; '*' stands for a class name): one would overwrite the "
                    f"other in predictions. Rename one and keep its labels' column, e.g. {rename}"
                )


class Task:
    """Base class. Subclasses set `needs_labels`, `default_metric` and override what their type does."""

    type: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = True
    default_metric: ClassVar[str] = "loss"
    # its default metric picks the best checkpoint before other tasks' do (classification: the task users mean)
    selects_first: ClassVar[bool] = False
    # its one class per row stratifies a new split (the first such task's): a subclass (a plugin's) does too
    stratifies: ClassVar[bool] = False
    # it trains each side's projection apart from the fusion (contrastive): a baseline's unread side's too
    reads_sides_apart: bool = False
    metric_names: ClassVar[tuple[str, ...]] = ()
    lower_is_better: ClassVar[tuple[str, ...]] = ("loss",)
    # `fusionkit tune`'s default space for this task's own options (TaskConfig field -> distribution)
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}
    # The TaskConfig loss options this type reads; setting another one is an error, not a silent no-op.
    loss_options: ClassVar[tuple[str, ...]] = ()
    params_read: ClassVar[tuple[str, ...]] = ()  # the `params` keys this task type reads
    # the `params` keys it computes from the data (`fit_train_statistics`): a resume keeps the run's, as its classes
    derived_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    @classmethod
    def hf_feature(cls, class_names: Sequence[str]) -> Any:
        """The `datasets` feature of this task's label column (`MultimodalDataset.to_hf`); None: as HF infers it."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, column={self.column!r})"

    def describe(self) -> str:
        """`task 'stars' (type 'nanreg', class mymod.NanReg)`: what an error names (the class only for a plugin's
        task, whose code is the user's to fix)."""
        cls = type(self)
        plugin = "" if cls.__module__.startswith("fusionkit.") else f", class {cls.__module__}.{cls.__qualname__}"
        return f"task {self.name!r} (type {self.cfg.type!r}{plugin})"

    # ------------------------------------------------------------------ config and schema
    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def column(self) -> str:
        return self.cfg.label_column

    # task types whose labels this task can borrow through `label_source` (empty: it uses its own)
    label_source_types: ClassVar[tuple[str, ...]] = ()

    @property
    def label_source(self) -> str:
        """The task whose collated labels `loss` receives: its own; auxiliary tasks (supcon) borrow another's."""
        return self.name

    @property
    def class_names(self) -> list[str] | None:
        return self.cfg.class_names

    @property
    def num_classes(self) -> int | None:
        return self.cfg.num_classes

    @classmethod
    def validate_config(cls, cfg: TaskConfig) -> None:
        """Raise `ConfigError` for impossible options; called by `ModelConfig.validate`."""
        if not cfg.name or not isinstance(cfg.name, str):
            raise ConfigError(f"task name must be a non-empty string, got {cfg.name!r}")
        # heads are a ModuleDict keyed by task name; "loss" is the total's key in losses and metrics
        if "." in cfg.name or cfg.name == "loss" or hasattr(nn.ModuleDict(), cfg.name):
            raise ConfigError(f"task name {cfg.name!r} cannot name a model part ('.', 'loss' or a torch Module "
                              f"attribute); {_rename_hint(cfg)}")  # fmt: skip
        # it names the run's files (confusion_val_<task>.png) and is a part of metric keys (val/<task>/macro_f1)
        if UNSAFE_NAME.search(cfg.name):
            raise ConfigError(f"task name {cfg.name!r} cannot hold '/', '\\' or control characters: it names files "
                              f"of the run (confusion_val_<task>.png) and metrics (val/<task>/<metric>); "
                              f"{_rename_hint(cfg)}")  # fmt: skip
        if not math.isfinite(cfg.weight) or cfg.weight < 0:
            raise ConfigError(f"task {cfg.name!r}: weight must be a finite number >= 0, got {cfg.weight}")
        unknown = sorted(set(cfg.params) - set(cls.params_read))
        if unknown:
            reads = f"it reads {list(cls.params_read)}" if cls.params_read else "it reads none"
            raise ConfigError(f"task {cfg.name!r}: unknown params {unknown}: a {cfg.type} task would ignore them ({reads})")
        defaults = {"class_weights": None, "label_smoothing": 0.0, "logit_adjustment": 0.0, "class_prior": None}
        unread = [k for k, v in defaults.items() if getattr(cfg, k) != v and k not in cls.loss_options]
        if unread:
            reads = f"it reads {', '.join(cls.loss_options)}" if cls.loss_options else "it reads none of them"
            raise ConfigError(f"task {cfg.name!r}: {', '.join(unread)} would be ignored by a {cfg.type} task "
                              f"({reads}); remove them")  # fmt: skip

    def resolve_schema(self, values: Sequence[Any], declared: Sequence[str], where: str) -> TaskConfig:
        """The task config completed from the data (class names etc.); label-free tasks need nothing."""
        return self.cfg

    def encode(self, value: Any, where: str, item: str) -> Any:
        """A raw label (any reader) -> the stored label (index, list of indices, float) or None if missing."""
        return None

    def collate(self, values: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stored labels of a batch -> (target tensor, bool mask [B] of labelled rows); None: no labels."""
        return None

    def fit_train_statistics(self, values: Sequence[Any]) -> TaskConfig:
        """Options computed from the training labels (e.g. balanced class weights); default: none."""
        return self.cfg

    # ------------------------------------------------------------------ model
    def build_head(self, dim: int, num_views: int, dropout: float) -> nn.Module:
        raise NotImplementedError

    def forward(self, head: nn.Module, ctx: FusionContext) -> torch.Tensor:
        return head(ctx.views, ctx.view_mask)

    def loss(
        self, output: torch.Tensor, target: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Mean loss over the labelled rows; None when nothing in the batch can be scored."""
        raise NotImplementedError

    def loss_normaliser(self, target: torch.Tensor | None, mask: torch.Tensor | None, rows: int) -> float:
        """What `loss` averages over in a batch of `rows` rows: its labelled rows (a label-free task: every row).

        The trainer weighs each micro-batch's loss by this over the accumulation window's total (over every process),
        as HF's `num_items_in_batch`, so that accumulation and a batch split over processes train like one batch of
        that size. A loss that is a weighted mean (class weights) returns the sum of its rows' weights."""
        if not self.needs_labels:
            return float(rows)
        if target is None:
            return 0.0
        return float(rows if mask is None else mask.sum())

    # ------------------------------------------------------------------ evaluation and prediction
    def eval_output(self, output: torch.Tensor) -> torch.Tensor:
        """What evaluation keeps per example (per-row scores; batch-shaped outputs are reduced here)."""
        return output.float()

    def metrics(
        self, outputs: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """(flat scalar metrics, details such as per-class reports and confusion matrices)."""
        return {}, {}

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One evaluation output from several models' (an ensemble, e.g. seeds): their mean.

        Tasks with probabilities average those instead and return outputs that give the mean back; decisions
        (ITM's correct/incorrect) average to the share of models that got each one right."""
        return torch.stack([o.float() for o in outputs]).mean(0)

    def predict(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """Per example `{task: label(s) or value, f"{task}_prob": {class: p}}`; empty for label-free tasks."""
        return [{} for _ in range(len(outputs))]

    def true_labels(self, labels: torch.Tensor, mask: torch.Tensor) -> list[Any]:
        """Each row's label as its predictions name it (None where it has none): the run's predictions files write
        it beside the prediction (`mood_true`), for error analysis."""
        return [None] * len(labels)

    def prediction_keys(self) -> tuple[str, ...]:
        """The keys `predict` (and `true_labels`, as `{task}_true`) write per example, for `check_task_names`; a key
        ending in '*' stands for every key it starts (the CSV columns a dict of probabilities becomes:
        `mood_prob_sad`). Override it with `predict`."""
        return (self.name, f"{self.name}_prob", f"{self.name}_prob_*", f"{self.name}_true") if self.needs_labels else ()

    def higher_is_better(self, metric: str) -> bool:
        return metric not in self.lower_is_better


TASK_REGISTRY.base = Task  # set here: the registry is made before the class it checks


def labelled_rows(
    output: torch.Tensor, target: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output, target) restricted to the rows that have a label; None when the batch has none."""
    if target is None or (mask is not None and not bool(mask.any())):
        return None
    return (output[mask], target[mask]) if mask is not None else (output, target)


def float32_values(values: torch.Tensor) -> Any:
    """float32 numbers (a tensor of any shape) as (nested lists of) Python floats, each the shortest decimal that
    is that float32 (0.3, not 0.30000001192092896; 1.2e-09, not 0.0): exact, and short in CSV and JSONL."""
    array = values.detach().float().cpu().numpy()
    return array.astype(str).astype(np.float64).tolist()  # numpy's str of a float32: its shortest repr


def replace(cfg: TaskConfig, **changes: Any) -> TaskConfig:
    return dataclasses.replace(cfg, **changes)


def label_error(problem: str, where: str, item: str, hint: str = "") -> DataError:
    return DataError(problem, source=where, item=item, hint=hint)
