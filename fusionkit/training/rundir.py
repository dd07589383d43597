"""`RunDir`: one training run's directory, its layout, its lock and its pointers to the last/best checkpoint.

Layout::

    run.lock                     flock'ed by the one live writer (holds its pid while it runs)
    config.yaml, config.json     the resolved config actually used (rewritten when a resume accepts changes)
    data_fingerprint.json        per split: the data's fingerprint; per task: the label schema
    resume_log.jsonl             one line per resume: from which step, what changed and was accepted
    split.json, metrics.jsonl, summary.json, predictions_*.csv, *.png, skipped_rows.jsonl
    checkpoints/step-00000120/   model (safetensors + config.json) + trainer_state.pt
    last, best                   small text files naming a checkpoint: "checkpoints/step-00000120"

Promises: a fresh run never writes into a directory that holds anything (it refuses, or with
`run.name_exists="increment"` takes `name-1`, `name-2`, ... and says so); a second live writer is
refused while the first holds the lock (a lock left by a killed process is taken over with a
warning, since `flock` dies with its holder); pointers are plain files, so a run dir copied by zip,
cloud sync or `cp -rL` still resumes. Run dirs from older versions (`last`/`best` symlinks) are read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..store import append_atomic, replace_file, write_atomic  # noqa: F401  (run files are written whole)

log = logging.getLogger("fusionkit.training")

LOCK = "run.lock"
POINTERS = ("last", "best")
CHECKPOINTS = "checkpoints"
NAME_EXISTS = ("error", "increment")
# The checkpoint folders fusionkit writes: step-00000120, or step-00000120-1 for the same step saved twice.
# Anything else under checkpoints/ (`step-00000120-keep`, `step-00000120 (copy)`) is the user's: never pruned.
CHECKPOINT_NAME = re.compile(r"step-(\d{8})(?:-\d+)?")
STATE_NAME = "trainer_state.pt"
# what a resume reads from its `last` checkpoint: the model (as `FusionModel.from_pretrained`) and the trainer state
RESUME_FILES = ("config.json", "model.safetensors", STATE_NAME)
RUN_FILES = frozenset({
    LOCK, *POINTERS, CHECKPOINTS, "config.yaml", "config.json", "data_fingerprint.json", "resume_log.jsonl",
    "environment.json",
    "split.json", "metrics.jsonl", "summary.json", "skipped_rows.jsonl", "skipped_labels.jsonl", "curves.png",
})  # fmt: skip
RUN_FILE_PREFIXES = ("predictions_", "confusion_")
# Config keys a resume may change without asking: where and how the run executes, not what it learns.
OPERATIONAL_KEYS = frozenset({
    "run.output_dir", "run.name", "run.name_exists", "run.device", "run.progress", "run.plots",
    "run.log_every", "run.checkpoint_every", "run.keep_checkpoints",
    "data.num_workers", "data.num_proc", "data.cache_dir", "optim.eval_batch_size",
})  # fmt: skip


class RunDirError(ValueError):
    """A run dir cannot be used as asked: it holds another run, another process writes it, or it changed."""


class RunDir:
    """Paths of one run, its writer lock and its `last`/`best` pointers. `RunDir(path)` only names it;
    `create` / `open_for_resume` also take the lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def file(self, name: str) -> Path:
        """`config.json`, `split.json`, `summary.json`, ...: every file of the run lives directly in it."""
        return self.path / name

    # ------------------------------------------------------------------ creating / opening
    @classmethod
    def create(cls, output_dir: str | Path, name: str | None, name_exists: str = "error") -> RunDir:
        """A new, empty, locked run dir `output_dir/name` (default name: a timestamp).

        If that dir already holds something, `name_exists="error"` refuses and says what to do;
        `"increment"` takes the first free `name-1`, `name-2`, ... (a default timestamp name always does).
        """
        if name_exists not in NAME_EXISTS:
            raise RunDirError(f"run.name_exists must be one of {NAME_EXISTS}, got {name_exists!r}")
        outer = run_dir_holding(output_dir)
        if outer is not None:  # a run's folder holds that run's files only (its eval, predict and resume read it)
            raise RunDirError(f"run.output_dir {output_dir} is inside the run dir {outer}; choose a folder outside it")
        base = name or time.strftime("%Y%m%d-%H%M%S")
        increment = name is None or name_exists == "increment"
        for n in range(10_000):
            run = cls(Path(output_dir) / (base if n == 0 else f"{base}-{n}"))
            if run.path.exists() and not run.path.is_dir():  # a file of that name: never a run dir
                if increment:
                    continue
                raise RunDirError(f"{run.path} is a file, not a run dir; fusionkit never replaces it: choose "
                                  "another run.name, or set run.name_exists=increment to get a fresh numbered dir")  # fmt: skip
            if run.holds_run() and not increment:
                live = run.live_writer()
                if live is not None:
                    raise RunDirError(f"{run.path} is being written by another live training ({live}); wait "
                                      f"for it to finish, or choose another run.name{_own_hint(live)}")  # fmt: skip
                if not any(n in RUN_FILES or n.startswith(RUN_FILE_PREFIXES) for n in run.contents()):
                    raise RunDirError(f"{run.path} holds other files ({', '.join(run.contents()[:5])}), not a run; "
                                      "fusionkit never writes a run into it: choose another run.name or run.output_dir")  # fmt: skip
                started = not {"last", CHECKPOINTS, "summary.json"} & set(run.contents())
                raise RunDirError(
                    f"{run.path} already holds a run ({', '.join(run.contents()[:5])}); fusionkit never writes "
                    "a new run into it. "
                    + (f"Continue it with `fusionkit train --resume {run.path}` (from Python: fusionkit.train("
                       f"'{run.path}', resume=True), with data= as before), choose " if not started else
                       "It stopped before its first checkpoint: delete the dir if you do not need it, or choose ")
                    + "another run.name, or set run.name_exists=increment to get a fresh numbered dir"
                )
            if run.holds_run():
                continue
            try:
                run.lock()
            except RunDirError:  # a live run is starting there right now
                if not increment:
                    raise
                continue
            if run.holds_run():  # filled between the check and the lock by a run that has finished since
                run.unlock()
                if not increment:
                    raise RunDirError(f"{run.path} was filled by another run while this one started")
                continue
            if n and name is not None:
                log.warning("run dir %s already holds a run; writing this one to %s", run.path.parent / base,
                            run.path)  # fmt: skip
            return run
        raise RunDirError(f"no free run dir name {base}-N under {output_dir}")

    @classmethod
    def open_for_resume(cls, path: str | Path) -> RunDir:
        """The existing run at `path`, locked, with a `last` checkpoint to continue from."""
        run = cls(path)
        if not run.path.is_dir():
            raise FileNotFoundError(f"nothing to resume: {run.path} does not exist")
        if run.last is None:
            left = saved_checkpoints(run.path)
            if left:  # the pointer was deleted, the checkpoints were not: say how to continue from the newest
                newest = left[-1].relative_to(run.path).as_posix()
                raise FileNotFoundError(
                    f"cannot resume {run.path}: its `last` pointer is missing, though {len(left)} checkpoint(s) "
                    f"remain; the newest is {newest}. To continue from it, restore the pointer: "
                    f"echo {newest} > {run.path / 'last'}, then resume again"
                )
            raise FileNotFoundError(f"nothing to resume: {run.path} has no checkpoint (no `last` pointer; it stopped "
                                    "before its first save): train it afresh under another run.name, or delete the "
                                    "folder and run the same command without --resume")  # fmt: skip
        missing = missing_files(run.last, RESUME_FILES)
        if missing:
            raise FileNotFoundError(f"cannot resume {run.path}: " + damaged_checkpoint(run.path, "last", run.last,
                                                                                       missing, RESUME_FILES))  # fmt: skip
        run.lock()
        return run

    def contents(self) -> list[str]:
        """Names in the dir, except the lock file."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def owns(self, path: str | Path) -> bool:
        """True for a file this run wrote or will write (config, split, results, pointers, checkpoints)."""
        path, root = Path(path).resolve(), self.path.resolve()
        if not path.is_relative_to(root) or path == root:
            return False
        first = path.relative_to(root).parts[0]
        return first in RUN_FILES or first.startswith(RUN_FILE_PREFIXES)

    def holds_run(self) -> bool:
        """True if the dir exists and holds anything besides a lock file (results are never overwritten)."""
        return bool(self.contents())

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Become the one writer of this dir (`flock` on `run.lock`, released when the process dies)."""
        if self._lock_fd is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if _shared_file(self.path / LOCK):  # a hard-linked copy's (`cp -al`): a lock of its own, so that the
                write_atomic(self.path / LOCK, "")  # original's (and its writer's flock) is left alone
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(
                e.errno, f"run dir {self.path} is not writable ({e.strerror or e}): a new run needs another "
                "run.output_dir; to resume this one, copy it somewhere writable (cp -r) and resume the copy"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"{self.path} is being written by another live training (pid/host: {holder}); wait for it "
                f"to finish (a new run can instead choose another run.name){_own_hint(holder)}"
            ) from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("%s: taking over the lock left by %s, which ended without releasing it (killed?)",
                        self.path, previous)  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd
        self._finalizer = weakref.finalize(self, _release, fd)

    def unlock(self) -> None:
        """Release the lock; the lock file stays (unlinking it would race with a waiting writer), emptied."""
        if self._finalizer is not None:
            self._finalizer()
        self._lock_fd = self._finalizer = None

    def live_writer(self) -> str | None:
        """The pid@host of the live process holding the lock, or None; the lock file is not changed."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
        finally:
            os.close(fd)

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    # ------------------------------------------------------------------ pointers
    def pointer(self, name: str) -> Path | None:
        """The checkpoint dir `last`/`best` names, or None if there is none yet."""
        path = self.path / name
        if not (path.exists() or path.is_symlink()):
            return None
        return follow_pointer(path)

    @property
    def last(self) -> Path | None:
        return self.pointer("last")

    @property
    def best(self) -> Path | None:
        return self.pointer("best")

    def set_pointer(self, name: str, checkpoint: Path) -> None:
        """Point `name` at `checkpoint` atomically: write a temp file, fsync, `os.replace`."""
        if name not in POINTERS:
            raise ValueError(f"unknown pointer {name!r}; expected one of {POINTERS}")
        path = self.path / name
        if path.is_dir() and not path.is_symlink():  # an old symlink copied as a folder (cp -rL, zip)
            _retire_copied_pointer(path, self.checkpoints)
        tmp = self.path / f".{name}.tmp"
        with open(tmp, "w") as f:
            f.write(Path(os.path.relpath(checkpoint, self.path)).as_posix() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # ------------------------------------------------------------------ config and data fingerprint
    def write_config(self, resolved: Mapping[str, Any]) -> None:
        """config.yaml + config.json: the values this run actually uses (atomic writes)."""
        import yaml

        write_atomic(self.file("config.yaml"), yaml.safe_dump(dict(resolved), sort_keys=False, allow_unicode=True))
        write_atomic(self.file("config.json"), json.dumps(resolved, indent=2))

    def read_config(self) -> dict[str, Any] | None:
        path = self.file("config.json")
        return json.loads(path.read_text()) if path.is_file() else None

    def write_data_fingerprint(self, fingerprint: Mapping[str, Any]) -> None:
        write_atomic(self.file("data_fingerprint.json"), json.dumps(fingerprint, indent=2))

    def read_data_fingerprint(self) -> dict[str, Any] | None:
        path = self.file("data_fingerprint.json")
        return json.loads(path.read_text()) if path.is_file() else None

    def write_environment(self) -> dict[str, Any]:
        """environment.json (the versions, machine and command line of the run's start), once, at the start: a
        resume says its own in resume_log.jsonl (and never writes this file for a run begun by a version that wrote
        none). Returns this process's."""
        env = environment()
        if not self.file("environment.json").is_file():
            write_atomic(self.file("environment.json"), json.dumps(env, indent=2))
        return env

    def log_resume(self, entry: Mapping[str, Any]) -> None:
        """Append one line to resume_log.jsonl: what a resume started from and what it accepted."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}, default=str)
        append_atomic(self.file("resume_log.jsonl"), [line])


def is_run_dir(path: str | Path) -> bool:
    """True for a fusionkit run's folder: its training config (config.json) beside split.json or checkpoints/.

    The config.json is read: a model folder with a split.json copied in, or a project folder of the user's
    (a config.json of its own beside a split.json or a checkpoints/ folder) is no run. A run an older version
    saved a model into (its config.json the model's) is one still, by its checkpoints/."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    kind = _config_kind(path / "config.json")
    return ((path / CHECKPOINTS).is_dir() and kind in ("run", "model")) or (
        (path / "split.json").is_file() and kind == "run")


def _config_kind(path: Path) -> str | None:
    """"run" for a run's training config, "model" for a saved fusionkit model's, None for anything else."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if config.get("model_type") == "fusionkit":
        return "model"
    return "run" if all(isinstance(config.get(k), dict) for k in ("model", "data", "run")) else None


def run_dir_holding(path: str | Path) -> Path | None:
    """The run dir that `path` is or lies inside (a checkpoint, a pointer, a run's file), or None."""
    path = Path(path).resolve()
    return next((p for p in (path, *path.parents) if is_run_dir(p)), None)


def older_splits(run_path: str | Path, dataset: Any, seed: int, ratios: Sequence[float],
                 ids: Mapping[str, Sequence[str]]) -> list[tuple[Path, int, int]]:  # fmt: skip
    """The runs beside `run_path` whose split an older fusionkit drew otherwise (`split_scheme` 1) from the same
    data (`dataset`, the same rows), seed and ratios as this run's new split `ids`, each with how many of its N train
    rows this split puts elsewhere: (run, moved, N). A run's config trained again (`fusionkit train
    OLD/config.yaml --run.name new`) gets this version's split, which only its split.json can give back."""
    from ..data.dataset import SPLITS, split_scheme

    parent, found = Path(run_path).parent, []
    rows = {i for k in SPLITS for i in ids.get(k, ())}
    for other in sorted(parent.iterdir()) if parent.is_dir() else ():
        if other == Path(run_path) or not (other / "split.json").is_file() or not (other / "config.json").is_file():
            continue
        try:
            data = json.loads((other / "config.json").read_text()).get("data")
            theirs = data.get("dataset")
            if not (theirs == dataset or same_path(theirs, dataset)):
                continue
            split = json.loads((other / "split.json").read_text())
            if split_scheme(split) != 1 or split.get("seed") != seed or split.get("ratios") != list(ratios):
                continue
            named = {k: {str(i) for i in split[k]} for k in SPLITS}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):  # not a run's files: not one to compare
            continue
        moved = len(named["train"] - set(ids.get("train", ())))
        if moved and set().union(*named.values()) == rows:  # other rows: other data, not another scheme
            found.append((other, moved, len(named["train"])))
    return found


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step of a checkpoint folder fusionkit named (`step-00000120[-1]`); None for any other name."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def saved_checkpoints(run_path: str | Path) -> list[Path]:
    """The checkpoint folders fusionkit wrote in a run dir, oldest first (the user's own folders left out)."""
    root = Path(run_path) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and checkpoint_step(p) is not None] if root.is_dir() else []
    return sorted(found, key=lambda p: (checkpoint_step(p), len(p.name), p.name))


def missing_files(checkpoint: Path, needed: Sequence[str]) -> list[str]:
    """The `needed` files a checkpoint folder lacks (deleted, or a copy that left them out)."""
    return [name for name in needed if not (checkpoint / name).is_file()]


def damaged_checkpoint(run_path: Path, pointer: str, checkpoint: Path, missing: Sequence[str],
                       needed: Sequence[str]) -> str:  # fmt: skip
    """What a `pointer` names that cannot be used, and the command that points it at the newest intact checkpoint."""
    root = Path(run_path).resolve()
    named = Path(os.path.relpath(checkpoint.resolve(), root)).as_posix()
    intact = [p for p in saved_checkpoints(run_path)
              if p.resolve() != checkpoint.resolve() and not missing_files(p, needed)]  # fmt: skip
    newest = Path(os.path.relpath(intact[-1].resolve(), root)).as_posix() if intact else None
    return (f"its `{pointer}` pointer names {named}, which lacks {' and '.join(missing)} (deleted or damaged); "
            + (f"the newest intact checkpoint is {newest}: echo {newest} > {Path(run_path) / pointer} to use it"
               if newest else "no intact checkpoint is left: train it afresh under another run.name"))  # fmt: skip


def _shared_file(path: Path) -> bool:
    """A file with another name too (a hard link): writing it in place would change that one."""
    try:
        return os.stat(path).st_nlink > 1
    except OSError:
        return False


def _own_hint(holder: str) -> str:
    if holder.startswith(f"{os.getpid()}@"):
        return " (the holder is this process: an earlier Trainer that failed or was never fit; delete it)"
    return ""


def _release(fd: int) -> None:
    os.ftruncate(fd, 0)  # an empty lock file tells the next writer this run ended cleanly
    os.close(fd)  # closing drops the flock


PACKAGES = ("fusionkit", "torch", "transformers", "timm", "numpy", "safetensors", "tokenizers", "pillow",
            "accelerate", "datasets")  # whose versions can change a run's numbers


def environment() -> dict[str, Any]:
    """What reproducing a run takes besides its config, data, split and seeds: package versions, the Python, the
    CPU (and its bf16/AMX flags, which decide the precision `auto` picks) or GPU, and the command line."""
    import importlib.metadata
    import platform
    import sys

    import torch

    from .. import __version__

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", info)]
    except OSError:  # not Linux
        pass
    packages["torch"] = torch.__version__  # with its build ("+cu130"), which the package metadata leaves out
    packages["fusionkit"] = __version__  # the code that runs: an editable install's metadata keeps its first version
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu, "cpu_flags": flags,
            "cpu_count": os.cpu_count(), "gpus": gpus, "packages": packages, "argv": sys.argv}  # fmt: skip


