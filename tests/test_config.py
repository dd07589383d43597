import json
from pathlib import Path

import pytest

from fusionkit.config import ConfigError, FusionConfig, ModelConfig, from_dict, merge, parse_value, to_dict
from fusionkit.models import get_config, list_presets
from fusionkit.training import build_config


def test_round_trip_through_json():
    cfg = get_config("tiny", fusion={"strategy": "gated"})
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['depht'\]"):
        from_dict(FusionConfig, {"depht": 2})
    with pytest.raises(ConfigError, match="fusion.dim: expected int, got str"):
        from_dict(ModelConfig, {"fusion": {"dim": "wide"}})
    with pytest.raises(ConfigError, match="expected int, got bool"):
        from_dict(FusionConfig, {"depth": True})


def test_dotted_and_nested_overrides():
    cfg = get_config("tiny")
    out = merge(cfg, {"fusion.depth": 3, "text": {"max_length": 32}})
    assert out.fusion.depth == 3 and out.text.max_length == 32
    assert out.fusion.dim == cfg.fusion.dim and cfg.fusion.depth != 3  # original untouched
    with pytest.raises(ConfigError, match="not a config section"):
        merge(cfg, {"fusion.strategy.x": 1})


def test_validation_catches_impossible_values():
    with pytest.raises(ConfigError, match="unknown task type 'ranking'"):
        get_config("tiny", tasks=[{"name": "x", "type": "ranking"}])
    with pytest.raises(ConfigError, match="label_smoothing"):
        get_config("tiny", tasks=[{"name": "x", "label_smoothing": 1.5}])
    with pytest.raises(ConfigError, match="class_names"):
        get_config("tiny", tasks=[{"name": "x", "class_names": ["a", "a"]}])
    with pytest.raises(ConfigError, match="class_weights"):
        get_config("tiny", tasks=[{"name": "x", "class_names": ["a", "b"], "class_weights": [1.0]}])
    with pytest.raises(ConfigError, match="unique"):
        get_config("tiny", tasks=[{"name": "x"}, {"name": "x"}])
    with pytest.raises(ConfigError, match="divisible"):
        get_config("tiny", fusion={"dim": 30, "num_heads": 4})
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_config("huge")
    assert "tiny" in list_presets()


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3), ("0.5", 0.5), ("true", True), ("gated", "gated"), ("[1, 2]", [1, 2]), ("None", None)],
)
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_public_api_is_exported():
    import fusionkit

    assert not [n for n in fusionkit.__all__ if not hasattr(fusionkit, n)]
    for name in ("create_model", "FusionModel", "embed", "Trainer", "load_dataset", "Collator", "RunConfig"):
        assert name in fusionkit.__all__
    # the names imported on first use are listed too (tab completion), and unknown names are still errors
    assert {"FusionkitModel", "FusionkitConfig", "export", "hf", "hub"} <= set(dir(fusionkit))
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        fusionkit.nonexistent  # noqa: B018


def test_example_configs_are_valid():
    from pathlib import Path

    from fusionkit.training import build_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = build_config(path)  # strict: an unknown key or wrong type would raise
        assert cfg.model.tasks and cfg.optim.epochs > 0, path


