"""`fusionkit.training.distributed` with two CPU processes (gloo): gathered contrastive negatives give the
single-process gradient, image-text matching draws the single-process derangement of the global batch,
and stop decisions reach every rank."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fusionkit.config import TaskConfig
from fusionkit.tasks import create_task
from fusionkit.tasks.alignment import shuffled_global_images
from fusionkit.tasks.base import FusionContext
from fusionkit.training import distributed as D

from .reliability_utils import free_port

ROWS = (5, 3)  # uneven local batches, as a tail batch split over two ranks can be


def _clip_loss(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    logits = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T / 0.07
    idx = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, idx) + F.cross_entropy(logits.T, idx))


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(sum(ROWS), 6, generator=g),
        torch.randn(sum(ROWS), 6, generator=g),
        torch.randn(6, 4, generator=g),
    )


def _loss_and_grad(
    text_in: torch.Tensor, image_in: torch.Tensor, w: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Encode with shared weights, gather, contrastive loss; the gradient averaged over ranks as DDP does."""
    w = w.clone().requires_grad_(True)
    loss = _clip_loss(D.gather_features(text_in @ w), D.gather_features(image_in @ w))
    loss.backward()
    grad = w.grad
    if D.is_distributed():
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return float(loss.detach()), grad


PAIRED = torch.tensor([True, True, False, True, True, False, False, False])  # rank 1's rows: no pair at all


