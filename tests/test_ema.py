"""EMA of the weights: the average itself, evaluation and the saved model use it, resume stays exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fusionkit.config import ConfigError
from fusionkit.training.config import build_config
from fusionkit.training.ema import ModelEMA
from fusionkit.training.rundir import follow_pointer
from fusionkit.training.trainer import Trainer


def test_average_swap_and_restore() -> None:
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen parameters are not averaged
    ema = ModelEMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 1/10) = 0.1
    expected = 0.1 * start + 0.9 * (start + 1.0)
    raw = model.weight.detach().clone()
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), expected)
        with ema.applied(model):  # re-entrant: still the average, and one restore at the end
            torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), raw)
    assert ema.names == ["weight"]


def tiny(tmp_path: Path, name: str, **overrides):
    return build_config(None, {
        "data.dataset": "synthetic:96", "data.cache_dir": str(tmp_path / "cache"), "optim.epochs": 3,
        "optim.batch_size": 16, "optim.ema_decay": 0.9, "model.freeze": "encoders", "run.output_dir": str(tmp_path / "runs"), "run.name": name,
        "run.checkpoint_every": 0, "run.progress": False, "run.plots": False, **overrides,
    })  # fmt: skip


def test_eval_and_best_model_use_the_ema_weights(tmp_path: Path) -> None:
    trainer = Trainer(tiny(tmp_path, "ema"))
    summary = trainer.fit()
    best = follow_pointer(Path(summary["run_dir"]) / "best")
    saved = load_file(best / "model.safetensors")
    raw = torch.load(best / "trainer_state.pt", weights_only=True)["ema"]["raw"]
    assert raw and all(k in saved for k in raw)
    assert any(not torch.equal(saved[k], v) for k, v in raw.items())  # the served model is not the raw one
    # the val loss logged when that epoch was selected is the loss of the saved (EMA) weights
    logged = next(
        h for h in trainer.history if h.get("epoch_end") and h["step"] == int(best.name.split("-")[1])
    )
    assert logged["val/loss"] == pytest.approx(summary["val"]["val/loss"], rel=1e-6)


def test_resume_with_ema_equals_uninterrupted(tmp_path: Path) -> None:
    Trainer(tiny(tmp_path, "reference")).fit()

    def stop_after_first_epoch(entry: dict) -> None:
        raise KeyboardInterrupt

    trainer = Trainer(tiny(tmp_path, "resumed"))
    trainer.epoch_callbacks.append(stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    Trainer(tiny(tmp_path, "resumed"), resume=True).fit()
    runs = tmp_path / "runs"
    for name in ("model.safetensors",):
        ref = load_file(follow_pointer(runs / "reference" / "last") / name)
        got = load_file(follow_pointer(runs / "resumed" / "last") / name)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_state, got_state = (
        torch.load(follow_pointer(runs / n / "last") / "trainer_state.pt", weights_only=True)["ema"]
        for n in ("reference", "resumed")
    )
    assert ref_state["updates"] == got_state["updates"]
    assert all(torch.equal(ref_state["raw"][k], got_state["raw"][k]) for k in ref_state["raw"])


def test_decay_is_checked() -> None:
    with pytest.raises(ConfigError, match="ema_decay"):
        build_config(None, {"optim.ema_decay": 1.0})
