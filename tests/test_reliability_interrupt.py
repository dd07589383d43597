"""Real `fusionkit train` processes killed (SIGKILL) or stopped (SIGTERM) at known points, then resumed.

The resumed run must end bitwise equal to an uninterrupted one (weights of `last` and `best`, val/test
metrics, the metrics log), and every checkpoint left on disk must load. Fault points are injected
inside the child (tests/reliability_utils.py `_CHILD`); the kill itself is a real SIGKILL.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

from fusionkit.training.rundir import follow_pointer
from tests.reliability_utils import (
    check_checkpoints,
    record,
    run_weights,
    same_weights,
    start_train,
    summary_metrics,
    train,
    train_argv,
    wait_for,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root, run dir) of one uninterrupted run; its data cache is shared by the other runs."""
    root = tmp_path_factory.mktemp("interrupt")
    done = train(train_argv(root, "reference"))
    assert done.returncode == 0, done.stdout[-3000:]
    return root, root / "runs" / "reference"


def _assert_same_as_reference(run: Path, ref: Path) -> None:
    for link in ("last", "best"):
        assert same_weights(run_weights(run / link), run_weights(ref / link)), link
    assert summary_metrics(run) == summary_metrics(ref)
    assert (run / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()


def _kill_and_resume(root: Path, ref: Path, name: str, faults: list[str]) -> dict[str, object]:
    """Run `name` once per fault (each a SIGKILL), checking the checkpoints after each, then to the end."""
    checked = 0
    for i, fault in enumerate(faults):
        done = train(train_argv(root, name, resume=i > 0), fault=fault)
        assert done.returncode == -signal.SIGKILL, (fault, done.returncode, done.stdout[-3000:])
        checked += check_checkpoints(root / "runs" / name)
    done = train(train_argv(root, name, resume=True))
    assert done.returncode == 0, done.stdout[-3000:]
    run = root / "runs" / name
    checked += check_checkpoints(run)
    _assert_same_as_reference(run, ref)
    return {"kills": len(faults), "resumes": len(faults), "checkpoints_loaded": checked}


SLOW = {
    "mid_epoch": ["step:5"],
    "during_eval": ["eval:1"],
    "last_step_checkpoint_write": ["ckpt_write:4"],
    "four_kills_in_a_row": ["step:4", "ckpt_write:2", "eval:1", "step:13"],
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(SLOW))
def test_sigkill_then_resume_is_bitwise_slow(reference: tuple[Path, Path], where: str) -> None:
    root, ref = reference
    t0 = time.perf_counter()
    figures = _kill_and_resume(root, ref, f"kill-{where}", SLOW[where])
    record(f"interrupt/sigkill/{where}", faults=SLOW[where], bitwise_equal=True,
           seconds=round(time.perf_counter() - t0, 1), **figures)  # fmt: skip


def test_sigkill_during_checkpoint_write_then_resume_is_bitwise(reference: tuple[Path, Path]) -> None:
    """Killed between writing the model and the state of checkpoint 2: `last` is still checkpoint 1,
    the half-written temp dir is not a checkpoint, and the resumed run equals the reference."""
    root, ref = reference
    t0 = time.perf_counter()
    done = train(train_argv(root, "kill-checkpoint_write"), fault="ckpt_write:2")
    assert done.returncode == -signal.SIGKILL
    run = root / "runs" / "kill-checkpoint_write"
    assert follow_pointer(run / "last").name == "step-00000003"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000003"]
    leftovers = list((run / "checkpoints").glob(".tmp-step-*"))
    assert leftovers and (leftovers[0] / "model.safetensors").exists()
    assert not (leftovers[0] / "trainer_state.pt").exists()  # it really died mid-write
    checked = check_checkpoints(run)
    done = train(train_argv(root, "kill-checkpoint_write", resume=True))
    assert done.returncode == 0, done.stdout[-3000:]
    checked += check_checkpoints(run)
    _assert_same_as_reference(run, ref)
    record("interrupt/sigkill/checkpoint_write", faults=["ckpt_write:2"], kills=1, resumes=1,
           half_written_temp_dirs=len(leftovers), checkpoints_loaded=checked, bitwise_equal=True,
           seconds=round(time.perf_counter() - t0, 1))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_sigkill_at_wall_clock_times(reference: tuple[Path, Path], delay: float) -> None:
    """Not at a chosen point: SIGKILL from outside after `delay` s of training (steps slowed to 150 ms)."""
    root, ref = reference
    name = f"timed-{delay}"
    proc = start_train(train_argv(root, name), fault="sleep:150")
    run = root / "runs" / name
    assert wait_for(lambda: (run / "config.yaml").exists(), 120)
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    checked = check_checkpoints(run)
    resumable = (run / "last").exists()
    if not resumable:  # killed before its first checkpoint: a fresh run refuses the dir, so delete it
        shutil.rmtree(run)
    done = train(train_argv(root, name, resume=resumable))
    assert done.returncode == 0, done.stdout[-3000:]
    _assert_same_as_reference(run, ref)
    record(f"interrupt/sigkill/after_{delay}s", kills=1, resumed_from_checkpoint=resumable,
           checkpoints_loaded=checked + check_checkpoints(run), bitwise_equal=True)  # fmt: skip


def _stop_with_signal(root: Path, name: str, sig: signal.Signals) -> Path:
    run = root / "runs" / name
    proc = start_train(train_argv(root, name), fault="sleep:150")
    # after the first periodic checkpoint (step 3), somewhere before the end of epoch 1
    assert wait_for(lambda: (run / "last").exists(), 120)
    time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "checkpoint saved" in out and "--resume" in out
    stopped_at = follow_pointer(run / "last").name
    assert stopped_at != "step-00000003"  # a new checkpoint was written on the way out
    checked = check_checkpoints(run)
    record(f"interrupt/{sig.name}", exit_code=128 + sig, saved=stopped_at, checkpoints_loaded=checked)
    return run


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_saves_checkpoint(reference: tuple[Path, Path], sig: signal.Signals) -> None:
    """SIGTERM/Ctrl-C from outside: the step finishes, a checkpoint is saved, exit 128+signum."""
    _stop_with_signal(reference[0], f"signal-{sig.name}", sig)


@pytest.mark.slow
def test_sigterm_then_resume_is_bitwise(reference: tuple[Path, Path]) -> None:
    root, ref = reference
    run = _stop_with_signal(root, "sigterm-resume", signal.SIGTERM)
    done = train(train_argv(root, "sigterm-resume", resume=True))
    assert done.returncode == 0, done.stdout[-3000:]
    _assert_same_as_reference(run, ref)
    record("interrupt/SIGTERM_resume", resumes=1, bitwise_equal=True)
