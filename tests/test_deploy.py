"""A saved model folder loads as exactly the model written there, with its processor and tokenizer, or is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusionkit import FusionModel, FusionProcessor, create_model
from fusionkit.config import ConfigError


@pytest.mark.parametrize("gone", ["tokenizer*.json", "tokenizer.json"])
def test_a_saved_model_whose_tokenizer_is_gone_is_refused_naming_its_text_encoder(tmp_path: Path, gone: str) -> None:
    """transformers builds a 5-token stub tokenizer from what is left: every word [UNK], predictions changed."""
    model = tmp_path / "m"
    create_model("tiny").save_pretrained(model)
    for path in (model / "text_encoder").glob(gone):
        path.unlink()
    with pytest.raises(ConfigError, match=r"m/text_encoder has no tokenizer \(none of tokenizer.json"):
        FusionModel.from_pretrained(model)
    for path in model.glob(gone):  # the processor's copy beside the model, where a save writes one
        path.unlink()
    with pytest.raises(ConfigError, match=r"m(/text_encoder)? has no tokenizer .*copy the saved folder whole"):
        FusionProcessor.from_pretrained(model)


def test_a_saved_tokenizer_truncates_at_the_models_max_length_in_transformers(tmp_path: Path) -> None:
    """tokenizer_config.json said model_max_length 1e30: AutoTokenizer(truncation=True) kept every token."""
    from transformers import AutoTokenizer

    from fusionkit.models.tiny import tiny_tokenizer

    model = create_model("tiny")
    hub_like = tiny_tokenizer(int(1e30))  # what transformers gives a tokenizer saved without a limit
    FusionProcessor(hub_like, model.image_preprocess, max_length=12).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "tokenizer_config.json").read_text())["model_max_length"] == 12
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "p")
    assert len(tokenizer("a caption " * 30, truncation=True)["input_ids"]) == 12
