"""Evaluation metrics and prediction rows of a whole split, delegated to each task's own class.

`run_inference` (trainer.py) collects per-example outputs, labels and masks; these functions turn
them into flat scalar metrics (`"val/sentiment/macro_f1"`), details (per-class reports, confusion
matrices labelled with class names) and one prediction row per example (label names + probabilities).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import ConfigError
from ..tasks import Task
from ..tasks.base import quiet, warn_once

log = logging.getLogger("fusionkit.training")


def metric_task(metric: str, tasks: Mapping[str, Task]) -> tuple[str, str] | None:
    """(task, metric name) of `<split>/<task>/<name>`, the task found by its name (not by splitting on '/', which
    a saved model's task name may hold); None for the split's total `<split>/loss` or a metric of no task."""
    rest = metric.partition("/")[2]
    for name in sorted(tasks, key=len, reverse=True):  # the longest first: `mood/v2` before `mood`
        if rest.startswith(f"{name}/") and len(rest) > len(name) + 1:
            return name, rest[len(name) + 1 :]
    return None


def higher_is_better(metric: str, tasks: Mapping[str, Task]) -> bool:
    """The direction of `metric` (`val/loss`, `val/<task>/<name>`) as the task reporting it declares it
    (`Task.lower_is_better`): a plugin's own error metric ranks like mse, not like an accuracy. Losses: lower."""
    if metric.partition("/")[2] == "loss":
        return False
    found = metric_task(metric, tasks)
    if found is None:
        raise ConfigError(f"metric {metric!r} names no task of this model; its tasks: {list(tasks)}")
    task, name = found
    return name != "loss" and tasks[task].higher_is_better(name)


def default_metric(tasks: Mapping[str, Task]) -> str:
    """The metric early stopping watches unless `run.metric` says otherwise: the first classification task's
    (its macro-F1), else the default of the first task that reports one (an auxiliary loss such as supcon reports
    no metric of its own), else `val/loss`. The order of the tasks list does not pick a regression over a class."""
    ranked = sorted(tasks.items(), key=lambda item: not item[1].selects_first)  # stable: list order within
    for name, task in ranked:
        if task.default_metric in task.metric_names:
            return f"val/{name}/{task.default_metric}"
    return "val/loss"


def check_metric(metric: str, tasks: Mapping[str, Task]) -> None:
    """Fail before any training if `run.metric` names no task or a metric its task does not report."""
    parts = metric.split("/")
    if parts == ["val", "loss"]:
        return
    # with several tasks each one's own loss is reported too (`val/<task>/loss`), and can select checkpoints
    own_loss = ("loss",) if len(tasks) > 1 else ()
    known = ["val/loss"] + [f"val/{n}/{m}" for n, t in tasks.items() for m in (*t.metric_names, *own_loss)]
    if metric not in known:
        raise ConfigError(f"run.metric {metric!r} is not a metric this model reports; choose one of {known}")


def evaluation_metrics(
    tasks: Mapping[str, Task], result: Mapping[str, Any], prefix: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """Flat scalar metrics (`"val/sentiment/macro_f1"`) and details (per-class reports, confusion matrices)."""
    flat: dict[str, float] = {}
    details: dict[str, Any] = {}
    if result.get("loss") is not None:
        flat[f"{prefix}/loss"] = result["loss"]
        terms = result.get("loss_terms", {})
        if len(terms) > 1:  # each task's own loss over its labelled rows (the total weighs them)
            flat.update({f"{prefix}/{name}/loss": total / n for name, (total, n) in terms.items() if n})
    for name, task in tasks.items():
        if name not in result["outputs"]:
            continue
        m, d = task.metrics(result["outputs"][name], result["labels"].get(name), result["label_mask"].get(name))
        flat.update({f"{prefix}/{name}/{k}": v for k, v in m.items()})
        left_out = unscored_classes(d)
        if left_out:
            d["macro_avg_leaves_out"] = left_out
            warn_unscored_classes(name, left_out, len(d["class_names"]), prefix)
        if d:
            details[name] = d
    return flat, details


# the groups of rows by the sides they have, as `run_inference`'s "present" flags give them
SIDE_GROUPS = {"caption and image": (True, True), "caption only": (True, False), "image only": (False, True)}


def scores_by_sides(tasks: Mapping[str, Task], result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Where some rows lack a caption or an image: per group of rows (`SIDE_GROUPS`) its row count and each task's
    metrics on it (`task/metric`), so a model's one-sided predictions are scored apart from its complete ones.
    Empty when every row has both sides."""
    present = result.get("present") or {}
    if "caption" not in present or "image" not in present or bool((present["caption"] & present["image"]).all()):
        return {}
    groups: dict[str, dict[str, Any]] = {}
    with quiet("fusionkit.tasks"):  # a group's own warnings (r2 of one row) would mislead: the split's were said
        for group, (caption, image) in SIDE_GROUPS.items():
            rows = (present["caption"] == caption) & (present["image"] == image)
            if not bool(rows.any()):
                continue
            entry: dict[str, Any] = {"rows": int(rows.sum())}
            for name, task in tasks.items():
                if name in result["outputs"] and name in result["labels"]:
                    mask = result["label_mask"][name][rows]
                    scores, _ = task.metrics(result["outputs"][name][rows], result["labels"][name][rows], mask)
                    # how many of the group's rows each score rests on: a one-row group's macro-F1 means little
                    entry.update({f"{name}/labelled": int(mask.sum()), **{f"{name}/{k}": v for k, v in scores.items()}})
            groups[group] = entry
    return groups


def unscored_classes(details: Mapping[str, Any]) -> list[str]:
    """The classes a task's per-class report scores as None: neither labelled nor predicted in the split, so its
    macro averages (macro_f1) leave them out rather than count them as 0."""
    report = details.get("report", {})
    return [c for c in details.get("class_names", ()) if report.get(c, {}).get("f1-score", 0) is None]


def warn_unscored_classes(task: str, classes: Sequence[str], total: int, split: str) -> None:
    """Say, once per task, split and classes in a run or command (`warn_once`), that a split's macro average
    covers fewer classes than the task has (for every split scored: val at each epoch, test, `fusionkit eval`)."""
    warn_once(log, ("unscored", task, split, tuple(classes)), "task %s: class(es) %s have no labelled or predicted "
              "row in %s: its macro_f1 averages %d of %d classes, and their per-class scores are null", task,
              list(classes), split, total - len(classes), total)  # fmt: skip


def prediction_rows(tasks: Mapping[str, Task], result: Mapping[str, Any], true: bool = False) -> list[dict[str, Any]]:
    """One row per example: id, then per task its predicted label(s) and class probabilities, and with `true` the
    row's label (`mood_true`: empty where it has none) where the split has the task's labels."""
    rows: list[dict[str, Any]] = [{"id": i} for i in result["ids"]]
    for name, task in tasks.items():
        if name in result["outputs"]:
            preds = task.predict(result["outputs"][name])
            if true and task.needs_labels and name in result.get("labels", {}):
                labels = task.true_labels(result["labels"][name], result["label_mask"][name])
                preds = [{**p, f"{name}_true": y} for p, y in zip(preds, labels)]
            for row, pred in zip(rows, preds):
                taken = sorted(row.keys() & pred.keys())
                if taken:  # another task's (or the id): never overwritten (`check_task_names` refuses such names)
                    raise ConfigError(f"{task.describe()} predicts {taken}, which the prediction row already holds "
                                      f"(the id or another task's): rename the task")  # fmt: skip
                row.update(pred)
    return rows
