"""The Python API keeps the promises of the file/CLI path: configs built in code are checked and resolved as files
are, training leaves the caller's objects and global settings as they were, and documented examples run."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
import textwrap
import typing
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import fusionkit
from fusionkit import (
    FusionConfig,
    ModelConfig,
    TaskConfig,
    TrainConfig,
    build_config,
    get_config,
    split_dataset,
)
from fusionkit.config import ConfigError, to_dict
from fusionkit.training.config import set_options
from fusionkit.training.trainer import Trainer

SMALL = "minilm-dinov2-small"


def tiny_run(tmp_path: Path, name: str, **overrides: typing.Any) -> TrainConfig:
    base = {"data.dataset": "synthetic:40", "data.cache_dir": str(tmp_path / "cache"), "optim.max_steps": 1,
            "optim.batch_size": 8, "run.output_dir": str(tmp_path / "runs"), "run.name": name, "run.progress": False,
            "run.plots": False}  # fmt: skip
    return build_config(None, {**base, **overrides})


# ---------------------------------------------------------------------------------------- presets in code


def test_a_preset_set_in_code_is_the_model_trained() -> None:
    cfg = TrainConfig(preset=SMALL)
    assert cfg.model == get_config(SMALL)
    # what train() and a run's saved config.yaml make of it: the same preset and model
    for again in (build_config(to_dict(cfg)), build_config(to_dict(build_config(to_dict(cfg))))):
        assert (again.preset, again.model) == (SMALL, get_config(SMALL))
    # a file's partial model section still overrides its preset, and its complete one (a saved run) is kept
    changed = build_config({"preset": SMALL, "model": {"fusion": {"dim": 128}}})
    assert (changed.model.text.name, changed.model.fusion.dim) == (get_config(SMALL).text.name, 128)
    assert build_config(to_dict(changed)) == changed


def test_a_preset_changed_under_its_model_is_refused() -> None:
    """The model of the old preset would be trained under the new name: refused, saying how to do it."""
    cfg = build_config({"model": {"tasks": [{"name": "mood", "class_names": ["a", "b"]}]}})
    with pytest.raises(ConfigError, match=rf"preset is '{SMALL}' but model was built on preset 'tiny'.*get_config"):
        dataclasses.replace(cfg, preset=SMALL)
    cfg.preset = SMALL
    with pytest.raises(ConfigError, match="model was built on preset 'tiny'"):
        cfg.validate()
    with pytest.raises(ConfigError, match=f"preset '{SMALL}' cannot be set on a config whose model is built"):
        set_options(build_config({}), {"preset": SMALL})  # as a `fusionkit tune` search space would
    moved = dataclasses.replace(cfg, preset=SMALL, model=get_config(SMALL, tasks=[{"name": "mood"}]))
    assert (moved.model.text.name, moved.model.tasks[0].name) == (get_config(SMALL).text.name, "mood")


# ---------------------------------------------------------------------------------------- types in code


@pytest.mark.parametrize(
    "build,key",
    [(lambda: ModelConfig(tasks=[TaskConfig("mood", class_names="sad")]).validate(), "tasks[0].class_names"),
     (lambda: ModelConfig(fusion=FusionConfig(dim=[64])).validate(), "fusion.dim"),
     (lambda: dataclasses.replace(TrainConfig(), optim=dataclasses.replace(TrainConfig().optim, lr="fast")).validate(),
      "optim.lr")],
)  # fmt: skip
def test_a_config_built_in_code_gets_the_dict_paths_type_error(build: typing.Callable, key: str) -> None:
    with pytest.raises(ConfigError) as in_code:
        build()
    assert str(in_code.value).startswith(f"{key}: expected")
    # the same message as a dict / file with that value gives
    section, _, rest = key.partition(".")
    value = {"tasks[0].class_names": "sad", "fusion.dim": [64], "optim.lr": "fast"}[key]
    data = ({"model": {"tasks": [{"name": "mood", "class_names": value}]}} if section == "tasks[0]"
            else {"model": {section: {rest: value}}} if section == "fusion" else {section: {rest: value}})  # fmt: skip
    with pytest.raises(ConfigError) as from_dict:
        build_config(data)
    assert str(from_dict.value).removeprefix("model.") == str(in_code.value)


def test_a_config_built_in_code_is_coerced_as_a_file_is() -> None:
    model = ModelConfig(fusion=FusionConfig(dim="64"), tasks=[TaskConfig("mood", num_classes="2", class_names=["a", "b"])])
    assert (model.validate().fusion.dim, model.tasks[0].num_classes) == (64, 2)
    cfg = TrainConfig()
    assert dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr="1e-3")).validate().optim.lr == 1e-3


def test_an_int_key_takes_a_decimal_string_as_a_float_key_does() -> None:
    assert build_config({}, {"model.fusion.dim": "32", "optim.lr": "1e-4"}).model.fusion.dim == 32
    for odd in ("032", "0x20", "3_2"):  # what YAML 1.1 would read otherwise: still refused, with its hint
        with pytest.raises(ConfigError, match="not a plain decimal number"):
            build_config({}, {"model.fusion.dim": odd})


def test_split_dataset_refuses_what_the_config_refuses() -> None:
    ds = fusionkit.make_synthetic(20)
    with pytest.raises(ConfigError, match=r"ratios must be three non-negative fractions .* sum to 1, got \[0.5, 0.2, 0.2\]"):
        split_dataset(ds, (0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="seed: expected int, got str 'one'"):
        split_dataset(ds, seed="one")
    assert {k: p.ids for k, p in split_dataset(ds, seed="1").items()} == {k: p.ids for k, p in split_dataset(ds, seed=1).items()}


# ---------------------------------------------------------------------------------------- training leaves things be


def test_the_trainer_leaves_the_callers_config_unchanged(tmp_path: Path) -> None:
    rows = fusionkit.make_synthetic(24)
    df = pd.DataFrame({"id": rows.ids, "text": [ex.text for ex in rows], "image": [ex.image for ex in rows],
                       "mood": ["happy", "sad"] * 12})  # fmt: skip
    cfg = tiny_run(tmp_path, "df", **{"model.tasks": [{"name": "mood"}], "optim.lr": "1e-3"})
    before = copy.deepcopy(cfg)
    trainer = Trainer(cfg, data=df)
    assert trainer.cfg.model.tasks[0].class_names == ["happy", "sad"]  # the trainer's own copy has the data's
    assert cfg == before


@pytest.fixture
def torch_settings() -> typing.Iterator[None]:
    """The caller's deterministic-algorithms settings and CUBLAS_WORKSPACE_CONFIG, back after the test."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if saved[2] is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[2]