def follow_pointer(path: str | Path) -> Path:
    """The checkpoint dir that `path` stands for: a pointer file's target, a symlink's target, or the dir.

    A pointer names a dir inside its run dir; anything else (absolute, `..`, missing) is refused.
    """
    path = Path(path)
    if path.is_symlink() and path.resolve().is_file():  # a link to a pointer file (a `cp -rs` copy of a run)
        return follow_pointer(path.resolve())
    if path.is_symlink() or path.is_dir():  # a checkpoint dir, or an older run's symlink to one
        return path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size > 4096:
        raise ValueError(f"{path} is not a checkpoint pointer (too large)")
    target = path.read_text().strip()
    rel = Path(target)
    if not target or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{path} names {target!r}; a pointer must name a checkpoint inside its run dir")
    checkpoint = path.parent / rel
    if not checkpoint.is_dir():
        left = saved_checkpoints(path.parent)  # the pointer outlived its checkpoint: name what is left
        newest = left[-1].relative_to(path.parent).as_posix() if left else None
        hint = f"; the newest checkpoint left is {newest}: echo {newest} > {path} to use it" if newest else ""
        raise FileNotFoundError(f"{path} names {target!r}, which does not exist in {path.parent}{hint}")
    return checkpoint


def _retire_copied_pointer(path: Path, checkpoints: Path) -> None:
    """A `last`/`best` folder (an old symlink turned into a copy) is moved under checkpoints/, never deleted."""
    checkpoints.mkdir(exist_ok=True)
    dest, n = checkpoints / f"copied-{path.name}", 1
    while dest.exists():
        dest, n = checkpoints / f"copied-{path.name}-{n}", n + 1
    shutil.move(str(path), dest)
    log.warning("%s was a copied folder (old symlink layout); kept it as %s", path, dest)


