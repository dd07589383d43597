"""A user's own data sources, fusions, tasks and image backends: registered in their modules, found by every
command through $FUSIONKIT_PLUGINS or entry points, and refused clearly when registered wrongly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torch import nn

import fusionkit
import fusionkit.registry
from fusionkit.cli import main
from fusionkit.config import ConfigError
from fusionkit.data.sources import SOURCES
from fusionkit.models.encoders import IMAGE_BACKENDS
from fusionkit.models.fusion import FUSION_REGISTRY
from fusionkit.tasks.base import TASK_REGISTRY
from tests.test_own_data import write_table

FAST = ["--optim.max_steps", "1", "--run.progress", "false", "--run.plots", "false"]

DB_SOURCE = """
import fusionkit

@fusionkit.register_source("fkdb", lambda obj: isinstance(obj, str) and obj.startswith("fkdb:"))
def read_db(spec, **options):
    return fusionkit.make_synthetic(int(spec.partition(":")[2]))
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], None]]:
    """`plugin(module, source)` writes an importable module; the registries, the imported plugins and
    sys.modules are as before after the test."""
    saved = [(r, dict(r)) for r in (SOURCES, FUSION_REGISTRY, TASK_REGISTRY, IMAGE_BACKENDS)]
    monkeypatch.setattr(fusionkit.registry, "_loaded", [])
    folder = tmp_path / "plugs"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names: list[str] = []

    def write(module: str, source: str) -> None:
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
        names.append(module)

    yield write
    for registry, before in saved:
        registry.clear()
        registry.update(before)
    for name in names:
        sys.modules.pop(name, None)