def test_training_restores_the_callers_torch_settings(tmp_path: Path, torch_settings: None) -> None:
    torch.use_deterministic_algorithms(False)
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    fusionkit.train(tiny_run(tmp_path, "a"))
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    # also when the run fails (a metric no task has), and a setting of the caller's own is kept as it was
    torch.use_deterministic_algorithms(True)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    with pytest.raises(ConfigError):
        Trainer(tiny_run(tmp_path, "b", **{"run.metric": "val/nothing/accuracy", "run.deterministic": True}))
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_training_leaves_the_callers_random_streams_where_they_were(tmp_path: Path, torch_settings: None) -> None:
    """A notebook's draws after `fusionkit.train` continue its own seeded streams, not run.seed's."""
    import random

    import numpy as np

    def draws() -> tuple[float, float, float]:
        return torch.rand(1).item(), random.random(), float(np.random.rand())  # noqa: NPY002

    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # noqa: NPY002
    expected = draws()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # noqa: NPY002
    fusionkit.train(tiny_run(tmp_path, "a"))
    assert draws() == expected


# ---------------------------------------------------------------------------------------- docs and types


def test_the_processor_docstring_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30), (200, 30, 30)).save("a.jpg")
    blocks = re.findall(r"\n\n((?:    .*\n)+)", fusionkit.processor.__doc__ or "")
    assert blocks
    scope = {"fusionkit": fusionkit, "FusionProcessor": fusionkit.FusionProcessor, "pil_image": Image.open("a.jpg")}
    for block in blocks:
        exec(textwrap.dedent(block), scope)  # noqa: S102 (the package's own docstring)
    assert scope["outputs"]["sentiment"].shape == (2, 3)


def test_embed_is_annotated_to_take_the_hf_model_too() -> None:
    from fusionkit.embed_shards import embed_to_shards
    from fusionkit.hf import FusionkitModel

    for fn in (fusionkit.embed, embed_to_shards):
        hints = typing.get_type_hints(fn, {**vars(sys.modules[fn.__module__]), "FusionkitModel": FusionkitModel})
        assert set(typing.get_args(hints["model"])) == {fusionkit.FusionModel, FusionkitModel}


def test_build_config_takes_a_train_config_as_train_does() -> None:
    """`build_config(cfg, overrides)` on a config built in code: a changed copy, the caller's untouched."""
    cfg = TrainConfig(optim=dataclasses.replace(TrainConfig().optim, lr=0.01))
    before = copy.deepcopy(cfg)
    changed = build_config(cfg, {"optim.epochs": 3})
    assert (changed.optim.lr, changed.optim.epochs) == (0.01, 3) and cfg == before
    with pytest.raises(ConfigError, match="model.fusion.dim"):  # its values are checked as a file's are
        build_config(cfg, {"model.fusion.dim": "wide"})


def test_an_image_encoder_name_of_another_type_reaches_the_type_check() -> None:
    """`ImageEncoderConfig(name=5)` raised AttributeError in `__post_init__` before validate() could say anything."""
    from fusionkit.config import ImageEncoderConfig

    assert ModelConfig(image=ImageEncoderConfig(name=5)).validate().image.name == "5"  # as a file's `name: 5` reads
    with pytest.raises(ConfigError, match=r"image\.name"):
        ModelConfig(image=ImageEncoderConfig(name=["vit"])).validate()