# ---------------------------------------------------------------------------------------- resume checks


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"optim.lr": 0.002, ...}; the tasks list by task name: `model.tasks` holds their names
    in order and `model.tasks.score.weight` one option of one task, so a change of it is that one line."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "tasks" and _named(value):
            out[f"{prefix}{key}"] = [t["name"] for t in value]
            for task in value:
                out.update(flatten({k: v for k, v in task.items() if k != "name"}, f"{prefix}{key}.{task['name']}."))
        elif isinstance(value, Mapping) and value and key not in ("config_overrides", "model_kwargs"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _named(value: Any) -> bool:
    """A list of dicts with distinct string names (the tasks), which `flatten` keys by name."""
    names = [t.get("name") if isinstance(t, Mapping) else None for t in value] if isinstance(value, list) else []
    return bool(names) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)


# Keys naming a folder or file: "runs" and "/home/me/runs" (what `--resume` sets) are the same value.
PATH_KEYS = frozenset({"run.output_dir", "data.dataset", "data.cache_dir", "data.image_root", "data.split_file"})


def same_path(a: Any, b: Any) -> bool:
    """Two path strings naming the same place from the current directory (`~` expanded)."""
    return isinstance(a, str) and isinstance(b, str) and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def upgraded_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved config as this version reads it: the keys an older fusionkit wrote and this one removed
    (`config.REMOVED_KEYS`) are left out where they hold null, their default then (they meant nothing else)."""
    from ..config import REMOVED_KEYS

    out = json.loads(json.dumps(saved))
    for dotted in REMOVED_KEYS:
        *sections, key = dotted.split(".")
        node: Any = out
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] is None:
            del node[key]
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{dotted key: [saved value, current value]} for every key that differs (or exists on one side only), a task's
    options by its name (`model.tasks.score.weight`); a path spelled another way (relative / absolute) is not a
    change."""
    a, b = flatten(saved), flatten(current)
    changes = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k) and not (k in PATH_KEYS and same_path(a.get(k), b.get(k)))}  # fmt: skip
    for key, (old, new) in list(changes.items()):  # a task on one side only is said by its name in the tasks list
        names = [*old, *new] if isinstance(old, list) and isinstance(new, list) else [None]
        if key.rpartition(".")[2] == "tasks" and all(isinstance(n, str) for n in names):
            one_side = tuple(f"{key}.{name}." for name in set(old) ^ set(new))
            changes = {k: v for k, v in changes.items() if not k.startswith(one_side)}
    return changes


