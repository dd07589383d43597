"""Two CPU processes (gloo, DDP through Accelerate) train like one process with the same global batch.

One run covers a classification task, a contrastive task and an image-text matching task (their
negatives drawn from the global batch, over both ranks),
sharded evaluation (its metrics equal one process's), a `data.split_file` that differs from the
seeded split (both ranks must read it), and every rank's RNG state in the checkpoint. A SIGKILL of
one rank, then `resume`, ends bitwise where the uninterrupted 2-process run does (slow). A NaN loss
on one rank stops both ranks with the same error instead of hanging the other in an all-reduce.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fusionkit.config import ConfigError
from fusionkit.data import load_dataset
from fusionkit.training import checkpoint as ckpt
from fusionkit.training.config import build_config
from fusionkit.training.rundir import follow_pointer
from fusionkit.training.trainer import NonFiniteLossError, Trainer

from .reliability_utils import free_port

SENTIMENT = {"name": "sentiment", "type": "classification", "num_classes": 3,
             "class_names": ["positive", "neutral", "negative"]}  # fmt: skip
# contrastive and ITM negatives come from the global batch: both must match one process
TASKS = [SENTIMENT, {"name": "align", "type": "contrastive"}, {"name": "match", "type": "itm", "weight": 0.5}]


def config(tmp: Path, name: str, **overrides: object):
    return build_config(None, {**{
        "data.dataset": "synthetic:80", "data.cache_dir": str(tmp / "cache"),
        "data.split_file": str(tmp / "split.json"),
        "data.augment": False,  # random draws (augmentation, dropout) differ per rank: switch them off
        "model.text.config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "model.tasks": TASKS, "optim.batch_size": 16, "optim.eval_batch_size": 4, "optim.max_steps": 6,
        # BERT's key bias has a zero gradient in exact arithmetic (softmax ignores a shift): float noise
        # of ~1e-11 that Adam's default eps (1e-8) would turn into steps of random sign
        "optim.eps": 1e-6,
        "run.precision": "fp32", "run.output_dir": str(tmp / "runs"), "run.name": name, "run.progress": False,
        "run.plots": False, "run.device": "cpu", "run.checkpoint_every": 2,
    }, **overrides})  # fmt: skip


def write_split(tmp: Path, train: int = 64) -> Path:
    """A saved split that is not the one data.split_seed would draw (a rank that ignored it would train on other
    rows), with 64 train rows: 4 whole batches, so one and two processes see the same global batches."""
    ids = load_dataset("synthetic:80").ids
    order = torch.randperm(80, generator=torch.Generator().manual_seed(123)).tolist()
    split = {name: [ids[i] for i in order[a:b]] for name, a, b in (("train", 0, train), ("val", train, 72),
                                                                   ("test", 72, 80))}  # fmt: skip
    path = tmp / "split.json"
    path.write_text(json.dumps(split))
    return path


def _exit_quietly() -> None:
    """End a worker that finished its part without the interpreter's teardown, in which gloo's background
    threads now and then abort the process ("terminate called without an active exception") after the work
    and its results are done; a worker that failed raises before this, and spawn reports it."""
    os._exit(0)


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)


def fit_killing_rank_1(trainer: Trainer, rank: int, kill_at: int) -> None:
    """`trainer.fit()`; rank 1 is SIGKILLed right after optimizer step `kill_at` (0: never). Leaves the group."""
    try:

        def die_at_step(t: Trainer) -> None:
            if rank == 1 and t.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.step_callbacks.append(die_at_step)
        trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train_worker(rank: int, tmp: str, port: int, name: str, kill_at: int, resume: bool) -> None:
    """Train run `name` on 2 processes (DDP); see `fit_killing_rank_1`."""
    _join(rank, port)
    trainer = Trainer(config(Path(tmp), name), resume=resume)
    assert trainer.world == 2 and len(next(iter(trainer.train_sampler))) == 8  # half the global batch
    fit_killing_rank_1(trainer, rank, kill_at)
    _exit_quietly()


def two_processes(tmp: Path, name: str, kill_at: int = 0, resume: bool = False) -> None:
    mp.spawn(_train_worker, args=(str(tmp), free_port(), name, kill_at, resume), nprocs=2, join=True)


def _nan_worker(rank: int, tmp: str, port: int) -> None:
    _join(rank, port)
    try:
        trainer = Trainer(config(Path(tmp), "nan"))
        loss = trainer.model.criterion.forward

        def poisoned(*args, **kwargs):
            out = loss(*args, **kwargs)
            if rank == 1 and trainer.step == 2:
                out["loss"] = out["loss"] * float("nan")
            return out

        trainer.model.criterion.forward = poisoned
        try:
            trainer.fit()
        except NonFiniteLossError as e:
            Path(tmp, f"error-{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()
    _exit_quietly()


def _epoch_ends(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("epoch_end")]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(follow_pointer(run / "last") / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 6 steps (2 epochs, a checkpoint every 2 steps) in one process ("single") and in two ("ddp")."""
    tmp = tmp_path_factory.mktemp("distributed")
    write_split(tmp)
    single = Trainer(config(tmp, "single"))
    assert single.world == 1
    single.fit()
    two_processes(tmp, "ddp")
    return tmp


