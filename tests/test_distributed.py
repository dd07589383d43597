"""Two CPU processes (gloo, torch DDP) end with the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fusionkit.training.config import build_config
from fusionkit.training.rundir import follow_pointer
from fusionkit.training.trainer import Trainer


def config(tmp: Path, name: str):
    return build_config(None, {
        "data.dataset": "synthetic:80", "data.cache_dir": str(tmp / "cache"),
        "data.augment": False,  # random draws (augmentation, dropout) differ per rank: switch them off
        "model.text.config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "optim.batch_size": 16, "optim.max_steps": 3, "run.output_dir": str(tmp / "runs"),
        "run.name": name, "run.progress": False, "run.plots": False, "run.device": "cpu",
    })  # fmt: skip


def _worker(rank: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")  # fmt: skip
    torch.set_num_threads(1)
    try:
        trainer = Trainer(config(Path(tmp), "ddp"))
        assert trainer.world == 2 and len(next(iter(trainer.train_sampler))) == 8  # half the global batch
        trainer.fit()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    single = Trainer(config(tmp_path, "single"))
    assert single.world == 1
    single.fit()
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    a = load_file(follow_pointer(tmp_path / "runs" / "single" / "last") / "model.safetensors")
    b = load_file(follow_pointer(tmp_path / "runs" / "ddp" / "last") / "model.safetensors")
    assert follow_pointer(tmp_path / "runs" / "ddp" / "last").name == "step-00000003"
    init = Trainer(config(tmp_path, "init")).model.state_dict()  # same seed: the starting weights
    moved = [k for k in a if not torch.equal(a[k], init[k])]
    assert moved, "training did not change the weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