def split_fingerprint(data: Any) -> str:
    """Content hash of one split: its own `fingerprint` where it has one (the cache's meta records the
    source data's), else a hash of its ids and labels."""
    own = getattr(data, "fingerprint", None)
    if isinstance(own, str):
        return own
    meta = Path(data.path) / "meta.json" if hasattr(data, "path") else None
    if meta is not None and meta.is_file():
        recorded = json.loads(meta.read_text()).get("fingerprint")
        if isinstance(recorded, str):
            return recorded
    ids = list(getattr(data, "ids", []))
    labels = getattr(data, "labels", None)
    return hashlib.sha1(json.dumps([ids, labels], default=str).encode()).hexdigest()


# How split fingerprints are computed, recorded in data_fingerprint.json as "scheme" (absent: 1). 1: fusionkit
# 0.1 hashed an in-memory PIL image by its mode, size and pixels; 2: also by what `load_image` reads besides
# them (EXIF rotation, palette, transparent colour). Raise it whenever a fingerprint of unchanged data changes.
FINGERPRINT_SCHEME = 2


def written_by(recorded: Mapping[str, Any] | None, run_path: str | Path | None = None) -> str:
    """'fusionkit 0.3.0' for a file that records its version; else (data_fingerprint.json of 0.1 and 0.2 records
    none) the version the run's newest checkpoint records, else 'an older fusionkit (0.2 or earlier)'."""
    version = (recorded or {}).get("fusionkit_version") or (run_version(run_path) if run_path is not None else None)
    return f"fusionkit {version}" if version else "an older fusionkit (0.2 or earlier)"


