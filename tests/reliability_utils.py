"""Shared helpers for the reliability suite (tests/test_reliability_*.py and benchmarks/reliability.py).

* `record(case, **figures)` appends one JSON line to the file named by `$FUSIONKIT_RELIABILITY_JSON`
  (a no-op otherwise), so `benchmarks/reliability.py` can turn a pytest run into a report.
  `tally(case, **counts)` is the same for counts that many tests add to: the report sums them per case.
* `train(...)` / `start_train(...)` run the real `fusionkit train` in a subprocess. `fault` injects a
  SIGKILL at a precise point inside that process (see `_FAULTS`): a real kill, but at a known place.
* `make_corpus(...)` writes a CSV dataset whose bad rows are broken in every way the data layer knows.
* `peak_rss_mib(code)` runs Python code in a fresh interpreter and returns its peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RECORD_ENV = "FUSIONKIT_RELIABILITY_JSON"


def record(case: str, outcome: str = "pass", _sum: bool = False, **figures: Any) -> None:
    """Append `{"case", "outcome", "figures"}` to $FUSIONKIT_RELIABILITY_JSON (if set)."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    entry = {"case": case, "outcome": outcome, "figures": figures, **({"sum": True} if _sum else {})}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def tally(case: str, **counts: int) -> None:
    """Add `counts` to `case`: the report sums every tally of a case (one line per call, so a crash
    mid-run loses nothing already counted). E.g. `tally("rundir/never_overwritten", attempts=2, intact=2)`."""
    record(case, _sum=True, **counts)


# ------------------------------------------------------------------------------------ training runs

# Small, fast and deterministic: 128 train examples / batch 16 = 8 steps per epoch, 2 epochs, a
# checkpoint every 3 steps (so kills land both next to and away from a checkpoint).
TRAIN_ARGS = {
    "data.dataset": "synthetic:160",
    "optim.epochs": 2,
    "optim.batch_size": 16,
    "run.checkpoint_every": 3,
    "run.progress": "false",
    "run.plots": "false",
    "run.deterministic": "true",
}

