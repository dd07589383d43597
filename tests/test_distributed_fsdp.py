"""FSDP through an Accelerate config: the documented `accelerate launch --config_file
configs/accelerate/fsdp.yaml -m fusionkit train ...` (which sets ACCELERATE_USE_FSDP and the FSDP_*
variables) starts two CPU processes (gloo, PyTorch's FSDP2) that train like one process with the same
global batch, write whole single-file checkpoints that `FusionModel.from_pretrained` loads, and keep
the frozen encoder layers in one shared file; a sharded run resumes after a SIGKILL (slow). A DeepSpeed
config and what FSDP does not run with are refused before any work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors import safe_open

from fusionkit import FusionModel
from fusionkit.config import ConfigError, to_dict
from fusionkit.training import distributed as D
from fusionkit.training.checkpoint import FROZEN_WEIGHTS
from fusionkit.training.rundir import follow_pointer
from fusionkit.training.trainer import Trainer

from .reliability_utils import free_port
from .test_distributed import _epoch_ends, _join, _weights, config, fit_killing_rank_1, write_split

# What `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports (accelerate.utils.launch),
# with each encoder block its own FSDP unit (BERT's layers and timm's ViT blocks)
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "BertLayer,Block", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}  # fmt: skip


def fsdp_config(tmp: Path, name: str):
    """The distributed test's run, end to end with each encoder's lower block frozen (top_k: 1)."""
    cfg = config(tmp, name)
    cfg.model.freeze, cfg.model.trainable_layers = "top_k", 1
    cfg.data.feature_cache = False
    return cfg


def _worker(rank: int, tmp: str, port: int, name: str, kill_at: int, resume: bool) -> None:
    """Train `name` sharded over 2 processes; see `fit_killing_rank_1`."""
    _join(rank, port)
    os.environ.update(FSDP_ENV)
    trainer = Trainer(fsdp_config(Path(tmp), name), resume=resume)
    assert trainer.fsdp and type(trainer.model).__name__ == "FSDPFusionModel"
    fit_killing_rank_1(trainer, rank, kill_at)


def sharded(tmp: Path, name: str, kill_at: int = 0, resume: bool = False) -> None:
    mp.spawn(_worker, args=(str(tmp), free_port(), name, kill_at, resume), nprocs=2, join=True)


def launch(tmp: Path, name: str) -> str:
    """Run `name` with the documented command: `accelerate launch` with the example FSDP config (here
    naming timm's ViT blocks too, which declare no layer class); returns the processes' log."""
    path = tmp / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(to_dict(fsdp_config(tmp, name)))
    )  # (json's 1e-06 would read back as a str)
    config_file = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--fsdp_transformer_layer_cls_to_wrap", "BertLayer,Block", "-m", "fusionkit", "train", str(path)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env={**env, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    write_split(tmp)
    Trainer(fsdp_config(tmp, "single")).fit()
    (tmp / "fsdp.log").write_text(launch(tmp, "fsdp"))
    return tmp


@pytest.mark.timeout(300)
def test_fsdp_trains_like_one_process_and_saves_whole_loadable_checkpoints(runs: Path) -> None:
    single, fsdp = runs / "runs" / "single", runs / "runs" / "fsdp"
    assert (
        "units sharded over 2 processes; layers wrapped: BertLayer, Block" in (runs / "fsdp.log").read_text()
    )
    a, b = _weights(single), _weights(fsdp)
    assert sorted(a) == sorted(b)  # the trainable weights, whole: nothing sharded, nothing missing
    init = Trainer(fsdp_config(runs, "init")).model.state_dict()
    assert [k for k in a if not torch.equal(a[k], init[k])], "training did not change the weights"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-4, atol=1e-6, msg=k)
    for x, y in zip(_epoch_ends(single), _epoch_ends(fsdp), strict=True):  # every rank evaluated everything
        assert sorted(x) == sorted(y)
        for key, value in x.items():
            assert y[key] == pytest.approx(value, rel=2e-4, abs=1e-6), key
    # frozen layers once per run, beside the checkpoints; the public loader rebuilds the whole model
    with safe_open(fsdp / FROZEN_WEIGHTS, "pt") as f:
        frozen = set(f.keys())
    assert frozen and not frozen & set(b) and all(k in init for k in frozen)
    model = FusionModel.from_pretrained(follow_pointer(fsdp / "last"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, init[k] if k in frozen else b[k], rtol=0, atol=0, msg=k)
    # the optimizer state is whole too (keyed by parameter name), so any world size can read it
    state = torch.load(follow_pointer(fsdp / "last") / "trainer_state.pt", weights_only=True)
    assert set(state["optimizer"]["state"]) == {k for k in a if k not in frozen}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fsdp_sigkill_then_resume_matches_uninterrupted(runs: Path) -> None:
    sharded(runs, "whole")
    with pytest.raises(mp.ProcessExitedException):
        sharded(runs, "killed", kill_at=3)
    assert follow_pointer(runs / "runs" / "killed" / "last").name == "step-00000002"
    sharded(runs, "killed", resume=True)
    a, b = _weights(runs / "runs" / "whole"), _weights(runs / "runs" / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _epoch_ends(runs / "runs" / "killed") == _epoch_ends(runs / "runs" / "whole")


def test_deepspeed_and_what_fsdp_cannot_run_are_refused(tmp_path: Path, monkeypatch) -> None:
    write_split(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")

    def accelerator(*args: object) -> None:  # on a GPU, Accelerate would import deepspeed first and fail
        raise AssertionError("the Accelerator was created before the DeepSpeed check")

    monkeypatch.setattr(D, "make_accelerator", accelerator)
    with pytest.raises(ConfigError, match=r"DeepSpeed config .* not train with DeepSpeed yet\. .* use FSDP"):
        Trainer(config(tmp_path, "deepspeed"))
    assert not (tmp_path / "runs" / "deepspeed").exists()  # refused before any work
    monkeypatch.undo()

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    Trainer(config(tmp_path, "one"))  # one process: nothing to shard, plain PyTorch
    with pytest.raises(
        ConfigError, match=r"fsdp_version 1; fusionkit shards with FSDP2: set fsdp_version: 2"
    ):
        D.launch_engine(config(tmp_path, "v1"), world=2)  # no FSDP_VERSION: Accelerate's default, FSDP1
    for name, value in FSDP_ENV.items():
        monkeypatch.setenv(name, value)
    assert D.launch_engine(config(tmp_path, "ok"), world=2) == "fsdp"
    cfg = config(tmp_path, "ema")
    cfg.optim.ema_decay, cfg.run.compile, cfg.data.missing_image = 0.99, True, "keep"
    with pytest.raises(
        ConfigError, match=r"does not run with optim.ema_decay .*; run.compile; data.missing_t"
    ):
        D.launch_engine(cfg, world=2)
