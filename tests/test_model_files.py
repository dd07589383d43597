"""A model's files belong together: weights are tied to the config they were saved with, damaged bytes are
found, a run's checkpoint predicts the run's classes, and a run dir on two disks still loads."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import fusionkit
from fusionkit import FusionModel, FusionProcessor
from fusionkit.training import train
from tests.test_train import tiny_config


def _tiny(classes: list[str], seed: int = 0) -> FusionModel:
    torch.manual_seed(seed)
    return fusionkit.create_model("tiny", tasks=[{"name": "mood", "class_names": classes}]).eval()


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run on frozen encoders: its checkpoints share one frozen_encoders.safetensors."""
    root = tmp_path_factory.mktemp("frozen")
    train(tiny_config(root, "frz", **{"model.freeze": "encoders", "data.dataset": "synthetic:40", "optim.epochs": 1}))
    return root / "runs" / "frz"


def test_a_frozen_encoder_run_with_its_checkpoints_on_another_disk_loads(frozen_run: Path, tmp_path: Path) -> None:
    """checkpoints/ linked to another disk: the shared file is found beside the run (`..` taken on the path
    as the user gave it, not after following the link)."""
    run = shutil.copytree(frozen_run, tmp_path / "run")
    assert (run / "frozen_encoders.safetensors").is_file()
    reference = FusionModel.from_pretrained(run).state_dict()
    shutil.move(run / "checkpoints", tmp_path / "bigdisk")
    (run / "checkpoints").symlink_to(tmp_path / "bigdisk", target_is_directory=True)
    loaded = FusionModel.from_pretrained(run).state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)


def test_the_processor_pads_on_the_right_whatever_the_tokenizers_side(caplog: pytest.LogCaptureFixture) -> None:
    """Training's collator pads on the right; a left-padding tokenizer must not make a caption's prediction
    depend on the longer captions beside it."""
    model = _tiny(["neg", "pos"])
    model.tokenizer.padding_side = "left"
    mask = FusionProcessor.from_model(model)(texts=["ok", "what a lovely sunny day at the beach"])["attention_mask"]
    assert mask[0].tolist()[:2] == [1, 1] and mask[0, -1] == 0
    with caplog.at_level(logging.ERROR):  # the one-sided pairs are not the point here
        alone = model.predict(texts=["ok"])[0]
        beside = model.predict(texts=["ok", "what a lovely sunny day at the beach"])[0]
    assert alone == beside


def test_predict_refuses_a_dict_or_a_dataset_before_any_warning(caplog: pytest.LogCaptureFixture) -> None:
    datasets = pytest.importorskip("datasets")
    model = _tiny(["neg", "pos"])
    ds = datasets.Dataset.from_dict({"caption": ["a sunny day", "rain"], "mood": ["pos", "neg"]})
    for given in (ds, datasets.DatasetDict({"train": ds, "test": ds}), {"caption": ["a sunny day"]}):
        with caplog.at_level(logging.WARNING, logger="fusionkit"):
            with pytest.raises(TypeError, match=r"predict\(\) takes lists, not a .*texts=list\(ds\['caption'\]\)"):
                model.predict(texts=given)
        assert "have no image" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        with pytest.raises(TypeError, match=r"texts\[0\] is a dict"):
            model.predict(texts=list(ds))  # its rows: each a dict
    assert "have no image" not in caplog.text