@pytest.mark.timeout(300)
def test_two_processes_train_and_evaluate_like_one(runs: Path) -> None:
    a, b = _weights(runs / "runs" / "single"), _weights(runs / "runs" / "ddp")
    init = Trainer(config(runs, "init")).model.state_dict()  # same seed: the starting weights
    assert [k for k in a if not torch.equal(a[k], init[k])], "training did not change the weights"
    assert not torch.equal(a["heads.align.logit_scale"], init["heads.align.logit_scale"])
    assert [k for k in a if k.startswith("heads.match.") and not torch.equal(a[k], init[k])]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-4, atol=1e-6, msg=k)
    # sharded evaluation (2 val batches, one per rank) gives one process's metrics
    one, two = _epoch_ends(runs / "runs" / "single"), _epoch_ends(runs / "runs" / "ddp")
    assert len(one) == len(two) == 2 and "val/align/r@1" in one[0] and "val/sentiment/accuracy" in one[0]
    assert "val/match/accuracy" in one[0]
    for x, y in zip(one, two):
        assert sorted(x) == sorted(y)
        for key, value in x.items():
            if key == "val/match/loss":  # ITM's eval negatives are drawn within each rank's shard: another draw
                continue
            assert y[key] == pytest.approx(value, rel=2e-4, abs=1e-6), key
    split = json.loads((runs / "split.json").read_text())
    assert json.loads((runs / "runs" / "ddp" / "split.json").read_text()) == split
    state = ckpt.load_state(follow_pointer(runs / "runs" / "ddp" / "last"))
    assert len(state["rng_per_rank"]) == 2  # each rank resumes its own random stream


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_of_one_rank_then_resume_matches_uninterrupted(runs: Path) -> None:
    with pytest.raises(mp.ProcessExitedException):  # rank 1 killed after step 3; rank 0 is torn down
        two_processes(runs, "killed", kill_at=3)
    assert follow_pointer(runs / "runs" / "killed" / "last").name == "step-00000002"
    two_processes(runs, "killed", resume=True)
    a, b = _weights(runs / "runs" / "ddp"), _weights(runs / "runs" / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _epoch_ends(runs / "runs" / "killed") == _epoch_ends(runs / "runs" / "ddp")


def uneven_config(tmp: Path, name: str):
    """Global batches of 9 rows (5 + 4 over two ranks) and a last one of 3 (2 + 1), 2 tasks, on 57 train rows."""
    return config(tmp, name, **{"model.tasks": TASKS[:2], "optim.batch_size": 9, "optim.max_steps": 7})


def _uneven_worker(rank: int, tmp: str, port: int) -> None:
    _join(rank, port)
    try:
        Trainer(uneven_config(Path(tmp), "ddp")).fit()
    finally:
        dist.destroy_process_group()
    _exit_quietly()


@pytest.mark.timeout(300)
def test_a_global_batch_split_unevenly_over_processes_trains_like_one_process(tmp_path: Path) -> None:
    """A rank's loss is the mean of its own rows: weighted by its share of the global batch, not averaged
    equally with the other rank's (a 5-row and a 4-row mean are not the mean of 9 rows)."""
    write_split(tmp_path, train=57)
    Trainer(uneven_config(tmp_path, "single")).fit()
    mp.spawn(_uneven_worker, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    a, b = _weights(tmp_path / "runs" / "single"), _weights(tmp_path / "runs" / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-4, atol=1e-6)
    # the logged train loss is the global batch's too (the ranks' means were averaged: 0.806 for 0.835)
    logged = [[(e["train/loss"], e["train/sentiment/loss"]) for e in map(json.loads, (tmp_path / "runs" / run /
               "metrics.jsonl").read_text().splitlines()) if "train/loss" in e] for run in ("single", "ddp")]  # fmt: skip
    assert logged[0] and torch.allclose(torch.tensor(logged[1]), torch.tensor(logged[0]), rtol=1e-5), logged


@pytest.mark.timeout(180)
def test_nan_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    write_split(tmp_path)
    mp.spawn(_nan_worker, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    errors = [(tmp_path / f"error-{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1]
    assert errors[0].startswith("rank 1: loss is nan at epoch 1, step 3")


def test_report_to_names_known_installed_trackers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.report_to: use any of \('tensorboard', 'wandb', 'mlflow'\)"):
        build_config(None, {"run.report_to": ["tensorbored"]}).validate()
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    write_split(tmp_path)
    cfg = config(tmp_path, "tb")
    cfg.run.report_to = ["tensorboard"]
    with pytest.raises(ConfigError, match=r"pip install tensorboard"):
        Trainer(cfg)
