"""`data.group_by_length`: batches of similar caption length, still one shuffled pass per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusionkit.training.config import build_config
from fusionkit.training.trainer import EpochBatchSampler, Trainer

LENGTHS = np.random.default_rng(0).integers(1, 65, size=203)  # a tail batch of 11 at batch size 32


def padded(batches: list[list[int]]) -> int:
    """Positions a batch padded to its longest caption holds, summed over the epoch."""
    return sum(int(LENGTHS[b].max()) * len(b) for b in batches)


def epoch(sampler: EpochBatchSampler, e: int, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(e, start)
    return list(sampler)


def test_grouped_epochs_are_shuffled_permutations_with_less_padding() -> None:
    grouped = EpochBatchSampler(len(LENGTHS), 32, seed=3, shuffle=True, lengths=LENGTHS, group=4)
    plain = EpochBatchSampler(len(LENGTHS), 32, seed=3, shuffle=True)
    e0, e1 = epoch(grouped, 0), epoch(grouped, 1)
    for batches in (e0, e1):
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        assert [len(b) for b in batches] == [32] * 6 + [11]  # the short tail stays last
    assert e0 != e1 and e0 == epoch(grouped, 0)  # seeded per epoch, as without grouping
    assert padded(e0) < 0.8 * padded(epoch(plain, 0))
    # batches differ from one epoch to the next (the groups are drawn from a new shuffle)
    assert {tuple(sorted(b)) for b in e0} != {tuple(sorted(b)) for b in e1}
    assert epoch(grouped, 1, start=4) == e1[4:]  # mid-epoch resume continues the same order


def test_grouped_ranks_split_the_one_process_batches() -> None:
    one = epoch(EpochBatchSampler(len(LENGTHS), 32, 0, True, lengths=LENGTHS), 2)
    ranks = [
        epoch(EpochBatchSampler(len(LENGTHS), 32, 0, True, rank=r, world=2, lengths=LENGTHS), 2)
        for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*ranks)] == one


def test_lengths_must_match_the_items() -> None:
    with pytest.raises(ValueError, match="3 lengths for 4 items"):
        EpochBatchSampler(4, 2, 0, True, lengths=[1, 2, 3])


@pytest.mark.parametrize("feature_cache", [False, True])
def test_trainer_batches_pad_less_with_group_by_length(tmp_path: Path, feature_cache: bool) -> None:
    def padding(grouped: bool) -> tuple[int, int]:
        cfg = build_config(None, {
            "data.dataset": "synthetic:300", "data.cache_dir": str(tmp_path / "cache"),
            "data.feature_cache": feature_cache, "model.freeze": "encoders" if feature_cache else "none",
            "data.group_by_length": grouped, "optim.batch_size": 8, "run.output_dir": str(tmp_path / "runs"),
            "run.name": f"g{int(grouped)}", "run.progress": False, "run.plots": False,
        })  # fmt: skip
        trainer = Trainer(cfg)
        trainer.train_sampler.set_epoch(0)
        masks = [b["attention_mask"] for b in trainer.train_loader]
        return sum(m.numel() for m in masks), sum(int(m.sum()) for m in masks)

    (grouped, tokens), (plain, same_tokens) = padding(True), padding(False)
    assert tokens == same_tokens  # every caption once per epoch either way
    assert grouped < plain
