"""Runs written by an older fusionkit (0.1) either work as they did, or are refused with a message naming the
version and what changed: never a false "your data changed", never a raw traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import fusionkit
from fusionkit.cli import main
from fusionkit.config import ConfigError
from fusionkit.data import dataset as dataset_module
from fusionkit.data.image import legacy_image_digest
from fusionkit.training import build_config, train
from fusionkit.training.rundir import RunDirError


def _overrides(root: Path, name: str) -> dict[str, Any]:
    return {
        "data.dataset": "synthetic:24", "data.cache_dir": str(root / "cache"), "data.split_ratios": [0.5, 0.25, 0.25],
        "optim.epochs": 1, "optim.batch_size": 4, "run.output_dir": str(root / "runs"), "run.name": name,
        "run.progress": False, "run.plots": False,
    }  # fmt: skip


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run on in-memory PIL images whose data_fingerprint.json is as fusionkit 0.1 wrote it: image
    digests of the old scheme (mode, size, pixels), no scheme or version recorded (its checkpoints record 0.1.0)."""
    root = tmp_path_factory.mktemp("upgrade")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset_module, "image_digest", legacy_image_digest)
        train(build_config(None, _overrides(root, "old")))
    run = root / "runs" / "old"
    path = run / "data_fingerprint.json"
    recorded = json.loads(path.read_text())
    assert recorded.pop("scheme") == 2 and recorded.pop("fusionkit_version") == fusionkit.__version__
    path.write_text(json.dumps(recorded))
    for config in (run / "checkpoints").glob("*/config.json"):  # its checkpoints say which version wrote them
        config.write_text(json.dumps({**json.loads(config.read_text()), "fusionkit_version": "0.1.0"}))
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("run.lock"))
    return copy


def _resume(run: Path, **kw: Any) -> dict[str, Any]:
    cfg = build_config(run / "config.yaml")
    cfg.run.output_dir, cfg.run.name = str(run.parent), run.name
    return train(cfg, resume=True, **kw)


def test_an_old_run_is_evaluated_on_its_own_unchanged_split(old_run: Path, tmp_path: Path) -> None:
    run = _copy(old_run, tmp_path)
    assert main(["eval", str(run), "--split", "test"]) == 0  # was: "the test split ... changed content"


def test_an_old_runs_fingerprints_are_compared_the_old_way_on_resume(old_run: Path, tmp_path: Path) -> None:
    run = _copy(old_run, tmp_path)
    _resume(run)  # its data unchanged: compared by 0.1's image digests, not refused as changed nor as uncheckable
    logged = json.loads((run / "resume_log.jsonl").read_text().splitlines()[-1])["data_changes"]
    assert logged == []
    recorded = json.loads((run / "data_fingerprint.json").read_text())
    assert recorded["scheme"] == 2 and recorded["fusionkit_version"] == fusionkit.__version__
    _resume(run)  # this version's own fingerprints from now on: compared, and equal


def test_an_old_fingerprint_without_the_data_to_recompute_it_is_not_called_changed(old_run: Path) -> None:
    """Where only a cache view is at hand (no examples), 0.1's fingerprint cannot be recomputed: not compared."""
    from fusionkit.training.rundir import data_changes

    saved = json.loads((old_run / "data_fingerprint.json").read_text())
    current = json.loads(json.dumps(saved))
    for entry in current["splits"].values():
        entry["fingerprint"] = "0" * 64
    changes = data_changes(saved, current, run_path=old_run)
    assert changes and all("not compared" in c and "content changed" not in c for c in changes)
    assert "recorded by fusionkit 0.1.0" in changes[0]  # its checkpoints name the version its file does not


def test_a_removed_config_key_says_where_it_went() -> None:
    with pytest.raises(ConfigError, match=r"data\.max_length was removed in fusionkit 0\.2.*model\.text\.max_length"):
        build_config({"data": {"max_length": None}})


