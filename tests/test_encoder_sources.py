"""Encoders follow what their own folders and files say: the HF image processor's pixels, a timm checkpoint's
weights (all of them), timm's data config, and a timm `local-dir:` folder that later moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionkit import FusionProcessor
from fusionkit.config import ConfigError
from fusionkit.models import create_model


def _hf_vit(path: Path, **processor: object) -> None:
    """A tiny random HF ViT folder whose processor resizes to height x width (no crop), as ViT/SigLIP/BEiT do."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(path)  # fmt: skip
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
                      **processor).save_pretrained(path)  # fmt: skip


@pytest.mark.parametrize("processor", [{}, {"resample": 3}, {"do_normalize": False}, {"do_rescale": False}])
def test_an_hf_image_processors_pixels_are_the_ones_fusionkit_feeds(tmp_path: Path, processor: dict) -> None:
    from transformers import AutoImageProcessor

    _hf_vit(tmp_path, **processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 40, 3), dtype=np.uint8))  # 40 x 12
    model = create_model("tiny", image={"backend": "hf", "name": str(tmp_path)})
    ours = FusionProcessor.from_model(model)(images=[image])["pixel_values"]
    theirs = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    level = (1 / 255 if processor.get("do_rescale", True) else 1.0) / (0.4 if processor.get("do_normalize", True) else 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1.01 * level)  # uint8 rounding apart


def test_an_hf_image_processor_that_does_not_resize_is_refused(tmp_path: Path) -> None:
    _hf_vit(tmp_path, do_resize=False)
    with pytest.raises(ConfigError, match="do_resize: false"):
        create_model("tiny", image={"backend": "hf", "name": str(tmp_path)})


def test_a_squash_to_one_shape_then_a_crop_of_another_is_refused(tmp_path: Path) -> None:
    """Resize to 40x48, then crop 32x32: one crop_pct cannot scale both sides as transformers does (pixels were
    up to 12 levels off, silently); a crop of the resize's own shape is followed."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(tmp_path)  # fmt: skip
    ViTImageProcessor(size={"height": 40, "width": 48}, do_center_crop=True,
                      crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match="resizes to 40x48 and then crops 32x32"):
        create_model("tiny", image={"backend": "hf", "name": str(tmp_path)})
    ViTImageProcessor(size={"height": 40, "width": 40}, do_center_crop=True,
                      crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)  # fmt: skip
    assert create_model("tiny", image={"backend": "hf", "name": str(tmp_path)}).image_preprocess.crop_pct == 0.8


def test_timm_preprocessing_is_timms_own_data_config_at_the_size_built() -> None:
    import timm
    import timm.data

    for kwargs in ({}, {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}):
        model = create_model("tiny", image={"name": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": kwargs})
        timm_cfg = timm.data.resolve_data_config({}, model=timm.create_model("vit_tiny_patch16_224", num_classes=0))
        pre = model.image_preprocess
        assert pre.size == ((32, 32) if kwargs else (224, 224))  # an img_size override changes the size only
        assert (pre.crop_pct, pre.interpolation, pre.mean) == (timm_cfg["crop_pct"], timm_cfg["interpolation"],
                                                               timm_cfg["mean"]) == (0.9, "bicubic", (0.5, 0.5, 0.5))  # fmt: skip


VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2}


def _timm_checkpoint(path: Path, prefix: str = "", **kwargs: object) -> dict[str, torch.Tensor]:
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("vit_tiny_patch16_224", num_classes=3, **{**VIT, **kwargs}).state_dict()
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))  # its classifier head too
    return state


@pytest.mark.parametrize("prefix", ["", "model.", "module."])
def test_a_timm_checkpoint_loads_every_weight_also_under_a_wrappers_prefix(tmp_path: Path, prefix: str) -> None:
    state = _timm_checkpoint(tmp_path / "vit.safetensors", prefix, depth=2)
    image = {"name": "vit_tiny_patch16_224", "checkpoint_path": str(tmp_path / "vit.safetensors")}
    loaded = create_model("tiny", image={**image, "model_kwargs": {**VIT, "depth": 2}}).image_encoder.model.state_dict()
    assert loaded.keys() == state.keys() - {"head.weight", "head.bias"}
    for k in loaded:
        torch.testing.assert_close(loaded[k], state[k], rtol=0, atol=0, msg=k)


def test_a_timm_checkpoint_of_another_depth_is_refused_naming_the_keys(tmp_path: Path) -> None:
    _timm_checkpoint(tmp_path / "vit.safetensors", depth=2)
    image = {"name": "vit_tiny_patch16_224", "checkpoint_path": str(tmp_path / "vit.safetensors")}
    with pytest.raises(ConfigError, match=r"vit\.safetensors does not fit .*12 of the model's weights are not in it "
                                          r"\(e\.g\. blocks\.2\."):  # fmt: skip
        create_model("tiny", image={**image, "model_kwargs": {**VIT, "depth": 3}})
    with pytest.raises(ConfigError, match=r"12 of its weights have no place in the model \(e\.g\. blocks\.1\."):
        create_model("tiny", image={**image, "model_kwargs": {**VIT, "depth": 1}})


def test_a_run_on_a_timm_local_dir_loads_from_anywhere_after_the_folder_moved(tmp_path: Path, monkeypatch) -> None:
    import timm
    import yaml
    from timm.models import save_for_hf

    import fusionkit

    args = {**VIT, "depth": 2}
    save_for_hf(timm.create_model("vit_tiny_patch16_224", num_classes=3, **args), tmp_path / "enc", model_args=args)
    monkeypatch.chdir(tmp_path)
    summary = fusionkit.train(overrides={
        "data.dataset": "synthetic:40", "data.cache_dir": "cache", "run.output_dir": "runs", "run.progress": False,
        "run.plots": False, "optim.epochs": 1, "model.image.name": "local-dir:enc", "model.freeze": "none"})  # fmt: skip
    run = tmp_path / summary["run_dir"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["image"]["name"]
    assert saved == f"local-dir:{tmp_path / 'enc'}"  # not relative to wherever training ran
    pixels = torch.zeros(1, 3, 32, 32)
    before = fusionkit.FusionModel.from_pretrained(run).image_encoder(pixels)
    (tmp_path / "enc").rename(tmp_path / "moved")  # the folder the run was trained from is gone
    monkeypatch.chdir(tmp_path / "moved")
    after = fusionkit.FusionModel.from_pretrained(run).image_encoder(pixels)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_a_config_files_timm_local_dir_is_relative_to_the_file_like_its_other_paths(tmp_path: Path, monkeypatch) -> None:
    import timm
    from timm.models import save_for_hf

    from fusionkit.training.config import build_config

    args = {**VIT, "depth": 2}
    save_for_hf(timm.create_model("vit_tiny_patch16_224", num_classes=3, **args), tmp_path / "enc", model_args=args)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("model:\n  image:\n    name: local-dir:../enc\n")
    (tmp_path / "a" / "elsewhere").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "elsewhere")  # ../enc from here names nothing
    assert build_config(tmp_path / "cfg" / "c.yaml").model.image.name == f"local-dir:{tmp_path / 'enc'}"