def test_a_spec_of_a_plugin_source_is_kept_as_written_by_train_eval_and_resume(
    plugin: Callable[[str, str], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fkdb:24` names data, not a file: not made absolute, not looked for on disk, from any directory."""
    plugin("fk_db", DB_SOURCE)
    monkeypatch.setenv("FUSIONKIT_PLUGINS", "fk_db")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "conf" / "db.yaml"
    config.parent.mkdir()
    config.write_text("data:\n  dataset: fkdb:24\n")  # a config file's paths are relative to its folder: not this
    assert fusionkit.build_config(config).data.dataset == "fkdb:24"
    assert fusionkit.build_config({"data": {"dataset": "fkdb:24"}}).data.dataset == "fkdb:24"
    run = tmp_path / "runs" / "db"
    argv = ["train", str(config), "--run.output_dir", str(run.parent), "--run.name", "db",
            "--data.cache_dir", str(tmp_path / "c"), *FAST]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((run / "config.json").read_text())["data"]["dataset"] == "fkdb:24"
    monkeypatch.chdir(tmp_path / "conf")
    assert main(["eval", str(run), "--output", str(tmp_path / "m.json")]) == 0
    assert main(["train", "--resume", str(run)]) == 0


def test_the_data_of_a_run_whose_source_is_not_registered_is_said_to_need_its_plugin(
    plugin: Callable[[str, str], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    plugin("fk_db", DB_SOURCE)
    monkeypatch.setenv("FUSIONKIT_PLUGINS", "fk_db")
    assert main(["train", "--data.dataset", "fkdb:24", "--run.output_dir", str(tmp_path / "runs"), "--run.name",
                 "db", "--data.cache_dir", str(tmp_path / "c"), *FAST]) == 0  # fmt: skip
    SOURCES.pop("fkdb")
    monkeypatch.setattr(fusionkit.registry, "_loaded", [])
    monkeypatch.delenv("FUSIONKIT_PLUGINS")  # a later shell without it
    assert main(["eval", str(tmp_path / "runs" / "db")]) == 1
    err = capsys.readouterr().err
    assert "fkdb:24, the data" in err and "no registered source reads it as written" in err
    assert "$FUSIONKIT_PLUGINS" in err


def test_train_of_a_train_config_saves_its_relative_paths_absolute(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As the command line and a dict do: `fusionkit eval RUN` from another directory then finds the data."""
    write_table(tmp_path / "data", n=24)
    monkeypatch.chdir(tmp_path)
    cfg = fusionkit.TrainConfig()
    cfg.data.dataset, cfg.data.cache_dir, cfg.data.split_file = "data/tweets.csv", "cache", "split.json"
    cfg.data.text_column, cfg.data.image_column = "caption", "photo"
    cfg.model.tasks = [fusionkit.TaskConfig(name="mood")]
    cfg.optim.max_steps, cfg.optim.batch_size = 1, 8
    cfg.run.output_dir, cfg.run.name, cfg.run.progress, cfg.run.plots = "runs", "r", False, False
    summary = fusionkit.train(cfg)
    data = json.loads((Path(summary["run_dir"]) / "config.json").read_text())["data"]
    assert data["dataset"] == str(tmp_path / "data" / "tweets.csv")
    assert data["cache_dir"] == str(tmp_path / "cache") and data["split_file"] == str(tmp_path / "split.json")
    assert cfg.data.dataset == "data/tweets.csv"  # the caller's config is not changed
    monkeypatch.chdir(tmp_path / "data")
    assert main(["eval", str(tmp_path / "runs" / "r"), "--output", str(tmp_path / "m.json")]) == 0


def test_an_image_backend_of_a_plugin_is_found_by_validation(
    plugin: Callable[[str, str], None], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ModelConfig.validate (train, from_pretrained in a new process) imports the plugins for an unknown
    backend, as fusion and task lookups do, and hints at them when it stays unknown."""
    argv = ["train", "--print-config", "--model.image.backend", "fk_patch"]
    assert main(argv) == 2
    assert "unknown image backend 'fk_patch'" in (err := capsys.readouterr().err) and "$FUSIONKIT_PLUGINS" in err
    plugin("fk_backend", """
        from fusionkit.models.encoders import IMAGE_BACKENDS, ImageEncoder

        @IMAGE_BACKENDS.register("fk_patch")
        class Patch(ImageEncoder):
            pass
    """)
    monkeypatch.setenv("FUSIONKIT_PLUGINS", "fk_backend")
    assert main(argv) == 0


def test_plugins_are_imported_only_for_a_name_no_one_registered(
    plugin: Callable[[str, str], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken plugin does not fail reads of built-in sources; a name nothing registers imports it."""
    plugin("fk_boom", "raise RuntimeError('boom in plugin')\n")
    monkeypatch.setenv("FUSIONKIT_PLUGINS", "fk_boom")
    table = write_table(tmp_path / "data", n=6)
    assert len(fusionkit.load_dataset("synthetic:8")) == 8
    assert len(fusionkit.load_dataset(str(table), text_column="caption", image_column="photo")) == 6
    monkeypatch.chdir(tmp_path / "data")
    assert fusionkit.build_config({"data": {"dataset": "tweets.csv"}}).data.dataset == str(table)
    with pytest.raises(ConfigError, match="plugin 'fk_boom' .*RuntimeError at fk_boom.py:1: boom in plugin"):
        fusionkit.load_dataset("fkdb:8")


def test_a_script_that_registers_its_names_and_is_named_as_a_plugin_runs(tmp_path: Path) -> None:
    """Its classes as `__main__` and as the imported module are one definition (one file), not a clash."""
    script = tmp_path / "fk_self.py"
    script.write_text(textwrap.dedent("""
        import fusionkit, fusionkit.models.fusion as f

        @fusionkit.register_fusion("fk_mean")
        class Mean(fusionkit.FusionStrategy):
            pass

        if __name__ == "__main__":
            fusionkit.load_plugins()  # as a lookup of an unknown name would
            print(f.FUSION_REGISTRY["fk_mean"].__module__)
    """))
    env = {**os.environ, "FUSIONKIT_PLUGINS": "fk_self", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fk_self"


def test_register_source_again_replaces_it_another_function_is_refused_naming_the_first(
    plugin: Callable[[str, str], None],
) -> None:
    import importlib

    plugin("fk_db", DB_SOURCE)
    module = importlib.import_module("fk_db")
    importlib.reload(module)  # a re-run notebook cell
    assert len(fusionkit.load_dataset("fkdb:5")) == 5
    with pytest.raises(ValueError, match=r"data source 'fkdb' is already registered \(by fk_db.read_db\)"):

        @fusionkit.register_source("fkdb", lambda obj: False)
        def other(spec: str, **options: object) -> None: ...


def test_accepts_is_given_a_path_for_an_existing_file_and_one_that_raises_is_named(
    plugin: Callable[[str, str], None], tmp_path: Path
) -> None:
    seen = []

    @fusionkit.register_source("fk_kv", lambda obj: seen.append(obj) or isinstance(obj, Path) and obj.suffix == ".kv")
    def read_kv(path: Path, **options: object) -> fusionkit.MultimodalDataset:
        return fusionkit.make_synthetic(int(path.read_text()))

    (tmp_path / "a.kv").write_text("7")
    assert len(fusionkit.load_dataset(str(tmp_path / "a.kv"))) == 7
    assert seen == [str(tmp_path / "a.kv"), tmp_path / "a.kv"]  # as written, then as the existing file's Path

    @fusionkit.register_source("fk_sloppy", lambda p: p.suffix == ".kv2")
    def read(path: Path, **options: object) -> None: ...

    with pytest.raises(ConfigError, match=r"data source 'fk_sloppy' \(registered by .*read\): its accepts raised "
                                          r"AttributeError: 'str' object has no attribute 'suffix'"):  # fmt: skip
        fusionkit.load_dataset(str(tmp_path / "a.kv"))


@pytest.mark.parametrize(
    ("register", "said"),
    [
        (lambda: fusionkit.register_fusion(3), "fusion strategy name: expected a non-empty str, got 3"),
        (lambda: fusionkit.register_fusion(""), "fusion strategy name: expected a non-empty str, got ''"),
        (lambda: fusionkit.register_fusion("fk_x")(lambda cfg: cfg), "fusion strategy 'fk_x': expected a subclass"),
        (lambda: fusionkit.register_task("fk_x")(object), "task type 'fk_x': expected a subclass"),
        (lambda: fusionkit.register_fusion("fk_x")(nn.Linear),
         "fusion strategy 'fk_x': expected a subclass of fusionkit.models.fusion.FusionStrategy"),
        (lambda: IMAGE_BACKENDS.register("fk_x")(nn.Module),
         "image backend 'fk_x': expected a subclass of fusionkit.models.encoders.ImageEncoder"),
        (lambda: fusionkit.register_source("", bool), "data source name: expected a non-empty str"),
        (lambda: fusionkit.register_source("fk_x", "csv"), "data source 'fk_x': accepts must be a function"),
    ],
)
def test_an_invalid_registration_is_refused_when_written(plugin: Callable[[str, str], None],
                                                         register: Callable[[], object], said: str) -> None:
    with pytest.raises(TypeError, match=said.replace("(", r"\(")):
        register()
    assert "fk_x" not in {**FUSION_REGISTRY, **TASK_REGISTRY, **IMAGE_BACKENDS, **SOURCES}


def test_an_entry_point_is_loaded_with_its_attribute(plugin: Callable[[str, str], None], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`module:attr` is loaded as importlib.metadata does: the module imported, the attribute looked up."""
    plugin("fk_ep", """
        import fusionkit

        @fusionkit.register_fusion("fk_ep_mean")
        class Mean(fusionkit.FusionStrategy):
            pass
    """)
    info = tmp_path / "plugs" / "fk_ep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fk_ep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fusionkit.plugins]\nmine = fk_ep:Mean\n")
    assert FUSION_REGISTRY.get_class("fk_ep_mean").__module__ == "fk_ep"
    (info / "entry_points.txt").write_text("[fusionkit.plugins]\nmine = fk_ep:Missing\n")
    monkeypatch.setattr(fusionkit.registry, "_loaded", [])
    with pytest.raises(ConfigError, match="plugin 'fk_ep:Missing' .*has no attribute 'Missing'"):
        fusionkit.load_plugins()


def test_the_registration_api_says_what_it_takes_and_train_what_it_returns() -> None:
    for decorator in (fusionkit.register_fusion, fusionkit.register_task):
        assert "subclass" in (decorator.__doc__ or "")
    assert "accepts" in (fusionkit.register_source.__doc__ or "")
    assert "summary" in (fusionkit.train.__doc__ or "")