def run_version(run_path: str | Path) -> str | None:
    """The fusionkit version that wrote a run's newest checkpoint (its config.json records it since 0.1), if any:
    the last version that trained the run, and so wrote its unversioned files."""
    for checkpoint in reversed(saved_checkpoints(run_path)):
        try:
            version = json.loads((checkpoint / "config.json").read_text()).get("fusionkit_version")
        except (OSError, ValueError, AttributeError):  # missing, damaged, not a dict: the next one may tell
            continue
        if isinstance(version, str) and version:
            return version
    return None


def legacy_split_fingerprint(data: Any) -> str | None:
    """A split's fingerprint as scheme 1 computed it (`MultimodalDataset.fingerprint` with the old image
    digest), or None for data without its examples (a cache view): it cannot be recomputed from those."""
    from ..data.image import legacy_image_digest

    examples = getattr(data, "examples", None)
    if examples is None:
        return None
    h = hashlib.sha256()
    h.update(json.dumps([data.label_names, data.task_types], sort_keys=True).encode())
    for ex in examples:
        h.update(json.dumps([ex.id, ex.text, ex.labels], sort_keys=True, default=str).encode())
        h.update(legacy_image_digest(ex.image))
    return h.hexdigest()


def same_split(saved: Mapping[str, Any], split: str, data: Any) -> bool | None:
    """Whether `data` is the content a run recorded for `split` (in `saved`, its data_fingerprint.json), by the
    scheme it was recorded with; None when an older scheme's fingerprint cannot be recomputed from `data`."""
    entry = saved.get("splits", {}).get(split)
    if entry is None:
        return True
    recorded, current = entry.get("fingerprint"), split_fingerprint(data)
    if recorded == current or saved.get("scheme", 1) >= FINGERPRINT_SCHEME:
        return recorded == current
    legacy = legacy_split_fingerprint(data)  # differs from `current` only for in-memory PIL images
    return None if legacy is None else recorded == legacy


