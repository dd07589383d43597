"""Run-directory outputs: metrics log, PNG plots (loss/metric curves, confusion matrix), prediction files."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..tasks.base import warn_once

log = logging.getLogger("fusionkit.training")


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float as None: JSON has no NaN, and Python's `NaN` token breaks strict
    readers (jq, JavaScript, pandas' engine="ujson")."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_text(value: Any, **kwargs: Any) -> str:
    """Strict JSON (`json.dumps` keywords): a NaN or infinite number (a loss that diverged) is written null."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json_text(row) + "\n")


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss curves, then one panel per task with its val metrics, in rows of at most four panels.

    One panel per metric grew past what a screen shows with a few tasks; per task, a multi-task run still
    reads at a glance. Per-task losses (train solid, val dashed) get their own panel when there are several."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [h for h in history if "train/loss" in h]
    evals = [h for h in history if "epoch_end" in h]
    # in the order the tasks were logged (the config's), not alphabetical
    task_losses = list(dict.fromkeys(k.split("/")[1] for h in history for k in h
                                     if k.count("/") == 2 and k.endswith("/loss")))  # fmt: skip
    metrics: dict[str, list[str]] = {}  # task -> its val metric keys
    for key in dict.fromkeys(k for h in evals for k in h if k.startswith("val/") and isinstance(h[k], float)):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] != "loss":
            metrics.setdefault(parts[1], []).append(key)
    panels = 1 + bool(task_losses) + len(metrics)
    cols = min(4, panels)
    fig, axes = plt.subplots(math.ceil(panels / cols), cols, figsize=(4.2 * cols, 3.3 * math.ceil(panels / cols)),
                             squeeze=False)  # fmt: skip
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)

    def line(ax: Any, rows: Sequence[dict[str, Any]], key: str, x: str, *args: Any, **kwargs: Any) -> None:
        rows = [h for h in rows if key in h]
        if rows:
            ax.plot([h[x] for h in rows], [h[key] for h in rows], *args, **kwargs)

    ax = flat[0]
    line(ax, train, "train/loss", "step", ".-", label="train")  # a marker: one logged point still shows
    line(ax, evals, "val/loss", "step", "o-", label="val")
    ax.set(title="loss (weighted total)" if task_losses else "loss", xlabel="step")
    ax.legend(fontsize="small")
    if task_losses:
        ax = flat[1]
        for i, name in enumerate(task_losses):
            color = f"C{i % 10}"
            line(ax, train, f"train/{name}/loss", "step", ".-", color=color, label=name)
            line(ax, evals, f"val/{name}/loss", "step", "o--", color=color)
        ax.set(title="loss per task (val dashed)", xlabel="step")
        ax.legend(fontsize="x-small", ncol=2 if len(task_losses) > 3 else 1)
    for ax, (name, keys) in zip(flat[1 + bool(task_losses):], metrics.items()):
        def top(k: str) -> float:
            return max(abs(h[k]) for h in evals if k in h)

        # a regression's r2 (about -1..1) beside its errors (mse ~1e4 for prices): its own axis on the right
        apart = [k for k in keys if k.endswith("/r2") and len(keys) > 1 and max(map(top, keys)) > 10]
        scaled = [k for k in keys if k not in apart]
        for i, key in enumerate(scaled):
            line(ax, evals, key, "epoch", "o-", color=f"C{i}", label=key.split("/")[2])
        tops = [top(k) for k in scaled]
        if min(tops) > 0 and max(tops) / min(tops) > 100:  # mse next to mae: one linear axis flattens the smaller
            # a value at or below 0 would vanish from a log axis: linear within [-1, 1] then
            if any(h[k] <= 0 for h in evals for k in scaled if k in h):
                ax.set_yscale("symlog", linthresh=1)
            else:
                ax.set_yscale("log")
        handles = ax.get_legend_handles_labels()
        if apart:
            right = ax.twinx()
            line(right, evals, apart[0], "epoch", "s--", color=f"C{len(scaled)}", label="r2 (right axis)")
            right.set_ylabel("r2")
            more = right.get_legend_handles_labels()
            handles = (handles[0] + more[0], handles[1] + more[1])
        ax.set(title=f"val: {name}", xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(*handles, fontsize="small", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # long class names wrap (and the predicted axis's turn): they must neither overlap nor be cut off
    labels = [textwrap.fill(str(n), 16, break_long_words=True) for n in names]
    # a cell tall enough for its row's wrapped name, and room beside the cells for the widest line of one
    cell = max(1.2, 0.2 * max(label.count("\n") + 1 for label in labels) + 0.4)
    room = 0.1 * max(len(line) for label in labels for line in label.split("\n"))
    fig, ax = plt.subplots(figsize=(cell * len(names) + room + 1.5, cell * len(names) + room + 1.2))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(names)),
        yticks=range(len(names)),
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    turn = any(len(str(n)) > 8 for n in names)  # upright: a wrapped name is narrower than its column
    ax.set_xticklabels(labels, rotation=90 if turn else 0)
    ax.set_yticklabels(labels)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    with warnings.catch_warnings(record=True) as caught:  # a glyph the font lacks: one line, not one per glyph
        warnings.simplefilter("always")
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")  # whatever the labels' size, nothing is cut off
    plt.close(fig)
    if any("missing from font" in str(w.message) for w in caught):
        warn_once(log, ("glyphs", path.name), "%s: some class names hold characters the plot's font lacks (drawn as "
                  "boxes); the names in the run's CSV/JSON files are whole", path.name)  # fmt: skip


def _flat_row(row: dict[str, Any], join_lists: bool) -> dict[str, Any]:
    """One column per class probability (`mood_prob_sad`); lists joined `a|b` ("[]" none, as read) for CSV."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            cells = {f"{k}_{name}": p for name, p in v.items()}
        elif isinstance(v, list) and join_lists:  # multilabel names (or several regression targets)
            cells = {k: "|".join(str(x) for x in v) if v else "[]"}
        else:
            cells = {k: v}
        taken = sorted((out.keys() | row.keys() - {k}) & cells.keys())
        if taken:  # a probability column named like another key: never written over
            raise ValueError(f"prediction column(s) {taken} would be written twice (from {k!r} and another key); "
                             "rename the task whose name makes them")  # fmt: skip
        out.update(cells)
    return out


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """`.jsonl` keeps nested probabilities; `.parquet` has CSV's columns, lists kept as lists; anything else is CSV
    with one column per class probability."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        write_jsonl(path, rows)
        return path
    flat = [_flat_row(row, join_lists=suffix != ".parquet") for row in rows]
    if suffix == ".parquet":
        import pyarrow as pa  # a dependency of datasets
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(flat) if flat else pa.table({"id": pa.array([], pa.string())}), path)
        return path
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["id"])
        writer.writeheader()
        writer.writerows(flat)
    return path


