"""Paths and files of a run: `~` in every path key and output, the split of tiny classes, run files written
whole (a hard-linked copy of a run leaves the original alone), strict JSON, ids kept as written."""

from __future__ import annotations

import pytest

from fusionkit.data import Example, MultimodalDataset, split_dataset


def _labelled(labels: list[str]) -> MultimodalDataset:
    names = sorted(set(labels))
    examples = [Example(str(i), f"caption {i}", None, {"y": names.index(y)}) for i, y in enumerate(labels)]
    return MultimodalDataset(examples, {"y": names}, {"y": "classification"})


@pytest.mark.parametrize("seed", range(8))
def test_a_class_too_small_for_every_split_is_trained_on(seed: int) -> None:
    """A class with one row goes to train, with two to train and val, whatever the seed: the rounding carried
    across classes had put such a class's only row in val, where the model never learns it."""
    labels = ["a"] * 2 + ["b", "c", "d"] + ["e"] * 30
    ds = _labelled(labels)
    parts = split_dataset(ds, (0.8, 0.1, 0.1), seed)
    label_of = {ex.id: labels[int(ex.id)] for ex in ds}
    in_train = {label_of[i] for i in parts["train"].ids}
    assert in_train == {"a", "b", "c", "d", "e"}
    assert "a" in {label_of[i] for i in parts["val"].ids}  # its second row: val, then test
    assert sum(len(p) for p in parts.values()) == len(ds)
