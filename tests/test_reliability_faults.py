"""Untrusted checkpoints, numerical faults and resource faults, each through the real Trainer.

(Truncated safetensors, a pickled `model.safetensors` and a config that does not match the weights
are already covered at the model level by tests/test_save_load.py; here the payload is delivered
through a run directory and `--resume`.)
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from fusionkit.data import DataError
from fusionkit.models import FusionModel
from fusionkit.training import checkpoint as ckpt
from fusionkit.training import trainer as trainer_mod
from fusionkit.training.config import build_config
from fusionkit.training.rundir import follow_pointer
from fusionkit.training.trainer import NonFiniteLossError, Trainer
from tests.reliability_utils import check_checkpoints, record

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"fusionkit-pwned-{os.getpid()}"


class Payload:
    """Unpickling this runs code (creates MARKER)."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def config(tmp_path: Path, name: str = "run", **overrides):
    base = {"data.dataset": "synthetic:100", "data.cache_dir": str(tmp_path / "cache"), "optim.epochs": 1,
            "optim.batch_size": 16, "run.output_dir": str(tmp_path / "runs"), "run.name": name,
            "run.checkpoint_every": 2, "run.progress": False, "run.plots": False}  # fmt: skip
    return build_config(None, {**base, **overrides})


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    Trainer(config(tmp_path)).fit()
    return tmp_path / "runs" / "run"


# ------------------------------------------------------------------------------- untrusted checkpoints


def test_pickle_payloads_in_a_run_dir_are_refused_without_running(finished_run: Path) -> None:
    MARKER.unlink(missing_ok=True)
    last = follow_pointer(finished_run / "last")
    torch.save({"step": Payload()}, last / ckpt.STATE_NAME)  # a real torch pickle, code on load
    with pytest.raises(DataError, match="trainer_state.pt: holds objects other than tensors.*was not loaded") as e:
        Trainer(config(finished_run.parents[1], "run"), resume=True).fit()
    assert "weights_only=False" not in str(e.value)  # torch's advice to load it anyway is not passed on
    (last / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        FusionModel.from_pretrained(last)
    assert not MARKER.exists()
    record("untrusted/pickle_payloads", payloads_tried=2, code_executed=False,
           errors=["DataError (not fusionkit's state, not loaded)", "ValueError (not safetensors)"])  # fmt: skip


# ------------------------------------------------------------------------------- numerical faults


def test_injected_nan_batch_stops_naming_the_batch_and_keeps_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 5th training batch carries +inf pixels -> NaN loss at step 5; last good checkpoint: step 4."""
    trainer = Trainer(config(tmp_path))
    original = trainer_mod.move_batch
    calls, poisoned = [0], []

    def inject(batch, device, transform=None):
        out = original(batch, device, transform)
        if transform is trainer.train_transform:
            calls[0] += 1
            if calls[0] == 5:
                out["pixel_values"] = torch.full_like(out["pixel_values"], float("inf"))
                poisoned.extend(out["ids"])
        return out

    monkeypatch.setattr(trainer_mod, "move_batch", inject)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    msg = str(info.value)
    assert "step 5" in msg and "batch 5 of the epoch" in msg and str(poisoned) in msg
    run = tmp_path / "runs" / "run"
    assert follow_pointer(run / "last").name == "step-00000004" and "step-00000004" in msg
    assert check_checkpoints(run) == 2  # step 2 and step 4, both load
    record("numerical/nan_batch", poisoned_batch=5, batch_ids_named=len(poisoned), last_good="step-00000004")


def test_fp16_overflow_is_skipped_by_the_grad_scaler(tmp_path: Path) -> None:
    """CPU trains in fp32 (`precision=fp16` is ignored there), so the scaler path is exercised directly:
    the trainer's `_optimizer_step` with an enabled CPU GradScaler and inf gradients."""
    trainer = Trainer(config(tmp_path))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=True)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    trainer.scaler.scale(torch.ones(()))  # what the training loop's scaled backward does first
    for p in params:
        p.grad = torch.full_like(p, float("inf"))  # fp16 gradients that overflowed
    trainer._optimizer_step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # overflowing step skipped
    assert trainer.scaler.get_scale() == 2.0**15  # scale backed off
    for p in params:
        p.grad = torch.ones_like(p)
    trainer._optimizer_step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # finite step applied
    assert all(torch.isfinite(p).all() for p in params)
    record("numerical/fp16_scaler", level="unit (CPU GradScaler in Trainer._optimizer_step)",
           overflow_step_skipped=True, scale_after=trainer.scaler.get_scale())  # fmt: skip


# ------------------------------------------------------------------------------- resource faults


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir_fails_up_front(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OSError, match=r"output directory .* is not writable \(Permission denied\)"):
            Trainer(config(tmp_path, **{"run.output_dir": str(ro)}))
    finally:
        ro.chmod(0o700)
    record("resource/read_only_output_dir", failed_before_training=True)


def test_disk_full_during_checkpoint_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(config(tmp_path))
    original, saves = torch.save, [0]

    def full_disk(obj, f, *a, **k):
        saves[0] += 1
        if saves[0] == 2:  # the second checkpoint's training state
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return original(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        trainer.fit()
    assert info.value.errno == errno.ENOSPC and "No space left on device" in str(info.value)
    assert "step-00000002 is intact" in str(info.value)  # says what survived
    run = tmp_path / "runs" / "run"
    assert follow_pointer(run / "last").name == "step-00000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial write was cleaned up
    assert check_checkpoints(run) == 1
    record("resource/disk_full_checkpoint", error=str(info.value)[:120], previous_intact="step-00000002")


class DiesInWorker(torch.utils.data.Dataset):
    def __init__(self, data, at: int) -> None:
        self.data, self.at = data, at

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        if i == self.at and torch.utils.data.get_worker_info() is not None:
            os._exit(1)  # the worker process vanishes, as under the OOM killer
        return self.data[i]


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_dataloader_worker_death_is_an_error_not_a_hang(tmp_path: Path) -> None:
    trainer = Trainer(config(tmp_path, **{"data.num_workers": 1}))
    train = trainer.datasets["train"]
    trainer.train_loader = trainer._loader(DiesInWorker(train, at=len(train) // 2), trainer.train_sampler)
    with pytest.raises(RuntimeError, match="DataLoader worker .* exited unexpectedly"):
        trainer.fit()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
    record("resource/dataloader_worker_death", error="RuntimeError: DataLoader worker exited unexpectedly")