def backup_number(*paths: Path) -> int:
    """The first N for which no `PATH.~N~` exists for any of `paths`: a file and its companions (vectors and
    their ids file) are kept under one number, so that each backup's companion is found by its name."""
    n = 1
    while any(os.path.lexists(path.with_name(f"{path.name}.~{n}~")) for path in paths):  # a dangling link too
        n += 1
    return n


def keep_previous(path: Path, number: int | None = None) -> Path | None:
    """An existing file at an --output is kept as `NAME.~N~` (GNU `cp --backup=numbered`), never lost: it may
    be an earlier result, or a file of the user's that the name happened to match. `number`: the N to use
    (`backup_number` of the file and its companions); by default the first free one for `path` alone."""
    link = path.is_symlink()  # the user's link (dangling or not) is theirs too: kept as a link, its target untouched
    if not link and (not path.is_file() or path.stat().st_size == 0):
        return None
    backup = path.with_name(f"{path.name}.~{number}~")
    if number is None or os.path.lexists(backup):  # never replaces an earlier backup
        backup = path.with_name(f"{path.name}.~{backup_number(path)}~")
    if link:
        os.symlink(os.readlink(path), backup)
    else:
        try:
            os.link(path, backup)  # the same bytes under a second name; the rename below then replaces only `path`
        except OSError:
            shutil.copy2(path, backup)
    what = f"the symlink to {os.readlink(path)}" if link else "the previous file"
    logging.getLogger("fusionkit").warning("%s existed: %s is kept as %s", path, what, backup.name)
    return backup