def test_paths_in_a_config_file_resolve_relative_to_the_file(tmp_path, monkeypatch, capsys):
    from fusionkit.cli import main
    from fusionkit.training import build_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    table = tmp_path / "data" / "t.csv"
    table.write_text("id,text,image\n")
    (tmp_path / "cfg" / "c.yaml").write_text(
        "data:\n  dataset: ../data/t.csv\n  split_file: split.json\n"
        "model:\n  text:\n    name: org/some-hub-model\n"
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = build_config("../cfg/c.yaml")
    assert Path(cfg.data.dataset).resolve() == table.resolve()
    assert Path(cfg.data.split_file).resolve() == (tmp_path / "cfg" / "split.json").resolve()
    assert cfg.model.text.name == "org/some-hub-model"  # a hub id is not a path
    assert main(["train", "../cfg/c.yaml", "--print-config", "--optim.lr", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed and "text_column: text" in printed and str(table.resolve()) in printed


def test_exponent_floats_read_from_yaml_and_json(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; a config file must still give the float."""
    from fusionkit.training import build_config

    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-4\n  ema_decay: 9.99e-1\n")
    cfg = build_config(tmp_path / "c.yaml")
    assert (cfg.optim.lr, cfg.optim.ema_decay) == (1e-4, 0.999)
    (tmp_path / "c.json").write_text(json.dumps({"optim": {"lr": 1e-05}}))
    assert build_config(tmp_path / "c.json").optim.lr == 1e-05
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        build_config(tmp_path / "bad.yaml")



@pytest.mark.parametrize(
    "name, text, match",
    [
        ("twice.yaml", "optim:\n  lr: 0.1\ntrain: 1\noptim:\n  ema_decay: 0.9\n", r"twice.yaml, line 4.*'optim' is given twice \(lines 1 and 4\)"),
        ("nested.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n", r"'lr' is given twice"),
        ("twice.json", '{"optim": {"lr": 0.1}, "optim": {"lr": 0.2}}', r"twice.json.*'optim' is given twice"),
        ("broken.yaml", "model:\n  fusion: {strategy: late\n", r"broken.yaml, line 3.*read as YAML"),
    ],
)
def test_a_config_key_given_twice_or_a_syntax_error_names_the_file_and_line(tmp_path, name, text, match):
    """YAML keeps the last of two equal keys silently; the user's first setting would be lost unseen."""
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        build_config(tmp_path / name)

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    """Every config under configs/ builds (keys, strategies, tasks, optimizer settings all checked)."""
    cfg = build_config(path)
    assert cfg.model.tasks, f"{path.name} declares no task"


def test_gpu_recipe_is_the_cpu_recipe_with_the_encoders_fine_tuned() -> None:
    """The GPU recipe must not drift from the CPU one it is reported against: same encoders, fusion and
    task; only what full fine-tuning changes (freeze, feature cache, epochs, encoder learning rates)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    cpu, gpu = build_config(root / "mvsa_single_best.yaml"), build_config(root / "mvsa_single_gpu.yaml")
    for part in ("text", "image", "fusion"):
        assert to_dict(getattr(gpu.model, part)) == to_dict(getattr(cpu.model, part)), part
    assert [to_dict(t) for t in gpu.model.tasks] == [to_dict(t) for t in cpu.model.tasks]
    assert (cpu.model.freeze, cpu.data.feature_cache) == ("encoders", True)
    assert (gpu.model.freeze, gpu.data.feature_cache, gpu.data.augment) == ("none", False, True)
    assert gpu.optim.layer_decay is not None and gpu.optim.encoder_lr_scale < cpu.optim.encoder_lr_scale


def test_a_setting_the_run_will_not_read_is_said_at_start(tmp_path, caplog) -> None:
    """Settings the run will not read (optim.layer_decay under freeze: encoders, a recipe moved from top_k;
    trainable_layers without top_k; modality dropout or image_grid on a one-sided baseline): said at start."""
    import logging

    from fusionkit.training import Trainer, build_config

    overrides = {"data.dataset": "synthetic:24", "data.cache_dir": str(tmp_path / "cache"), "optim.epochs": 1,
                 "run.output_dir": str(tmp_path / "runs"), "run.progress": False, "run.plots": False}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fusionkit.training"):
        Trainer(build_config(None, {**overrides, "model.freeze": "encoders", "optim.layer_decay": 0.8}))
    assert any("optim.layer_decay=0.8 has no effect" in r.getMessage() for r in caplog.records)
    caplog.clear()
    unread = {"model.freeze": "none", "model.text.trainable_layers": 1, "model.fusion.strategy": "text_only",
              "model.fusion.modality_dropout": 0.3, "model.fusion.image_grid": 2, "run.name": "unread",
              "model.loss_weighting": "uncertainty", "model.tasks": [{"name": "sentiment", "weight": 2.0}]}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fusionkit.training"):
        Trainer(build_config(None, {**overrides, **unread}))
    said = " ".join(r.getMessage() for r in caplog.records)
    for key in ("model.text.trainable_layers=1", "modality_dropout=0.3", "image_grid=2"):
        assert f"{key} has no effect" in said, key
    assert "task weights {'sentiment': 2.0} have no effect" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusionkit.training"):
        Trainer(build_config(None, {**overrides, "model.freeze": "top_k", "model.text.trainable_layers": 1,
                                    "optim.layer_decay": 0.8, "run.name": "top"}))  # fmt: skip
    assert not any("has no effect" in r.getMessage() for r in caplog.records)
    caplog.clear()  # image blocks that train on cached hidden states: augmentation cannot reach them
    top_image = {"model.freeze": "top_k", "model.image.trainable_layers": 1}
    with caplog.at_level(logging.WARNING, logger="fusionkit.training"):
        Trainer(build_config(None, {**overrides, **top_image, "run.name": "aug"}))
        assert "data.augment has no effect" in caplog.text
        caplog.clear()
        Trainer(build_config(None, {**overrides, **top_image, "data.augment": False, "run.name": "noaug"}))
    assert "has no effect" not in caplog.text


def test_an_image_grid_beyond_the_patch_grid_fails_before_any_cache(tmp_path) -> None:
    """The tiny ViT has a 4x4 patch grid (32 px / 8 px): image_grid 5 cannot pool to more tokens."""
    import pytest

    from fusionkit.config import ConfigError
    from fusionkit.training import Trainer, build_config

    overrides = {"data.dataset": "synthetic:24", "data.cache_dir": str(tmp_path / "cache"), "optim.epochs": 1,
                 "run.output_dir": str(tmp_path / "runs"), "run.progress": False, "run.plots": False}  # fmt: skip
    with pytest.raises(ConfigError, match=r"image_grid=5 exceeds the image encoder's 4x4 patch grid"):
        Trainer(build_config(None, {**overrides, "model.fusion.image_grid": 5}))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    Trainer(build_config(None, {**overrides, "model.fusion.image_grid": 4, "run.name": "ok"}))


def test_none_on_the_command_line_is_a_word_for_words_and_null_for_numbers(capsys) -> None:
    """README's `--model.freeze none` (a mode named none) and `--optim.layer_decay none` (no decay) both work."""
    from fusionkit.cli import main

    assert main(["train", "--model.freeze", "none", "--optim.layer_decay", "none", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "freeze: none" in printed and "layer_decay: null" in printed


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"run.seed": -1}, r"run.seed must be in \[0, 2\*\*32 - 1\]"),
        ({"data.split_seed": 2**40}, r"data.split_seed must be in \[0, 2\*\*32 - 1\]"),
        ({"model.fusion.mlp_ratio": float("inf")}, r"fusion.mlp_ratio must be finite"),
        ({"model.fusion.num_heads": 3}, r"model.fusion.dim=64 is not divisible by model.fusion.num_heads=3 .* e.g. 63 or 66"),
        ({"model.fusion.mlp_ratio": 1e-9}, r"fusion.mlp_ratio .*at least one hidden unit"),
        ({"model.tasks": [{"name": "sentiment", "class_weights": [0, 0, 0]}]}, r"class_weights .*one at least > 0"),
        ({"model.tasks": [{"name": "price", "type": "regression", "class_names": ["a"]}]}, r"has no classes"),
        ({"model.tasks": [{"name": "sentiment"}, {"name": "sc", "type": "supcon", "column": "tags",
                                                  "params": {"labels_from": "sentiment"}}]},
         r"reads the labels of task 'sentiment': remove its column"),
    ],
)
def test_values_that_would_fail_later_or_train_nothing_are_refused_naming_the_key(overrides, match) -> None:
    from fusionkit.training import build_config

    with pytest.raises(ConfigError, match=match):
        build_config(None, overrides).validate()