def data_fingerprint(datasets: Mapping[str, Any]) -> dict[str, Any]:
    """What a resume must find unchanged: the label schema per task, size and content hash per split (and
    which fusionkit and fingerprint scheme wrote them, so a later version can tell its own changes apart)."""
    from .. import __version__

    first = next(iter(datasets.values()))
    return {
        "fusionkit_version": __version__,
        "scheme": FINGERPRINT_SCHEME,
        "label_schema": {
            task: {"type": first.task_types.get(task), "classes": list(names)}
            for task, names in first.label_names.items()
        },
        "splits": {s: {"n": len(d), "fingerprint": split_fingerprint(d)} for s, d in datasets.items()},
    }


def data_changes(saved: Mapping[str, Any], current: Mapping[str, Any], splits: Mapping[str, Any] | None = None,
                 run_path: str | Path | None = None) -> list[str]:  # fmt: skip
    """Readable differences between two `data_fingerprint`s ("label schema of task 'x': ... -> ...").

    A split recorded by an older fingerprint scheme is compared by that scheme when its examples are given in
    `splits`; else a differing fingerprint is said to be incomparable, not changed (naming the version that
    recorded it: `run_path`'s checkpoints tell it where the file does not)."""
    out = []
    old_schema, new_schema = saved.get("label_schema", {}), current.get("label_schema", {})
    for task in sorted(set(old_schema) | set(new_schema)):
        if old_schema.get(task) != new_schema.get(task):
            out.append(f"label schema of task {task!r}: {old_schema.get(task)} -> {new_schema.get(task)}")
    old_splits, new_splits = saved.get("splits", {}), current.get("splits", {})
    for split in sorted(set(old_splits) | set(new_splits)):
        a, b = old_splits.get(split), new_splits.get(split)
        if a is None or b is None:
            out.append(f"split {split!r}: {'added' if a is None else 'gone'}")
        elif a != b:
            size = f"{a['n']} -> {b['n']} examples" if a["n"] != b["n"] else f"{a['n']} examples"
            same = False
            if a["n"] == b["n"] and saved.get("scheme", 1) < FINGERPRINT_SCHEME:  # maybe unchanged: the old way
                same = same_split(saved, split, splits[split]) if splits and split in splits else None
            if same is None:
                out.append(f"split {split!r}: not compared ({size}): its fingerprint was recorded by "
                           f"{written_by(saved, run_path)}, which hashed in-memory images otherwise")  # fmt: skip
            elif not same:
                out.append(f"split {split!r}: content changed ({size})")
    return out


def data_refusal(run_path: Path, saved: Mapping[str, Any], changes: Sequence[str]) -> str:
    """Why a resume stops at `data_changes`: the data changed, or (only) an older fusionkit's fingerprints
    cannot be compared with this version's, and what to do."""
    if all(": not compared (" in c for c in changes):
        return (f"the data of {run_path} cannot be checked against its last checkpoint: " + "; ".join(changes)
                + ". If the data is unchanged, resume with --accept-changes: this version records its own "
                "fingerprints then (resume_log.jsonl notes they were not compared); else restore the original data")
    from .. import __version__

    who = written_by(saved, run_path)  # an older version's record, compared by its scheme: say whose it is
    by = f" (as {who} recorded it)" if who != f"fusionkit {__version__}" else ""
    return (f"the data of {run_path} changed since its last checkpoint{by}: " + "; ".join(changes)
            + ". Resume with the original data, or pass --accept-changes (recorded in resume_log.jsonl)")
