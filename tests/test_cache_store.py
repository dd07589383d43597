"""The one store under both caches, and what the caches promise on top of it: keys that copies keeping
name, size and mtime cannot fool, skip lists replayed under "raise", concurrent and killed builders,
and presence flags for missing captions and images.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import fusionkit.data.cache as cache_mod
import fusionkit.store as store_mod
from fusionkit import create_model
from fusionkit.config import ImagePreprocess
from fusionkit.data import Collator, DataError, Example, MultimodalDataset, build_cache
from fusionkit.models.tiny import tiny_tokenizer
from fusionkit.store import Store, StoreWriter, open_or_build
from fusionkit.training import FeatureDataset, build_features
from fusionkit.training.feature_cache import FeatureCollator
from tests.reliability_utils import tally

PRE = ImagePreprocess(size=(16, 16))
CTX = mp.get_context("fork")  # the children only run numpy and the store module

# ------------------------------------------------------------------------------------------------ store


def _fill(out: StoreWriter, rows: int = 5, tag: str = "") -> dict[str, Any]:
    tokens = out.ragged("tokens", np.int32)
    feats = out.ragged("feats", np.float16, (3,))
    for i in range(rows):
        tokens.append(np.arange(i))
        feats.append(np.full((i + 1, 3), i))
    out.array("fixed", (rows, 2, 2), np.uint8)[:] = np.arange(rows)[:, None, None]
    return {"rows": rows, "tag": tag, "pid": os.getpid()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_store_round_trip_and_hit(tmp_path: Path) -> None:
    st = open_or_build(tmp_path / "s", _fill)
    tokens, feats = st.ragged("tokens"), st.ragged("feats")
    assert len(tokens) == 5 and [tokens[i].tolist() for i in range(5)] == [list(range(i)) for i in range(5)]
    assert feats[2].dtype == np.float16 and feats[2].shape == (3, 3) and float(feats[2].max()) == 2.0
    assert st.array("fixed")[3].tolist() == [[3, 3], [3, 3]] and st.meta["rows"] == 5
    assert _hidden(tmp_path) == []  # published under its name; no temp or lock file left beside it

    def never(out: StoreWriter) -> dict[str, Any]:
        raise AssertionError("rebuilt a store that exists")

    assert open_or_build(tmp_path / "s", never).meta == st.meta


def test_a_store_file_cut_short_later_names_the_folder_to_delete(tmp_path: Path) -> None:
    open_or_build(tmp_path / "s", _fill)
    with (tmp_path / "s" / "fixed.npy").open("r+b") as f:
        f.truncate(100)  # a copy that stopped, a disk that filled
    with pytest.raises(OSError, match=r"cache folder .*s is damaged \(fixed.npy.*delete that folder"):
        open_or_build(tmp_path / "s", _fill).array("fixed")


def test_a_store_altered_in_place_or_with_a_cut_meta_is_named_not_read(tmp_path: Path) -> None:
    """Same size, other bytes (and an unchanged mtime, as `cp -a` of a damaged copy keeps it): the checksums
    the build recorded catch what a size check cannot; a copy of an intact store opens."""
    open_or_build(tmp_path / "s", _fill)
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    assert Store(tmp_path / "copy").array("fixed")[3].tolist() == [[3, 3], [3, 3]]
    path = tmp_path / "s" / "feats.npy"
    stat = path.stat()
    with path.open("r+b") as f:
        f.seek(stat.st_size - 4)
        f.write(b"\0\1\2\3")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(OSError, match=r"cache folder .*s is damaged \(feats.npy is not as built.*delete that folder"):
        open_or_build(tmp_path / "s", _fill)
    (tmp_path / "copy" / "meta.json").write_text('{"rows": 5, "ta')  # cut short
    with pytest.raises(OSError, match=r"cache folder .*copy is damaged \(.*delete that folder"):
        Store(tmp_path / "copy")


def test_failed_build_publishes_nothing(tmp_path: Path) -> None:
    def broken(out: StoreWriter) -> dict[str, Any]:
        _fill(out)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        open_or_build(tmp_path / "s", broken)
    assert list(tmp_path.iterdir()) == []


def _build_in_child(path: str, log_dir: str, barrier: Any, queue: Any) -> None:
    def slow(out: StoreWriter) -> dict[str, Any]:
        (Path(log_dir) / f"built-by-{os.getpid()}").touch()
        time.sleep(0.5)  # long enough for the other process to arrive mid-build
        return _fill(out)

    barrier.wait()
    queue.put(open_or_build(path, slow).meta["pid"])


def test_two_processes_building_one_store_share_one_build(tmp_path: Path) -> None:
    path, logs = tmp_path / "cache" / "s", tmp_path / "logs"
    logs.mkdir()
    barrier, queue = CTX.Barrier(2), CTX.Queue()
    procs = [
        CTX.Process(target=_build_in_child, args=(str(path), str(logs), barrier, queue)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    winners = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(set(winners)) == 1 and len(list(logs.iterdir())) == 1  # one build, both use it
    assert _hidden(path.parent) == []


def test_without_locks_the_loser_of_the_rename_uses_the_winners_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "fcntl", None)  # e.g. a filesystem without locks: both build

    def loser(out: StoreWriter) -> dict[str, Any]:
        meta = _fill(out, tag="loser")
        open_or_build(tmp_path / "s", lambda o: _fill(o, tag="winner"))  # publishes first
        return meta

    assert open_or_build(tmp_path / "s", loser).meta["tag"] == "winner"
    assert _hidden(tmp_path) == []  # the loser's temp was discarded


def _killed_build(path: str, ready: Any) -> None:
    def hang(out: StoreWriter) -> dict[str, Any]:
        out.array("big", (8, 1024, 1024), np.uint8)[:] = 1  # 8 MB written, then killed
        ready.set()
        time.sleep(60)
        return {}

    open_or_build(path, hang)


def test_sigkilled_build_leaves_a_temp_that_the_next_build_removes(tmp_path: Path) -> None:
    ready = CTX.Event()
    proc = CTX.Process(target=_killed_build, args=(str(tmp_path / "a"), ready))
    proc.start()
    assert ready.wait(timeout=60)
    temps = _hidden(tmp_path)
    assert len(temps) == 1 and temps[0].startswith(".a.tmp-")
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert _hidden(tmp_path) == temps  # the kill left it behind
    open_or_build(tmp_path / "b", _fill)  # any later build in the folder cleans up
    assert _hidden(tmp_path) == [] and open_or_build(tmp_path / "a", _fill).meta["rows"] == 5


def test_without_locks_only_old_temps_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "fcntl", None)  # no way to tell a live build from a dead one but age
    old, fresh = tmp_path / ".x.tmp-store-1-aa", tmp_path / ".y.tmp-store-2-bb"
    for d in (old, fresh):
        d.mkdir()
    ancient = time.time() - store_mod.UNLOCKED_STALE_S - 60
    os.utime(old, (ancient, ancient))
    open_or_build(tmp_path / "s", _fill)
    assert _hidden(tmp_path) == [fresh.name]


# ------------------------------------------------------------------------------------------------ cache keys


def _image_dataset(folder: Path, n: int = 3, write: bool = True) -> MultimodalDataset:
    """`n` rows whose images are BMP files (their size is fixed by their shape); `write` creates them."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for i in range(n):
        if write:
            Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.bmp")
        examples.append(Example(f"r{i}", f"caption {i}", str(folder / f"{i}.bmp"), {"y": i}))
    return MultimodalDataset(examples, {}, name="imgs")


