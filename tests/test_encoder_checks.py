"""What the encoder adapters declare and the checks built on it: the image token layout `fusion.image_grid` pools,
the parameters that are not weight-decayed, a saved text encoder's files, the saved tokenizer's padding side."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import fusionkit
from fusionkit.cli import main
from fusionkit.config import ConfigError
from fusionkit.models import encoders
from fusionkit.training.optim import param_groups


def save_hf_image_encoder(path: Path, kind: str, size: tuple[int, int]) -> Path:
    """A tiny random HF ViT (CLS) or DINOv2 with 4 registers, with an image processor of height x width `size`."""
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, patch_size=8)
    if kind == "vit":
        model = ViTModel(ViTConfig(image_size=list(size), **common), add_pooling_layer=False)
    else:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(image_size=max(size), num_register_tokens=4, **common))
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": size[0], "width": size[1]}).save_pretrained(path)
    return path


def manual_pool(tokens: torch.Tensor, prefix: int, h: int, w: int, grid: int) -> torch.Tensor:
    """The prefix tokens, then the h x w patches averaged over each of grid x grid cells (adaptive pooling's cells)."""
    patches = tokens[:, prefix:].reshape(tokens.shape[0], h, w, -1)

    def cell(i: int, n: int) -> slice:
        return slice(i * n // grid, -(-(i + 1) * n // grid))

    cells = [patches[:, cell(i, h), cell(j, w)].mean(dim=(1, 2)) for i in range(grid) for j in range(grid)]
    return torch.cat([tokens[:, :prefix], torch.stack(cells, dim=1)], dim=1)


TIMM = "timm"
# (image encoder, prefix tokens, patch rows, patch columns, image_grid): non-square grids, with and without CLS/registers
LAYOUTS = [
    ({"name": "tiny", "model_kwargs": {"img_size": [24, 32]}}, 1, 3, 4, 2),  # timm CLS + 3x4 (read as 4 + 3x3)
    ({"name": "tiny", "model_kwargs": {"img_size": [32, 48], "class_token": False, "global_pool": "avg"}}, 0, 4, 6, 2),
    ({"name": "tiny", "model_kwargs": {"img_size": [16, 24], "reg_tokens": 2}}, 3, 2, 3, 1),  # CLS + 2 registers
    ("vit", 1, 4, 6, 2),  # HF ViT: CLS + 4x6 (read as 5x5, CLS pooled with patches)
    ("dinov2", 5, 2, 3, 1),  # HF DINOv2: CLS + 4 registers + 2x3
]


@pytest.mark.parametrize(("image", "prefix", "h", "w", "grid"), LAYOUTS)
def test_image_grid_pools_the_encoders_own_patch_grid(tmp_path, image, prefix, h, w, grid) -> None:
    """Pooling averages the real h x w patches into grid x grid cells and keeps every prefix token as it is."""
    if isinstance(image, str):
        image = {"backend": "hf", "name": str(save_hf_image_encoder(tmp_path / image, image, (8 * h, 8 * w)))}
    model = fusionkit.create_model("tiny", image={"backend": TIMM, **image}, fusion={"image_grid": grid}).eval()
    pixels = torch.randn(2, 3, 8 * h, 8 * w)
    with torch.no_grad():
        features = model.image_encoder(pixels)
        assert features.shape[1] == prefix + h * w  # the encoder built is the one described
        expected = model.image_proj(manual_pool(features, prefix, h, w, grid))
        torch.testing.assert_close(model.image_tokens(pixels), expected)
    assert expected.shape[1] == prefix + grid * grid


def test_image_grid_is_refused_where_the_layout_is_unknown_wrong_or_too_small(tmp_path, monkeypatch) -> None:
    """Refused at build, naming the setting: no guess from the token count."""
    image = {"backend": "hf", "name": str(save_hf_image_encoder(tmp_path / "vit", "vit", (32, 48)))}
    with pytest.raises(ConfigError, match=r"image_grid=5 exceeds the image encoder's 4x6 patch grid .*at most 4"):
        fusionkit.create_model("tiny", image=image, fusion={"image_grid": 5})
    monkeypatch.setitem(encoders.HF_PREFIX_TOKENS, "vit", 2)  # a wrong declaration: its output says otherwise
    with pytest.raises(ConfigError, match=r"outputs 25 tokens, not the 2 prefix \+ 4x6 patch tokens"):
        fusionkit.create_model("tiny", image=image, fusion={"image_grid": 2})
    monkeypatch.delitem(encoders.HF_PREFIX_TOKENS, "vit")  # a model type whose layout fusionkit does not know
    with pytest.raises(ConfigError, match=r"image_grid=2: the image encoder .* does not declare its token layout"):
        fusionkit.create_model("tiny", image=image, fusion={"image_grid": 2})
    assert fusionkit.create_model("tiny", image=image).image_tokens(torch.randn(1, 3, 32, 48)).shape[1] == 25


def test_each_encoder_adapter_declares_what_is_not_weight_decayed(tmp_path: Path) -> None:
    """Image encoders exempt position embeddings and class tokens (timm's rule), as a parameter or as the module
    holding one (CLIP's `position_embedding.weight`, which decayed); text encoders decay every matrix, BERT's
    position embeddings included, as BERT's recipe and HF's Trainer do (runs of earlier versions resume)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from fusionkit.config import ImageEncoderConfig
    from fusionkit.models.encoders import ImageEncoder

    model = fusionkit.create_model("tiny")
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"]
             for g in param_groups(model, fusionkit.OptimConfig(weight_decay=0.05, layer_decay=0.5))
             for p in g["params"]}  # fmt: skip
    embeddings = "text_encoder.model.embeddings"
    assert decay["image_encoder.model.pos_embed"] == decay["image_encoder.model.cls_token"] == 0.0
    assert decay[f"{embeddings}.position_embeddings.weight"] == decay[f"{embeddings}.word_embeddings.weight"] == 0.05
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path)  # fmt: skip
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    clip = ImageEncoder.build(ImageEncoderConfig("hf", str(tmp_path)))
    assert clip.no_weight_decay() == {"model.embeddings.position_embedding.weight", "model.embeddings.class_embedding"}


@pytest.mark.parametrize(("damage", "said"), [
    (lambda d: (d / "tokenizer.json").write_text(""), "text_encoder/tokenizer.json is empty"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"model_max'), "tokenizer_config.json is not valid JSON"),
    (lambda d: (d / "config.json").unlink(), "text_encoder has no config.json"),
])  # fmt: skip
def test_a_damaged_saved_text_encoder_is_named_with_the_fix(tmp_path, capsys, damage, said) -> None:
    """`fusionkit predict` on a saved model whose text encoder files are empty, cut short or missing names the file
    and says to restore the folder (it printed transformers' bare JSONDecodeError / "Unrecognized model")."""
    fusionkit.create_model("tiny").save_pretrained(tmp_path / "saved")
    damage(tmp_path / "saved" / "text_encoder")
    assert main(["predict", str(tmp_path / "saved"), "--text", "a happy day"]) == 2
    err = capsys.readouterr().err
    assert said in err and "restore the folder from the run, or copy the saved folder whole" in err


def test_a_left_padding_tokenizer_is_saved_padding_right(tmp_path) -> None:
    """fusionkit pads right whatever the tokenizer says; the saved tokenizer, which servers read, says so too
    (transformers' AutoTokenizer and the `tokenizers` library alone), even after a left-padded call."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model = fusionkit.create_model("tiny")
    model.tokenizer.padding_side = "left"
    model.tokenizer(["a happy day", "a"], padding=True)  # the backend keeps this call's padding, left
    model.save_pretrained(tmp_path / "saved")
    for folder in (tmp_path / "saved", tmp_path / "saved" / "text_encoder"):
        assert json.loads((folder / "tokenizer_config.json").read_text())["padding_side"] == "right"
        ids = AutoTokenizer.from_pretrained(folder)(["a happy day", "a"], padding=True)["input_ids"]
        assert ids[1][0] != 0 and ids[1][-1] == 0  # [CLS] first, pads after
        backend = Tokenizer.from_file(str(folder / "tokenizer.json")).encode_batch(["a happy day", "a"])
        assert backend[1].ids[0] != 0 and backend[1].ids[-1] == 0


def test_max_length_past_the_tokenizers_model_max_length_is_said_once(tmp_path, caplog) -> None:
    """Within the encoder's positions but past what its tokenizer says it was made for: a warning, once; none within
    it, none for transformers' 1e30 'no limit'."""
    from tests.encoder_folders import save_tiny_bert

    save_tiny_bert(tmp_path / "bert", seed=0)  # 32 positions
    config = json.loads((tmp_path / "bert" / "tokenizer_config.json").read_text())
    for name, limit in (("bert", 16), ("bert_nolimit", int(1e30))):
        if name != "bert":
            (tmp_path / name).mkdir()
            for f in (tmp_path / "bert").iterdir():
                (tmp_path / name / f.name).write_bytes(f.read_bytes())
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": limit}))
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        for name, max_length in (("bert", 16), ("bert", 24), ("bert", 24), ("bert_nolimit", 24)):
            fusionkit.create_model("tiny", text={"name": str(tmp_path / name), "max_length": max_length})
    said = [r.getMessage() for r in caplog.records if "model_max_length" in r.getMessage()]
    assert len(said) == 1 and "max_length=24 exceeds the model_max_length=16" in said[0] and "bert" in said[0]


def test_a_tokenizer_padding_to_a_fixed_length_is_saved_padding_to_the_longest(tmp_path) -> None:
    """MiniLM's tokenizer.json pads every caption to 128: served with the `tokenizers` library alone, a model of
    max_length 32 got [B, 128] batches (and past 128, ragged ones). Saved, it pads to the batch's longest."""
    from tokenizers import Tokenizer

    model = fusionkit.create_model("tiny")
    model.tokenizer.backend_tokenizer.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    model.save_pretrained(tmp_path / "saved")
    backend = Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    assert [len(e.ids) for e in backend.encode_batch(["a happy day", "a"])] == [5, 5]