def _itm_loss_and_grad(
    text: torch.Tensor, image: torch.Tensor, paired: torch.Tensor, w: torch.Tensor, seed: int
) -> tuple[float, torch.Tensor]:
    """The ITM task on a toy fusion (one shared linear map): the global batch's loss (the mean over ranks
    of each rank's share) and the gradient averaged over ranks as DDP does."""
    torch.manual_seed(seed)
    w = w.clone().requires_grad_(True)

    def fuse(t: torch.Tensor, m: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (t.mean(1, keepdim=True) + i.mean(1, keepdim=True)) @ w

    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    ctx = FusionContext(fuse(text, mask, image), text, mask, image, fuse, paired=paired)
    task = create_task(TaskConfig("match", "itm"))
    loss = task.loss(task.forward(lambda views: views.sum(-1), ctx), None, None)
    loss.backward()
    grad = w.grad
    if D.is_distributed():
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return float(D.mean_over_ranks(loss.detach())), grad


def _itm_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    text, image, w = _problem()
    return text.view(-1, 2, 3), image.view(-1, 2, 3), PAIRED, w[:3]


def _itm_negatives(image: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return shuffled_global_images(image)


def _worker(
    rank: int,
    port: int,
    expected_loss: float,
    expected_grad: torch.Tensor,
    negatives: torch.Tensor,
    itm: tuple[float, torch.Tensor],
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    assert D.init_distributed("cpu") == (rank, 2)
    try:
        text, image, w = _problem()
        rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
        loss, grad = _loss_and_grad(text[rows], image[rows], w)
        with torch.no_grad():  # evaluation: each rank keeps its own rows (no collective that could hang)
            assert D.gather_features(text[rows]).shape[0] == ROWS[rank]
        torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
        # each rank seeded differently: rank 0's draw is the one all use, so rows match one process's
        assert torch.equal(_itm_negatives(image[rows], seed=rank), negatives[rows])
        # uneven pairs (rank 1 holds none): the global batch's ITM loss and gradient, no rank left hanging
        itm_text, itm_image, paired, itm_w = _itm_problem()
        loss, grad = _itm_loss_and_grad(itm_text[rows], itm_image[rows], paired[rows], itm_w, seed=rank)
        torch.testing.assert_close(loss, itm[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, itm[1], rtol=1e-5, atol=1e-6)

        assert D.any_rank(rank == 1) and not D.any_rank(False)
        assert D.first_error("loss is nan" if rank == 1 else None) == "rank 1: loss is nan"
        assert D.first_error(None) is None
        assert D.broadcast_object({"stop": rank == 0}) == {"stop": True}  # rank 0 decides for all
        assert D.all_gather_object(rank * 10) == [0, 10]
        part = {"ids": [f"r{rank}"] * (rank + 1), "outputs": {"t": torch.full((rank + 1, 2), float(rank))},
                "labels": {}, "label_mask": {}, "loss": 1.0 + rank}  # fmt: skip
        merged = D.gather_inference(part)
        assert merged["ids"] == ["r0", "r1", "r1"] and merged["outputs"]["t"][:, 0].tolist() == [0, 1, 1]
        assert merged["loss"] == pytest.approx((1.0 * 1 + 2.0 * 2) / 3)
        # per-task (loss sum, rows) terms merge before the weighting, as one process would compute them
        terms = {"a": [2.0 * rank, 2 * rank], "b": [3.0, 1]}  # rank 0 has no row labelled for "a"
        merged = D.gather_inference({**part, "loss_terms": terms}, lambda t: t["a"][0] / t["a"][1] + t["b"][0] / t["b"][1])
        assert merged["loss_terms"] == {"a": [2.0, 2], "b": [6.0, 2]} and merged["loss"] == pytest.approx(1.0 + 3.0)
        D.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_gathered_contrastive_gradient_matches_one_process() -> None:
    expected = _loss_and_grad(*_problem())  # one process, the whole batch
    negatives = _itm_negatives(_problem()[1], seed=0)
    assert not (negatives == _problem()[1]).all(-1).any()  # every row got another example's image
    itm = _itm_loss_and_grad(*_itm_problem(), seed=0)
    assert itm[1].abs().sum() > 0
    mp.spawn(_worker, args=(free_port(), *expected, negatives, itm), nprocs=2, join=True)


def test_single_process_is_a_no_op() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather_features(x) is x
    assert D.rank_and_world() == (0, 1)
    assert D.any_rank(True) and D.first_error("boom") == "boom" and D.broadcast_object(7) == 7
    assert D.all_gather_object("a") == ["a"]


@pytest.mark.parametrize(("n", "world"), [(10, 2), (10, 3), (3, 2), (2, 4)])
def test_sharded_batches_are_whole_in_order_batches(n: int, world: int) -> None:
    shards = [list(D.ShardedBatchSampler(n, 3, rank, world)) for rank in range(world)]
    assert [b for s in shards for b in s] == [list(range(i, min(n, i + 3))) for i in range(0, n, 3)]


THREE = (4, 0, 3)  # the middle rank holds no row: rolls wrap across the other two
SEEDS = range(4)


def _rolls(rows: slice, seed_of: Callable[[int], int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`roll_global_rows` of `rows` of a fixed batch and the gradient of a weighted sum, one per seed."""
    full, weights = torch.randn(2, sum(THREE), 5, generator=torch.Generator().manual_seed(1))
    out = []
    for seed in SEEDS:
        torch.manual_seed(seed_of(seed))
        x = full[rows].clone().requires_grad_(True)
        rolled = D.roll_global_rows(x)
        (rolled * weights[rows]).sum().backward()
        out.append((rolled.detach(), x.grad))
    return out


def _roll_worker(rank: int, port: int, expected: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="3")
    torch.set_num_threads(1)
    D.init_distributed("cpu")
    try:
        rows = slice(sum(THREE[:rank]), sum(THREE[: rank + 1]))
        for (rolled, grad), (one, one_grad) in zip(_rolls(rows, lambda s: s + rank), expected, strict=True):
            assert torch.equal(rolled, one[rows]) and torch.equal(grad, one_grad[rows])  # rank 0's draw used
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_rolled_global_rows_over_three_ranks_match_one_process() -> None:
    expected = _rolls(slice(None), lambda s: s)  # one process, the whole batch
    mp.spawn(_roll_worker, args=(free_port(), expected), nprocs=3, join=True)