# Fault hooks installed in the child before `fusionkit.cli.main` runs; "<name>:<n>".
_CHILD = """
import os, signal, sys
name, _, n = os.environ.get("FK_FAULT", "").partition(":")
n = int(n or 0)
if name:
    from fusionkit.training import trainer as T
    from fusionkit.models import FusionModel
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    def on_step(callback):  # every Trainer the CLI makes calls `callback` after each optimizer step
        orig_init = T.Trainer.__init__
        def _init(self, *a, **k):
            orig_init(self, *a, **k)
            self.step_callbacks.append(callback)
        T.Trainer.__init__ = _init
    if name == "step":  # right after optimizer step n (mid-epoch, no checkpoint at that step)
        on_step(lambda t: die() if t.step == n else None)
    elif name == "ckpt_write":  # the n-th checkpoint: model written into its temp dir, state not yet
        orig_save = FusionModel._write_pretrained  # what the trainer saves checkpoints with
        calls = [0]
        def _save(self, directory, **kw):
            out = orig_save(self, directory, **kw)
            calls[0] += 1
            if calls[0] == n:
                die()
            return out
        FusionModel._write_pretrained = _save
    elif name == "eval":  # during the n-th evaluation, after its first batch
        orig_inf = T.run_inference
        calls = [0]
        def _inf(model, loader, *a, **k):
            calls[0] += 1
            if calls[0] != n:
                return orig_inf(model, loader, *a, **k)
            def killing():
                for b in loader:
                    yield b
                    die()  # once the first batch has been evaluated (val may be a single batch)
            return orig_inf(model, killing(), *a, **k)
        T.run_inference = _inf
    elif name == "sleep":  # slow each step down so an outside signal lands mid-run
        import time
        on_step(lambda t: time.sleep(n / 1000))
    else:
        raise SystemExit(f"unknown FK_FAULT {name!r}")
from fusionkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop(RECORD_ENV, None)
    if fault:
        env["FK_FAULT"] = fault
    return env


def train_argv(root: Path, name: str, resume: bool = False, **overrides: Any) -> list[str]:
    """argv for `fusionkit train` of run `root/runs/name` with the shared data cache `root/cache`."""
    if resume:
        return ["train", "--resume", str(root / "runs" / name)]
    args = {**TRAIN_ARGS, "run.output_dir": str(root / "runs"), "run.name": name,
            "data.cache_dir": str(root / "cache"), **overrides}  # fmt: skip
    return ["train", *(x for k, v in args.items() for x in (f"--{k}", str(v)))]


def start_train(argv: list[str], fault: str | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-c", _CHILD, *argv], cwd=REPO, env=_env(fault), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def train(
    argv: list[str], fault: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    proc = start_train(argv, fault)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


def run_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint dir, or of the one a run's `last`/`best` pointer names."""
    from safetensors.torch import load_file

    from fusionkit.training.rundir import follow_pointer

    return load_file(str(follow_pointer(path) / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_checkpoints(run: Path) -> int:
    """Every `checkpoints/step-*` is complete and loads (weights + weights_only state); `last`/`best`
    resolve to one. Returns how many were checked."""
    from fusionkit.models import FusionModel
    from fusionkit.training.checkpoint import load_state
    from fusionkit.training.rundir import follow_pointer

    steps = sorted((run / "checkpoints").glob("step-*"))
    for d in steps:
        FusionModel.from_pretrained(d)
        state = load_state(d)
        assert state["step"] == int(d.name.split("-")[1]), d
    for pointer in ("last", "best"):
        if (run / pointer).exists():
            assert follow_pointer(run / pointer).resolve() in [s.resolve() for s in steps], pointer
    return len(steps)


def summary_metrics(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    return {k: s[k] for k in ("val", "test", "best", "steps", "epochs")}


# ------------------------------------------------------------------------------------ corrupt corpus

# name -> (expected outcome, substring of the problem). "skip": the row must be reported and left
# out; "ok": accepted by design (converted / truncated) and must be kept.
BROKEN_KINDS: dict[str, tuple[str, str]] = {
    "truncated_jpeg": ("skip", "truncated"),
    "zero_byte": ("skip", "empty (0 bytes)"),
    "not_an_image": ("skip", "not an image"),
    "cmyk_jpeg": ("ok", ""),
    "png16": ("ok", ""),
    "giant": ("skip", "above the limit"),
    "missing_file": ("skip", "not found"),
    "empty_caption": ("skip", "caption is empty"),
    "megabyte_caption": ("ok", ""),
    "invalid_utf8": ("skip", "not valid UTF-8"),
    "unknown_label": ("skip", "unknown label"),
}
CLASSES = ["positive", "neutral", "negative"]


def _good_image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), "RGB")


def make_corpus(root: Path, n_good: int = 60, copies: int = 2) -> tuple[Path, dict[str, str]]:
    """CSV at `root/data.csv`: `n_good` clean rows and `copies` rows of each `BROKEN_KINDS` entry.

    Returns (csv path, {row id: kind}) for the broken rows. Written as bytes so one caption can
    carry invalid UTF-8.
    """
    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, bytes, str, str]] = []  # id, caption bytes, image ref, label
    for i in range(n_good):
        _good_image(i).save(img / f"good{i}.png")
        rows.append((f"good{i}", f"a nice day number {i}".encode(), f"img/good{i}.png", CLASSES[i % 3]))
    broken: dict[str, str] = {}
    for c in range(copies):
        for kind in BROKEN_KINDS:
            rid = f"{kind}{c}"
            broken[rid] = kind
            cap, ref, label = f"caption of {rid}".encode(), f"img/{rid}.png", CLASSES[c % 3]
            if kind == "truncated_jpeg":
                ref = f"img/{rid}.jpg"
                _good_image(100 + c).resize((64, 64)).save(img / f"{rid}.jpg", quality=90)
                data = (img / f"{rid}.jpg").read_bytes()
                (img / f"{rid}.jpg").write_bytes(data[: len(data) // 2])
            elif kind == "zero_byte":
                (img / f"{rid}.png").write_bytes(b"")
            elif kind == "not_an_image":  # an HTML error page saved as .jpg
                ref = f"img/{rid}.jpg"
                (img / f"{rid}.jpg").write_bytes(b"<html><body>403 Forbidden</body></html>\n" * 20)
            elif kind == "cmyk_jpeg":
                ref = f"img/{rid}.jpg"
                _good_image(200 + c).convert("CMYK").save(img / f"{rid}.jpg")
            elif kind == "png16":
                arr = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 100).astype(np.uint16)
                Image.fromarray(arr).save(img / f"{rid}.png")
            elif kind == "giant":  # 41 MP header, a few KB on disk
                Image.new("1", (6500, 6400)).save(img / f"{rid}.png")
            elif kind == "missing_file":
                pass
            elif kind == "empty_caption":
                cap = b"   "
                _good_image(300 + c).save(img / f"{rid}.png")
            elif kind == "megabyte_caption":
                cap = b"sunny " * 180_000
                _good_image(400 + c).save(img / f"{rid}.png")
            elif kind == "invalid_utf8":
                cap = b"caf\xe9 \xff\xfe broken"
                _good_image(500 + c).save(img / f"{rid}.png")
            elif kind == "unknown_label":
                label = "ecstatic"
                _good_image(600 + c).save(img / f"{rid}.png")
            rows.append((rid, cap, ref, label))
    # interleave the broken rows among the good ones
    order = sorted(range(len(rows)), key=lambda k: (k * 7919) % len(rows))
    path = root / "data.csv"
    with path.open("wb") as f:
        f.write(b"id,text,image,sentiment\n")
        for k in order:
            rid, cap, ref, label = rows[k]
            quoted = b'"' + cap.replace(b'"', b'""') + b'"'
            f.write(b",".join([rid.encode(), quoted, ref.encode(), label.encode()]) + b"\n")
    return path, broken


# ------------------------------------------------------------------------------------ memory


def peak_rss_mib(code: str, timeout: float = 600) -> float:
    """Run `code` in a fresh interpreter; its peak resident set size in MiB (VmHWM of the child).

    `code` may reset the peak after its set-up (`open("/proc/self/clear_refs", "w").write("5")`), so
    the figure is the high-water mark of the work itself, not of importing torch.
    """
    wrapper = (
        code
        + "\nkb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
        + "\nprint('PEAK_KB', kb)\n"
    )
    out = subprocess.run(
        [PYTHON, "-c", wrapper], cwd=REPO, env=_env(None), text=True, capture_output=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    line = next(x for x in out.stdout.splitlines() if x.startswith("PEAK_KB"))
    return int(line.split()[1]) / 1024


def self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port() -> int:
    """A TCP port nobody listens on, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
