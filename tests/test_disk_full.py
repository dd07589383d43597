"""A full disk while a cache or a checkpoint is written: a message naming the folder and the way out, never a
SIGBUS with no message (a sparse memmap) or a raw serializer traceback, and nothing half-written is left."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import safetensors.torch
import transformers.modeling_utils  # noqa: F401 (binds safetensors' save_file at import: before these tests patch it)
from safetensors import SafetensorError

from fusionkit.config import ImagePreprocess
from fusionkit.data import build_cache, make_synthetic
from fusionkit.models.tiny import tiny_tokenizer
from fusionkit.training.trainer import Trainer
from tests.test_train import tiny_config


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_a_cache_that_does_not_fit_says_so_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"no room for the cache's \w+ \(No space left on device\): it needs .* [KM]iB in "
                                      r".*free space or set data.cache_dir"):  # fmt: skip
        build_cache(make_synthetic(20, seed=0, image_size=16), tiny_tokenizer(), ImagePreprocess(size=(8, 8)),
                    tmp_path / "cache", num_proc=1)  # fmt: skip
    assert not any(p.name.startswith(".") or p.is_dir() for p in (tmp_path / "cache").iterdir())  # no temp store


def test_a_checkpoint_safetensors_cannot_write_names_the_folder_and_the_resume(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    calls = []
    real = safetensors.torch.save_file

    def full_at_second(*args: object, **kwargs: object) -> None:  # the step-2 checkpoint fits, step 4's does not
        calls.append(1)
        if len(calls) > 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_at_second)
    with pytest.raises(OSError, match=r"could not write the checkpoint for step \d+ under .*the previous checkpoint "
                                      r".* is intact.*--resume"):  # fmt: skip
        Trainer(tiny_config(tmp_path, "full")).fit()
    assert not list((tmp_path / "runs" / "full" / "checkpoints").glob(".tmp-*"))


def test_a_first_checkpoint_that_cannot_be_written_frees_the_run_name(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """No checkpoint to resume from: the run dir goes, as for any run that fails before its first save, so the same
    command runs again once there is room (it was left with an empty checkpoints/ that neither resume nor a rerun
    would take)."""
    real = safetensors.torch.save_file

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    cfg = {"model.freeze": "encoders", "optim.max_steps": 2, "optim.epochs": 1}  # frozen encoders: their own file too
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=r"no earlier checkpoint exists.*run the same command again") as info:
        Trainer(tiny_config(tmp_path, "full", **cfg)).fit()
    assert info.value.errno == errno.ENOSPC  # safetensors' error carries none: not EIO
    assert not (tmp_path / "runs" / "full").exists()
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert Trainer(tiny_config(tmp_path, "full", **cfg)).fit()["run_dir"]  # the same command, with room


def test_a_run_file_that_cannot_be_written_names_it_and_frees_the_run_name(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A full disk at the run's first files (config.json): the error names the file, and no `.config.json.tmp` is
    left to make the rerun refuse the folder as 'other files, not a run'."""
    real = Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.startswith(".config"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=r"could not write .*config\.\w+ \(No space left on device\)"):
        Trainer(tiny_config(tmp_path, "full", **{"optim.max_steps": 1, "optim.epochs": 1})).fit()
    assert not (tmp_path / "runs" / "full").exists()
    monkeypatch.setattr(Path, "write_text", real)
    assert Trainer(tiny_config(tmp_path, "full", **{"optim.max_steps": 1, "optim.epochs": 1})).fit()["run_dir"]


@pytest.mark.parametrize("output", ["v.npy", "v.parquet", "shards/"])
def test_embed_onto_a_full_disk_names_the_output_and_keeps_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture, output: str) -> None:  # fmt: skip
    import numpy as np
    import pyarrow.parquet as pq

    from fusionkit.cli import main

    run = Path(Trainer(tiny_config(tmp_path, "r", **{"optim.max_steps": 1, "optim.epochs": 1})).fit()["run_dir"])
    old = tmp_path / "v.npy"
    old.write_bytes(b"mine")

    def full(*args: object, **kwargs: object) -> None:  # as numpy and Arrow say it
        raise OSError("128000 requested and 25568 written" if output == "v.npy" else
                      "Error writing bytes to file. Detail: [errno 28] No space left on device")  # fmt: skip

    monkeypatch.setattr(np, "save", full)
    monkeypatch.setattr(pq, "write_table", full)
    argv = ["embed", str(run), "--data", "synthetic:40", "--output", f"{tmp_path}/{output}", "--no-progress"]
    assert main(argv) != 0
    said = capsys.readouterr().err
    assert f"no room for {output.rstrip('/').replace('shards', 'shard-00000.parquet')}" in said and str(tmp_path) in said
    assert old.read_bytes() == b"mine" and not list(tmp_path.rglob(".*tmp-*"))
