"""Run-directory outputs: metrics log, PNG plots (loss/metric curves, confusion matrix), prediction files."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Train loss per logged step and every val metric per epoch, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "train/loss" in h]
    evals = [h for h in history if "epoch_end" in h]
    keys = sorted({k for h in evals for k in h if k.startswith("val/") and isinstance(h[k], float)})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2), squeeze=False)
    axes[0, 0].plot([h["step"] for h in train], [h["train/loss"] for h in train], label="train")
    if evals and "val/loss" in evals[0]:
        axes[0, 0].plot([h["step"] for h in evals], [h["val/loss"] for h in evals], "o-", label="val")
    axes[0, 0].set(title="loss", xlabel="step")
    axes[0, 0].legend()
    for ax, key in zip(axes[0, 1:], keys):
        ax.plot([h["epoch"] for h in evals], [h[key] for h in evals], "o-")
        ax.set(title=key, xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(names)),
        yticks=range(len(names)),
        xticklabels=names,
        yticklabels=names,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """`.jsonl` keeps nested probabilities; anything else is CSV with one column per class probability."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        write_jsonl(path, rows)
        return path
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for k, v in row.items():
            if isinstance(v, dict):
                out.update({f"{k}_{name}": p for name, p in v.items()})
            elif isinstance(v, list):  # multilabel names (or several regression targets): a|b, "[]" none, as read
                out[k] = "|".join(str(x) for x in v) if v else "[]"
            else:
                out[k] = v
        flat.append(out)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["id"])
        writer.writeheader()
        writer.writerows(flat)
    return path


def keep_previous(path: Path) -> Path | None:
    """An existing file at an --output is kept as `NAME.~N~` (GNU `cp --backup=numbered`), never lost: it may
    be an earlier result, or a file of the user's that the name happened to match."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size == 0:
        return None
    n = 1
    while (backup := path.with_name(f"{path.name}.~{n}~")).exists():
        n += 1
    try:
        os.link(path, backup)  # the same bytes under a second name; the rename below then replaces only `path`
    except OSError:
        shutil.copy2(path, backup)
    logging.getLogger("fusionkit").warning("%s existed: the previous file is kept as %s", path, backup.name)
    return backup
