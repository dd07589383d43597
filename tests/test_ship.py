"""Shipping a model: a saved folder's config.json and processor_config.json agree; export.json says how to serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fusionkit import FusionModel, FusionProcessor, create_model
from fusionkit.config import ConfigError


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ship") / "saved"
    create_model("tiny").save_pretrained(folder)
    return folder


def _edit(folder: Path, name: str, change) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda m: m["model"]["text"].update(max_length=8), "model.text.max_length = 8 in config.json, max_length = 64"),
        (lambda m: m["image_preprocess"].update(crop_pct=0.5), "image_preprocess.crop_pct = 0.5 in config.json"),
    ],
)
def test_a_hand_edited_config_json_is_refused_by_model_and_processor(saved: Path, tmp_path: Path, change, said) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    _edit(folder, "config.json", change)
    for load in (FusionModel.from_pretrained, FusionProcessor.from_pretrained):
        with pytest.raises(ConfigError, match="processor_config.json disagree") as err:
            load(folder)
        assert said in str(err.value) and "save_pretrained" in str(err.value)


def test_an_older_processor_config_lacking_a_key_still_loads(saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    _edit(folder, "processor_config.json", lambda p: (p.pop("text_normalize"), p["image_preprocess"].pop("crop_offset")))
    FusionModel.from_pretrained(folder)
    assert FusionProcessor.from_pretrained(folder).max_length == 64