def test_keys_added_since_or_removed_at_null_are_no_resume_change(old_run: Path, tmp_path: Path) -> None:
    run = _copy(old_run, tmp_path)
    path = run / "config.json"
    saved = json.loads(path.read_text())  # as 0.1 wrote it: data.max_length null, no keys added since
    saved["data"]["max_length"] = None
    for key in ("split_seed", "missing_text", "id_column"):
        del saved["data"][key]
    del saved["model"]["fusion"]["modality_dropout"]
    path.write_text(json.dumps(saved))
    (run / "data_fingerprint.json").unlink()  # only the config compared
    _resume(run)  # was: "resuming ... with a changed config: data.id_column: None -> 'id'; ..."


def test_an_optimizer_state_of_another_model_names_the_version(old_run: Path, tmp_path: Path) -> None:
    run = _copy(old_run, tmp_path)
    last = run / (run / "last").read_text().strip()
    meta = json.loads((last / "config.json").read_text())
    (last / "config.json").write_text(json.dumps({**meta, "fusionkit_version": "0.1.0"}))
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    state["optimizer"]["state"].pop(group["params"].pop(), None)  # a model with one parameter fewer
    torch.save(state, last / "trainer_state.pt")
    (run / "data_fingerprint.json").unlink()  # nothing else refused first
    with pytest.raises(RunDirError, match=r"written by fusionkit 0\.1\.0, whose model had 1 parameter tensors fewer.*"
                                          r"cannot be resumed.*eval"):  # fmt: skip
        _resume(run)


def test_a_split_numbering_rows_from_one_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """fusionkit 0.1 numbered the rows of a file without an id column from 1: such a split names the next row."""
    from tests.test_own_data import FAST, write_table

    table = write_table(tmp_path / "data", n=24)
    table.write_text("\n".join(",".join(line.split(",")[1:]) for line in table.read_text().splitlines()) + "\n")
    run = tmp_path / "runs" / "noid"
    assert main(["train", "--data.dataset", str(table), "--data.text_column", "caption", "--data.image_column",
                 "photo", "--data.id_column", "null", "--model.tasks", '[{"name": "mood"}]', "--run.output_dir",
                 str(run.parent), "--run.name", "noid", "--data.cache_dir", str(tmp_path / "cache"), *FAST]) == 0  # fmt: skip
    split = json.loads((run / "split.json").read_text())
    parts = ("train", "val", "test")
    assert sorted(int(i) for k in parts for i in split[k]) == list(range(24))  # rows count from 0
    old = {**split, **{k: [str(int(i) + 1) for i in split[k]] for k in parts}}
    (run / "split.json").write_text(json.dumps(old))  # as 0.1 wrote it
    capsys.readouterr()
    argv = ["predict", str(run), "--split", "test", "--output", str(tmp_path / "p.csv")]
    assert main(argv) != 0 and main([*argv, "--on-error", "skip"]) != 0
    assert "ids look like row numbers counted from 1" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()


def test_a_split_file_of_02_spelling_ids_like_0070_as_numbers_says_so(tmp_path: Path) -> None:
    """0.2 read an id written "007.0" as 7 and saved it so in split.json; 0.3 keeps "007.0": the run's split names
    ids the data lacks, which was blamed on lost rows."""
    from fusionkit.data import DataError, load_dataset, split_dataset

    (tmp_path / "img.png").write_bytes(b"")
    rows = "".join(f"{i:03d}.0,caption {i},img.png\n" for i in range(6))
    (tmp_path / "t.csv").write_text("pid,txt,pic\n" + rows)
    ds = load_dataset(tmp_path / "t.csv", text_column="txt", image_column="pic", id_column="pid", missing_image="keep")
    assert ds.ids[:2] == ["000.0", "001.0"]
    (tmp_path / "split.json").write_text(json.dumps({"train": ["0", "1", "2", "3"], "val": ["4"], "test": ["5"]}))
    with pytest.raises(DataError, match="usionkit 0.2 read an id written like 007.0"):
        split_dataset(ds, path=tmp_path / "split.json")