def test_a_train_config_takes_its_sections_as_dicts_as_a_file_gives_them() -> None:
    """`TrainConfig(model={...})` raised AttributeError; a dict section reads as a file's: `model` over the preset."""
    cfg = TrainConfig(preset=SMALL, model={"fusion": {"dim": 64}, "tasks": [{"name": "mood"}]}, optim={"lr": "1e-3"})
    assert cfg.model.text.name == get_config(SMALL).text.name and cfg.model.fusion.dim == 64
    assert [t.name for t in cfg.model.tasks] == ["mood"] and cfg.optim.lr == 1e-3
    assert cfg == build_config({"preset": SMALL, "model": {"fusion": {"dim": 64}, "tasks": [{"name": "mood"}]},
                                "optim": {"lr": 1e-3}})  # fmt: skip
    with pytest.raises(ConfigError, match="model: expected a ModelConfig or a dict, got str"):
        TrainConfig(model="tiny")  # type: ignore[arg-type]


def test_a_second_run_in_one_process_says_its_warnings_again_and_cli_main_leaves_logging_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A notebook's second run (or `cli.main` command) says the warnings its data calls for, though an earlier one
    in the process said them; `cli.main` puts the caller's logging back (no root handler or level left set)."""
    import logging

    from fusionkit.cli import main
    from fusionkit.training.metrics import warn_unscored_classes

    for _ in range(2):
        caplog.clear()
        fusionkit.train(tiny_run(tmp_path, None))
        with caplog.at_level(logging.WARNING):
            warn_unscored_classes("mood", ["rare"], 3, "val")
            warn_unscored_classes("mood", ["rare"], 3, "val")  # every epoch's val: once per run
        assert caplog.text.count("class(es) ['rare'] have no labelled or predicted row in val") == 1
    root, ours = logging.getLogger(), logging.getLogger("fusionkit")
    handlers, level = list(root.handlers), ours.level
    root.handlers = []  # a fresh notebook's logging: none configured
    try:
        assert main(["eval", str(tmp_path / "runs"), "--split", "val"]) != 0  # a folder of runs: an error
        assert root.handlers == [] and ours.level == level
    finally:
        root.handlers = handlers


def test_class_names_a_font_lacks_are_said_once_per_plot_not_once_per_glyph(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    import pandas as pd

    from fusionkit.data import make_synthetic

    rows = make_synthetic(40, seed=0, image_size=32).examples
    names = {"positive": "悲しい気分の長いクラス名", "neutral": "neutre", "negative": "مقبول نوعا ما"}
    frame = pd.DataFrame({"text": [r.text for r in rows], "image": [r.image for r in rows],
                          "sentiment": [names[r.labels["sentiment"]] for r in rows]})  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fusionkit.train(tiny_run(tmp_path, "cjk", **{"run.plots": True, "optim.max_steps": 2,
                                                     "model.tasks": [{"name": "sentiment"}]}), data=frame)
    assert not [w for w in caught if "missing from font" in str(w.message)]
    said = [r.getMessage() for r in caplog.records if "the plot's font lacks" in r.getMessage()]
    assert len(said) == len(set(said)) <= 2  # at most once per confusion PNG (val, test)
    assert (tmp_path / "runs" / "cjk" / "confusion_val_sentiment.png").stat().st_size > 0


def test_a_run_trained_from_another_runs_config_fits_its_own_target_statistics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """config.yaml records the target mean and std a regression was standardized by; a new run from it on other
    data fits its own (the old ones gave r2 -754), while a resume keeps the run's."""
    import pandas as pd
    import yaml

    from fusionkit.data import make_synthetic

    rows = make_synthetic(40, seed=0, image_size=32).examples
    frame = pd.DataFrame({"text": [r.text for r in rows], "image": [r.image for r in rows],
                          "score": [float(i % 7) for i in range(40)]})  # fmt: skip
    tasks = {"model.tasks": [{"name": "score", "type": "regression"}]}
    fusionkit.train(tiny_run(tmp_path, "a", **tasks), data=frame)
    scaled = frame.assign(score=frame.score * 1000 + 50_000)
    fusionkit.train(tmp_path / "runs" / "a" / "config.yaml", data=scaled, overrides={"run.name": "b"})
    split = json.loads((tmp_path / "runs" / "b" / "split.json").read_text())
    train = scaled.score.iloc[[int(i) for i in split["train"]]]
    params = yaml.safe_load((tmp_path / "runs" / "b" / "config.yaml").read_text())["model"]["tasks"][0]["params"]
    assert params["target_mean"] == [pytest.approx(train.mean())]
    assert params["target_std"] == [pytest.approx(train.std(ddof=0))]
    assert "params.target_mean, params.target_std are statistics of a train split" in caplog.text