def test_image_replaced_keeping_size_and_mtime_is_not_served_stale(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    first = build_cache(_image_dataset(tmp_path / "data"), tok, PRE, tmp_path / "cache", num_proc=1)
    target, st = tmp_path / "data" / "1.bmp", (tmp_path / "data" / "1.bmp").stat()
    Image.new("RGB", (20, 20), (0, 0, 250)).save(tmp_path / "new.bmp")
    shutil.copy2(tmp_path / "new.bmp", target)  # what cp -p / rsync -a / tar -x do ...
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... with the old file's mtime
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = build_cache(_image_dataset(tmp_path / "data", write=False), tok, PRE, tmp_path / "cache")
    assert second.path != first.path
    assert (
        int(second[1]["pixel_values"][2].float().mean()) > 200 and int(first[1]["pixel_values"][2].max()) == 0
    )


def test_moved_dataset_keeps_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tiny_tokenizer()
    first = build_cache(_image_dataset(tmp_path / "data"), tok, PRE, tmp_path / "cache", num_proc=1)
    shutil.move(tmp_path / "data", tmp_path / "moved")
    monkeypatch.setattr(cache_mod, "preprocess_image", None)  # a rebuild would crash here
    assert build_cache(
        _image_dataset(tmp_path / "moved", write=False), tok, PRE, tmp_path / "cache"
    ).path == (first.path)


def test_cache_built_with_skip_still_raises_for_a_raise_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _image_dataset(tmp_path / "data", n=4)
    (tmp_path / "data" / "2.bmp").write_bytes(b"BM-not-really")
    (tmp_path / "data" / "3.bmp").unlink()
    tok = tiny_tokenizer()
    with pytest.raises(DataError) as from_build:
        build_cache(ds, tok, PRE, tmp_path / "cache", num_proc=1)
    skipped = build_cache(ds, tok, PRE, tmp_path / "cache", num_proc=1, on_error="skip")
    assert skipped.ids == ["r0", "r1"] and [s["item"] for s in skipped.skipped] == ["r2", "r3"]
    monkeypatch.setattr(cache_mod, "preprocess_image", None)  # from here on, served from the cache only
    with pytest.raises(DataError) as replayed:
        build_cache(ds, tok, PRE, tmp_path / "cache", num_proc=1)
    assert str(replayed.value) == str(from_build.value) and "item r2" in str(replayed.value)
    assert build_cache(ds, tok, PRE, tmp_path / "cache", on_error="skip").path == skipped.path
    tally("cache/skip_replayed_under_raise", rows_tried=4, rows_reported=len(skipped.skipped),
          rows_kept=len(skipped.ids))  # fmt: skip


# ------------------------------------------------------------------------------------------------ presence


def _ragged_dataset(tmp_path: Path) -> MultimodalDataset:
    img = tmp_path / "x.png"
    Image.new("RGB", (24, 24), (250, 250, 250)).save(img)
    rows = [("both", "a red bus", str(img)), ("no-text", None, str(img)), ("no-image", "only words", None)]
    return MultimodalDataset([Example(i, t, im, {"y": None}) for i, t, im in rows], {}, name="ragged")


def test_cache_items_carry_presence_and_missing_sides_are_never_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[object] = []
    real = cache_mod.preprocess_image
    monkeypatch.setattr(cache_mod, "preprocess_image", lambda src, pre: decoded.append(src) or real(src, pre))
    tok = tiny_tokenizer()
    data = build_cache(_ragged_dataset(tmp_path), tok, PRE, tmp_path / "cache", num_proc=1)
    items = {it["id"]: it for it in data}
    assert [(it["has_text"], it["has_image"]) for it in items.values()] == [
        (True, True),
        (False, True),
        (True, False),
    ]
    assert len(decoded) == 2 and int(items["no-image"]["pixel_values"].abs().sum()) == 0
    assert items["no-text"]["input_ids"].tolist() == tok("")["input_ids"]
    clone = pickle.loads(pickle.dumps(data))  # as spawned DataLoader workers get it: the path, reopened
    assert len(pickle.dumps(data)) < 1_000 and clone[2]["has_image"] is False
    batch = Collator(tok.pad_token_id, {})(list(items.values()))
    assert batch["text_present"].tolist() == [True, False, True]
    assert batch["image_present"].tolist() == [True, True, False]
    # An empty caption is a caption (has_text True): a different dataset, so a different cache.
    ds = _ragged_dataset(tmp_path)
    ds.examples[1].text = ""
    other = build_cache(
        MultimodalDataset(ds.examples, {}, name="ragged"), tok, PRE, tmp_path / "cache", num_proc=1
    )
    assert other.path != data.path and other[1]["has_text"]


def test_feature_cache_carries_presence_and_encodes_only_present_sides(tmp_path: Path) -> None:
    model = create_model("tiny")
    data = build_cache(
        _ragged_dataset(tmp_path), model.tokenizer, model.image_preprocess, tmp_path / "cache", num_proc=1
    )
    seen: dict[str, list[int]] = {"text": [], "image": []}
    for side, enc in (("text", model.text_encoder), ("image", model.image_encoder)):
        enc.register_forward_hook(lambda m, args, out, side=side: seen[side].append(len(args[0])))
    feats = build_features(model, data, tmp_path / "cache", batch_size=8, progress=False)
    assert seen == {"text": [2], "image": [2]}  # one batch; the missing side of a row never encoded
    assert isinstance(feats, FeatureDataset) and feats.ids == data.ids
    assert feats.fingerprint == data.fingerprint == _ragged_dataset(tmp_path).fingerprint
    items = [feats[i] for i in range(len(feats))]
    assert [(it["has_text"], it["has_image"]) for it in items] == [(True, True), (False, True), (True, False)]
    assert items[1]["text_features"].abs().sum() == 0 and items[2]["image_features"].abs().sum() == 0
    assert items[0]["text_features"].abs().sum() > 0 and items[0]["image_features"].abs().sum() > 0
    assert len(items[1]["text_features"]) == len(data[1]["input_ids"])  # same length as its tokens
    batch = FeatureCollator({}, {})(items)
    assert (
        batch["text_present"].tolist() == [True, False, True]
        and batch["image_features"].dtype == torch.float32
    )
    assert batch["image_present"].tolist() == [True, True, False]
    # No image in the whole split, and (batch_size=1) a batch without any caption: zeros of the right shape.
    blind = MultimodalDataset(
        [Example("t", "words", None, {}), Example("none", None, None, {})], {}, name="blind"
    )
    pre = model.image_preprocess
    blind_feats = build_features(
        model, build_cache(blind, model.tokenizer, pre, tmp_path / "cache"), tmp_path, 1
    )
    assert blind_feats[0]["image_features"].shape == items[0]["image_features"].shape
    assert (
        blind_feats[1]["text_features"].abs().sum() == 0 and blind_feats[0]["text_features"].abs().sum() > 0
    )


def test_a_cache_folder_that_cannot_be_written_is_named_with_the_fix(tmp_path: Path) -> None:
    from fusionkit.store import open_or_build

    (tmp_path / "taken").write_text("a file where the cache folder should be")
    with pytest.raises(OSError, match=r"cache folder .*taken is not writable .*--data.cache_dir DIR for train.*--cache-dir DIR for eval"):
        open_or_build(tmp_path / "taken" / "entry", lambda writer: {})
