"""Task types, one class each (registered by name like the fusion strategies), and label binding.

`bind_labels(ds, tasks)` turns the raw labels a reader found (strings, numbers, lists, None, keyed by
column) into each task's encoded labels, completing the task configs from the data (class names in
order, reconciled by name with the config). Everything downstream (splits, caches, collators, heads,
metrics, predictions) then works on task names and encoded labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, TaskConfig
from .alignment import ContrastiveTask, ImageTextMatchingTask
from .base import (
    TASK_REGISTRY,
    FusionContext,
    Task,
    check_task_names,
    create_task,
    get_task_class,
    list_tasks,
    register_task,
)
from .classification import ClassificationTask
from .multilabel import MultilabelTask
from .regression import RegressionTask
from .supcon import SupConTask

log = logging.getLogger("fusionkit.tasks")

__all__ = [
    "TASK_REGISTRY",
    "ClassificationTask",
    "ContrastiveTask",
    "FusionContext",
    "ImageTextMatchingTask",
    "MultilabelTask",
    "RegressionTask",
    "SupConTask",
    "Task",
    "bind_labels",
    "check_task_names",
    "create_task",
    "fit_train_statistics",
    "get_task_class",
    "list_tasks",
    "register_task",
]


def _columns(ds: Any) -> list[str]:
    seen: dict[str, None] = dict.fromkeys(ds.label_names)
    for ex in ds:
        seen.update(dict.fromkeys(ex.labels))
    return list(seen)


def _row_source(ex: Any, default: str) -> str:
    return ex.meta.get("source", default) if isinstance(ex.meta, dict) else default


def bind_labels(
    ds: Any,
    tasks: Sequence[TaskConfig],
    *,
    require_columns: bool | Literal["any"] = True,
    on_error: str = "raise",
    report_path: str | Path | None = None,
) -> tuple[Any, list[TaskConfig]]:
    """(dataset with labels keyed by task name and encoded, task configs completed from the data).

    `require_columns=False` (prediction on new, unlabelled rows) treats an absent label column as
    all-missing instead of an error; class names must then come from the config (a saved model).
    `"any"` (evaluation): one task's column is enough, the tasks whose column is absent are said and left unscored.
    A row whose label cannot be encoded (outside a configured class list, not a number, infinite)
    raises a `DataError` naming its file:row, or under `on_error="skip"` is reported and that task's
    label left missing: the row and its other tasks' labels stay (a bad mood must not cost the topic).
    """
    from ..data.dataset import Example, MultimodalDataset
    from ..data.errors import DataError, SkipLog, check_policy

    columns = _columns(ds)
    where = getattr(ds, "name", "the data")
    skips = SkipLog(check_policy(on_error), f"labels of {where} (each row stays, without that label)")
    bad: dict[str, set[str]] = {}  # task name -> ids whose label for it was skipped

    def try_encode(task: Task, ex: Any) -> Any:
        if ex.id in bad.get(task.name, ()):
            return None
        try:
            return task.encode(ex.labels.get(task.column), _row_source(ex, where), ex.id)
        except DataError as e:
            skips(e)  # raises under "raise"
            bad.setdefault(task.name, set()).add(ex.id)
            return None

    resolved: list[TaskConfig] = []
    objects: list[Task] = []
    evaluating = require_columns == "any"
    if evaluating:
        labelled = [t for t in map(create_task, tasks) if t.needs_labels]
        absent = [t for t in labelled if t.column not in columns]
        if labelled and len(absent) == len(labelled):
            raise ConfigError(
                f"{where} has none of the label columns of this model's tasks "
                f"({', '.join(f'{t.name}: {t.column!r}' for t in labelled)}); its columns besides those read as caption, "
                f"image and id: {columns or 'none'}. "
                "Name a task's column with --label-column TASK=COLUMN, or use fusionkit predict for unlabelled rows"
            )
        for t in absent:
            log.warning("%s has no column %r: task %s is not scored (fusionkit eval: --label-column %s=COLUMN "
                        "names its column)", where, t.column, t.name, t.name)  # fmt: skip
        require_columns = False
    for cfg in tasks:
        task = create_task(cfg)
        if task.needs_labels:
            present = task.column in columns
            if not present and require_columns:
                hint = (
                    ""
                    if cfg.column
                    else f" (set model.tasks[].column to the column that holds the {cfg.name} labels; "
                    f"fusionkit eval: --label-column {cfg.name}=COLUMN)"
                )
                raise ConfigError(
                    f"task {cfg.name!r} reads its labels from column {task.column!r}, which {where} does not "
                    f"have; its label columns are {columns}{hint}"
                )
            if present and cfg.class_names:  # a fixed class list: a label outside it is a bad row
                for ex in ds:
                    try_encode(task, ex)
            skipped = bad.get(task.name, set())
            values = [ex.labels.get(task.column) for ex in ds if ex.id not in skipped] if present else []
            cfg = task.resolve_schema(values, ds.label_names.get(task.column) or [], where)
            task = create_task(cfg)
        resolved.append(cfg)
        objects.append(task)
    labelled = [t for t in objects if t.needs_labels]
    examples = [Example(ex.id, ex.text, ex.image, {t.name: try_encode(t, ex) for t in labelled}, ex.meta) for ex in ds]
    for t in labelled if evaluating and examples else ():  # its column is there, but not one label in it: said,
        # as for no column (no rows at all, e.g. none of a split's ids in the file, is another matter: said by the caller)
        if t.column in columns and all(ex.labels[t.name] is None for ex in examples):
            log.warning("%s has no label in column %r: task %s is not scored", where, t.column, t.name)
    skips.finish(report_path, len(ds))
    bound = MultimodalDataset(
        examples,
        {t.name: list(t.class_names or []) for t in labelled},
        {t.name: t.type for t in labelled},
        splits=ds.splits,
        name=ds.name,
        skip_report=getattr(ds, "skip_report", None),
    )
    return bound, resolved


def fit_train_statistics(tasks: Sequence[TaskConfig], train: Any) -> list[TaskConfig]:
    """Task options computed from the training split's labels only (e.g. balanced class weights)."""
    out = []
    for cfg in tasks:
        task = create_task(cfg)
        values = [ex.labels.get(cfg.name) for ex in train] if task.needs_labels else []
        out.append(task.fit_train_statistics(values))
    return out
