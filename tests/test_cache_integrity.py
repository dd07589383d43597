"""A cache is read only as built: its meta.json (ids, labels, rows) is checksummed like its arrays, and a
folder that lost files is named before anything is built, with the way out (delete it: it is rebuilt)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fusionkit import create_model
from fusionkit.data import build_cache, make_synthetic
from fusionkit.store import Store, StoreWriter, open_or_build
from fusionkit.training import build_features


def _fill(out: StoreWriter) -> dict[str, Any]:
    out.array("x", (3,), np.int64)[:] = [1, 2, 3]
    return {"ids": ["a", "b", "c"], "labels": [{"y": 0}, {"y": 1}, {"y": 0}]}


def _edit(meta_path: Path, change: Any) -> None:
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta, indent=1))  # valid JSON, as an editor or jq writes it


def test_a_meta_json_edited_or_without_checksums_is_damaged_and_a_reformatted_one_opens(tmp_path: Path) -> None:
    open_or_build(tmp_path / "s", _fill)
    _edit(tmp_path / "s" / "meta.json", lambda m: None)  # re-indented, same content
    assert Store(tmp_path / "s").meta["labels"][1] == {"y": 1}
    for name, change in [("labels", lambda m: m["labels"][1].update(y=0)),
                         ("files", lambda m: m.pop("_files")),
                         ("both", lambda m: (m.pop("_files"), m.pop("_meta_sha256")))]:  # fmt: skip
        shutil.copytree(tmp_path / "s", tmp_path / name)
        _edit(tmp_path / name / "meta.json", change)
        with pytest.raises(OSError, match=rf"cache folder .*{name} is damaged \(meta.json .*delete that folder"):
            open_or_build(tmp_path / name, _fill)


def test_labels_edited_in_a_feature_caches_meta_json_are_named_not_trained_on(tmp_path: Path) -> None:
    """Training takes the labels from the text store's meta.json: an edit there changed scores, no warning."""
    model = create_model("tiny")
    data = build_cache(make_synthetic(6, image_size=16), model.tokenizer, model.image_preprocess,
                       tmp_path / "cache", num_proc=1, progress=False)  # fmt: skip
    feats = build_features(model, data, tmp_path / "cache", batch_size=8, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "cache", copy)
    text_store = copy / feats.paths[0].name
    assert "-text-" in text_store.name

    def flip(meta: dict[str, Any]) -> None:
        for labels in meta["labels"]:
            labels.update({task: None for task in labels})

    _edit(text_store / "meta.json", flip)
    with pytest.raises(OSError, match=rf"cache folder .*{text_store.name} is damaged \(meta.json is not as built"):
        build_features(model, build_cache(make_synthetic(6, image_size=16), model.tokenizer, model.image_preprocess,
                                          copy, progress=False), copy, progress=False)  # fmt: skip
    _edit(copy / data.path.name / "meta.json", flip)  # the token/pixel cache's labels, read by unfrozen training
    with pytest.raises(OSError, match=rf"cache folder .*{data.path.name} is damaged \(meta.json is not as built"):
        build_cache(make_synthetic(6, image_size=16), model.tokenizer, model.image_preprocess, copy, progress=False)


def test_a_store_folder_that_lost_its_meta_json_is_named_before_anything_is_built(tmp_path: Path) -> None:
    """A partial copy or a deleted *.json: the whole build ran, then publishing failed with a bare
    '[Errno 39] Directory not empty', on every rerun."""
    open_or_build(tmp_path / "s", _fill)
    (tmp_path / "s" / "meta.json").unlink()
    built: list[int] = []

    def counted(out: StoreWriter) -> dict[str, Any]:
        built.append(1)
        return _fill(out)

    with pytest.raises(OSError, match=r"cache folder .*s is damaged \(meta.json is missing.*delete that folder"):
        open_or_build(tmp_path / "s", counted)
    assert built == [] and sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp folder left either
    shutil.rmtree(tmp_path / "s")  # as the message says: then it is rebuilt
    assert open_or_build(tmp_path / "s", counted).meta["ids"] == ["a", "b", "c"] and built == [1]
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose: built into
    assert open_or_build(tmp_path / "empty", _fill).meta["ids"] == ["a", "b", "c"]


def test_stores_an_older_version_built_are_said_once_with_their_size(tmp_path: Path, caplog) -> None:
    """After the cache version changes, the old folders are never read again: a build says they can go (once per
    cache folder), and leaves them (they are the user's to delete); stores of this version are not named."""
    old = tmp_path / "data-0123456789abcdef"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"version": 6, "_files": {}}))
    (old / "pixels.npy").write_bytes(b"\0" * 2_000_000)
    with caplog.at_level("WARNING", logger="fusionkit"):
        open_or_build(tmp_path / "new", _fill)
        open_or_build(tmp_path / "newer", _fill)
    said = [r.getMessage() for r in caplog.records if "an older fusionkit built" in r.getMessage()]
    assert len(said) == 1 and "1 cache folder(s)" in said[0] and "(2.0 MB)" in said[0]
    assert "data-0123456789abcdef" in said[0] and "new" not in said[0].split("e.g.")[1] and old.is_dir()
    import subprocess
    import sys

    script = ("from fusionkit.store import open_or_build; "  # another process (a new command) builds there
              f"open_or_build({str(tmp_path / 'newest')!r}, lambda out: {{}})")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "an older fusionkit built" not in done.stderr  # said already, not again
