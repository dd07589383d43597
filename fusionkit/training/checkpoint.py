"""Crash-safe checkpoints and the RNG state that makes a resumed run bitwise equal to an uninterrupted one.

Layout in a run dir::

    checkpoints/step-00000120/   model (safetensors + config.json) + trainer_state.pt
    last                         text file "checkpoints/step-00000120" (replaced atomically)
    best                         text file "checkpoints/step-00000100"

A checkpoint is written into a temp dir and renamed into place; the `last`/`best` pointers (see
`rundir.py`) are then replaced with `os.replace`. A crash at any moment leaves the previous checkpoint
complete and pointed to.
Training state holds only tensors, numbers and strings, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .rundir import STATE_NAME, RunDir, follow_pointer, saved_checkpoints

FROZEN_WEIGHTS = "frozen_encoders.safetensors"
VERSION_KEY = "fusionkit_version"  # in a checkpoint's config.json (FusionModel.save_pretrained writes it)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (+ CUDA) RNG states as tensors and lists: weights_only-loadable."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, model: Any, state: dict[str, Any], *, best: bool = False, keep: int = 2
) -> Path:
    """Write model + training state for optimizer step `step`, repoint `last` (and `best`), prune old ones."""
    run = RunDir(run_dir)
    root = run.checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final, n = root / f"step-{step:08d}", 1
    while final.exists():  # the same step saved again (epoch end right after a periodic save): a new
        final, n = root / f"step-{step:08d}-{n}", n + 1  # name, so `last` never points at a deleted dir
    for stale in root.glob(".tmp-step-*"):  # left by a run killed mid-write; never linked, safe to drop
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
        from ..models.fusion_model import follow_umask

        follow_umask(tmp)  # mkdtemp's 0700 would hide the checkpoint from a shared run dir's readers
        try:
            model._write_pretrained(tmp, frozen_weights=run_dir / FROZEN_WEIGHTS)  # frozen encoders: once per run
            torch.save(state, tmp / STATE_NAME)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except Exception as e:
        # torch's zip writer reports a full disk as RuntimeError ("unexpected pos 60544 vs 60432"), safetensors as
        # its own SafetensorError ("I/O error: No space left on device"), neither an OSError
        written = ("inline_container", "file write failed", "No space left", "os error 28", "I/O error")
        if not isinstance(e, OSError) and not any(m in str(e) for m in written):
            raise
        previous = run.last
        free = shutil.disk_usage(root).free / 2**20
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e) or "os error 28" in str(e)
        raise OSError(
            getattr(e, "errno", None) or (errno.ENOSPC if full else errno.EIO),  # safetensors' error has no errno
            f"could not write the checkpoint for step {step} under {root} ({reason}; {free:,.0f} MiB free there); "
            + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
            + ". Free space or choose another run.output_dir, then "
            + (f"resume (fusionkit train --resume {run.path})." if previous else
               "run the same command again (a run without a checkpoint is removed: its name is free)."),
        ) from e
    run.set_pointer("last", final)
    if best:
        run.set_pointer("best", final)
    _prune(run, keep)
    return final


def _prune(run: RunDir, keep: int) -> None:
    linked = {p.resolve() for p in (run.last, run.best) if p is not None}
    steps = saved_checkpoints(run.path)  # only folders fusionkit named: the user's own are never deleted
    for old in steps[: max(0, len(steps) - keep)]:
        if old.resolve() not in linked:
            shutil.rmtree(old, ignore_errors=True)


def load_state(checkpoint_dir: Path) -> dict[str, Any]:
    """Training state of a checkpoint dir (or of the one a `last`/`best` pointer names)."""
    path = follow_pointer(checkpoint_dir) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: nothing to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False: never, for a file found on disk
        from ..data.errors import DataError

        raise DataError(
            "holds objects other than tensors, numbers and strings, so it was not loaded (loading them would run "
            f"code the file contains): fusionkit did not write it ({str(e).splitlines()[0]})",
            source=str(path),
            hint="resume from a checkpoint this run saved, or start a new run",
        ) from None
    if isinstance(state.get("optimizer"), dict):  # which fusionkit wrote it, for `check_optimizer_state` to name
        state["optimizer"][VERSION_KEY] = _version(path.parent)
    return state


def _version(checkpoint: Path) -> str | None:
    """The fusionkit version a checkpoint's config.json records (None: unreadable or not recorded)."""
    try:
        return json.loads((checkpoint / "config.json").read_text()).get(VERSION_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Refuse, with the reason, an optimizer state whose parameter groups differ in size from this model's:
    the checkpoint's model had other parameters (an older fusionkit's, before missing-modality placeholders)."""
    old = [len(g["params"]) for g in saved.get("param_groups", [])]
    new = [len(g["params"]) for g in optimizer.param_groups]
    if old == new:
        return
    from .rundir import RunDirError

    version = saved.get(VERSION_KEY)
    diff = sum(new) - sum(old)
    count = f"{abs(diff)} parameter tensors {'fewer' if diff > 0 else 'more'}" if diff else "other parameter groups"
    raise RunDirError(
        f"this checkpoint was written by {f'fusionkit {version}' if version else 'an older version of fusionkit'}, "
        f"whose model had {count} than this version builds ({sum(old)} vs {sum(new)}): its optimizer state cannot "
        "be resumed. Retrain (a new run.name), or evaluate/predict with it: fusionkit eval/predict of the run work"
    )
