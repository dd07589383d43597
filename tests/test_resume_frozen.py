"""A resumed run on frozen encoders of the user's own folder: its cached features must come from those encoders'
weights, not from the architecture rebuilt before the checkpoint is loaded (random: a random-feature cache was built
and trained on, with no error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusionkit.training.trainer import Trainer
from tests.encoder_folders import save_tiny_bert
from tests.test_train import crash_at_step_3, tiny_config, weights


@pytest.mark.parametrize("freeze", ["encoders", "top_k"])
def test_a_resume_on_frozen_encoders_of_a_folder_trains_like_one_run(tmp_path: Path, freeze: str) -> None:
    save_tiny_bert(tmp_path / "bert", seed=3)
    extra = {"model.text.name": str(tmp_path / "bert"), "model.text.max_length": 32, "model.freeze": freeze,
             "data.feature_cache": True,
             **({"model.trainable_layers": 1} if freeze == "top_k" else {})}  # fmt: skip
    reference = Trainer(tiny_config(tmp_path, "reference", **extra))
    ref_summary = reference.fit()
    crash_at_step_3(Trainer(tiny_config(tmp_path, "interrupted", **extra)))
    resumed = Trainer(tiny_config(tmp_path, "interrupted", **extra), resume=True)
    summary = resumed.fit()
    ref_w, res_w = weights(reference), weights(resumed)
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)
    assert summary["val"] == ref_summary["val"]
