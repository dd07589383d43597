"""Task types, one class each (registered by name like the fusion strategies), and label binding.

`bind_labels(ds, tasks)` turns the raw labels a reader found (strings, numbers, lists, None, keyed by
column) into each task's encoded labels, completing the task configs from the data (class names in
order, reconciled by name with the config). Everything downstream (splits, caches, collators, heads,
metrics, predictions) then works on task names and encoded labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import ConfigError, TaskConfig
from .alignment import ContrastiveTask, ImageTextMatchingTask
from .base import (
    TASK_REGISTRY,
    FusionContext,
    Task,
    create_task,
    get_task_class,
    list_tasks,
    register_task,
)
from .classification import ClassificationTask
from .multilabel import MultilabelTask
from .regression import RegressionTask

__all__ = [
    "TASK_REGISTRY",
    "ClassificationTask",
    "ContrastiveTask",
    "FusionContext",
    "ImageTextMatchingTask",
    "MultilabelTask",
    "RegressionTask",
    "Task",
    "bind_labels",
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


def bind_labels(
    ds: Any, tasks: Sequence[TaskConfig], *, require_columns: bool = True
) -> tuple[Any, list[TaskConfig]]:
    """(dataset with labels keyed by task name and encoded, task configs completed from the data).

    `require_columns=False` (prediction on new, unlabelled rows) treats an absent label column as
    all-missing instead of an error; class names must then come from the config (a saved model).
    """
    from ..data.dataset import Example, MultimodalDataset

    columns = _columns(ds)
    where = getattr(ds, "name", "the data")
    resolved: list[TaskConfig] = []
    objects: list[Task] = []
    for cfg in tasks:
        task = create_task(cfg)
        if task.needs_labels:
            present = task.column in columns
            if not present and require_columns:
                hint = (
                    ""
                    if cfg.column
                    else f" (set model.tasks[].column to the column that holds the {cfg.name} labels)"
                )
                raise ConfigError(
                    f"task {cfg.name!r} reads its labels from column {task.column!r}, which {where} does not "
                    f"have; its label columns are {columns}{hint}"
                )
            values = [ex.labels.get(task.column) for ex in ds] if present else []
            cfg = task.resolve_schema(values, ds.label_names.get(task.column) or [], where)
            task = create_task(cfg)
        resolved.append(cfg)
        objects.append(task)
    labelled = [t for t in objects if t.needs_labels]
    examples = []
    for ex in ds:
        src = ex.meta.get("source", where) if isinstance(ex.meta, dict) else where
        labels = {t.name: t.encode(ex.labels.get(t.column), src, ex.id) for t in labelled}
        examples.append(Example(ex.id, ex.text, ex.image, labels, ex.meta))
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
