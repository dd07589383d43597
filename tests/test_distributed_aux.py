"""Auxiliary batch-level tasks (supcon, image-text matching) in two CPU processes train like one process.

Both score the global batch: supcon contrasts every rank's labelled rows, ITM every rank's pairs. The runs
split batches of 9 unevenly (5 + 4) and end each epoch on a batch of 3 (2 + 1), where rank 1 holds one row
and so nothing supcon could score on its own (DDP failed in the next step: its head had no gradient there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusionkit.config import TaskConfig
from fusionkit.tasks import create_task
from fusionkit.training.trainer import Trainer

from .reliability_utils import free_port
from .test_distributed import SENTIMENT, _exit_quietly, _join, _weights, config, write_split

TASKS = [
    SENTIMENT,
    {"name": "sc", "type": "supcon", "params": {"labels_from": "sentiment"}},
    {"name": "sc_x", "type": "supcon", "weight": 0.5, "params": {"labels_from": "sentiment", "views": "cross"}},
    {"name": "match", "type": "itm", "weight": 0.5},
]


def aux_config(tmp: Path, name: str, seed: int = 0):
    """30 train rows in batches of 9 (5 + 4 over two ranks) and a last one of 3 (2 + 1): 2 epochs of 4 steps.
    Seed 0 puts two rows of a class in each epoch's last batch (both on rank 0); seed 1 none in the first."""
    return config(tmp, name, **{"model.tasks": TASKS, "optim.batch_size": 9, "optim.max_steps": 8,
                                "run.log_every": 1, "run.seed": seed})  # fmt: skip


def _aux_worker(rank: int, tmp: str, port: int, name: str, seed: int) -> None:
    _join(rank, port)
    try:
        Trainer(aux_config(Path(tmp), name, seed)).fit()
    finally:
        dist.destroy_process_group()
    _exit_quietly()


def two_processes(tmp: Path, name: str, seed: int = 0) -> Path:
    mp.spawn(_aux_worker, args=(str(tmp), free_port(), name, seed), nprocs=2, join=True)
    return tmp / "runs" / name


def _train_losses(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r]


@pytest.mark.timeout(300)
def test_supcon_and_itm_over_an_uneven_split_train_like_one_process(tmp_path: Path) -> None:
    write_split(tmp_path, train=30)
    Trainer(aux_config(tmp_path, "single")).fit()
    one, two = _train_losses(tmp_path / "runs" / "single"), _train_losses(two_processes(tmp_path, "ddp"))
    assert len(one) == len(two) == 8 and all("train/sc/loss" in e and "train/match/loss" in e for e in one)
    for x, y in zip(one, two):  # each task's logged loss is the global batch's
        assert sorted(x) == sorted(y)
        for key, value in x.items():
            assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, one, two)
    a, b = _weights(tmp_path / "runs" / "single"), _weights(tmp_path / "runs" / "ddp")
    assert [k for k in a if k.startswith("heads.sc.")] and [k for k in a if k.startswith("heads.match.")]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)  # float noise: ~2e-6


@pytest.mark.timeout(300)
def test_a_global_batch_where_supcon_scores_nothing_trains_in_two_processes(tmp_path: Path) -> None:
    """Step 4's batch (3 rows, 3 classes) has no positive pair on any rank: every rank gets a zero tied to its
    projections, so DDP finds the head's gradients and step 5 runs."""
    write_split(tmp_path, train=30)
    losses = _train_losses(two_processes(tmp_path, "ddp", seed=1))
    assert len(losses) == 8 and losses[3]["train/sc/loss"] == 0.0 and losses[4]["train/sc/loss"] > 0


def _tie_worker(rank: int, port: int) -> None:
    _join(rank, port)
    dist.init_process_group("gloo")
    try:
        # no other pair in the global batch: each rank's contrastive loss is a zero that still reaches its head
        scale = torch.ones((), requires_grad=True)
        logits = scale * torch.ones(1, 1)  # the gathered [N, N] logits of one pair
        loss = create_task(TaskConfig("align", "contrastive")).loss(logits, None, None)
        assert loss is not None and float(loss) == 0.0
        loss.backward()
        assert scale.grad is not None
    finally:
        dist.destroy_process_group()
    _exit_quietly()


@pytest.mark.timeout(60)
def test_contrastive_without_a_negative_still_ties_its_head_into_ddp() -> None:
    mp.spawn(_tie_worker, args=(free_port(),), nprocs=2, join=True)


def test_accumulation_warns_that_contrasting_tasks_see_micro_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_split(tmp_path, train=30)
    with caplog.at_level("WARNING", logger="fusionkit"):
        Trainer(config(tmp_path, "acc", **{"model.tasks": TASKS, "optim.accumulation_steps": 3}))
    warned = [r.getMessage() for r in caplog.records if "accumulation_steps" in r.getMessage()]
    assert warned == ["optim.accumulation_steps 3: tasks ['sc', 'sc_x', 'match'] contrast the rows of each micro-batch "
                      "of 16, not of the accumulated batch of 48 (fewer negatives than one batch that size); for them "
                      "raise optim.batch_size instead"]  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusionkit"):
        Trainer(config(tmp_path, "one", **{"model.tasks": TASKS}))  # no accumulation: no warning
    assert not [r for r in caplog.records if "accumulation_steps" in r.getMessage()]


def _gap_worker(rank: int, tmp: str, port: int, table: str) -> None:
    _join(rank, port)
    try:
        Trainer(_gap_config(Path(tmp), table)).fit()
    finally:
        dist.destroy_process_group()
    _exit_quietly()


def _gap_config(tmp: Path, table: str):
    from fusionkit.training import build_config

    return build_config(None, {
        "data.dataset": table, "data.text_column": "caption", "data.image_column": "photo",
        "data.cache_dir": str(tmp / "cache"), "model.tasks": [{"name": "mood"}, {"name": "score", "type": "regression"}],
        "optim.batch_size": 2, "optim.max_steps": 10, "run.output_dir": str(tmp / "runs"), "run.name": "gaps",
        "run.progress": False, "run.plots": False, "run.device": "cpu", "run.precision": "fp32",
    })  # fmt: skip


@pytest.mark.timeout(300)
def test_a_task_without_a_labelled_row_on_one_rank_trains_in_two_processes(tmp_path: Path) -> None:
    """One row per rank, `score` labelled in every 4th row: most steps some rank has nothing to score for it. Its
    head got no gradient there: DDP waited for it and the ranks' collectives went out of step (gloo aborted)."""
    from tests.test_own_data import write_table

    table = write_table(tmp_path / "data", n=32)
    lines = table.read_text().splitlines()
    table.write_text("\n".join([lines[0] + ",score"] + [f"{line},{i * 0.5 if i % 4 == 0 else ''}"
                                                         for i, line in enumerate(lines[1:])]) + "\n")  # fmt: skip
    mp.spawn(_gap_worker, args=(str(tmp_path), free_port(), str(table)), nprocs=2, join=True)
    logged = [json.loads(line) for line in (tmp_path / "runs" / "gaps" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in logged) == 10 and (tmp_path / "runs" / "gaps" / "summary.json").is_file()
