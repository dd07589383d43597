"""Sharded, resumable embedding: Parquet shards + manifest; a run killed midway resumes without redoing
finished shards, and two processes (torchrun, gloo) write the same vectors as one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusionkit import embed
from fusionkit.cli import main
from fusionkit.config import ConfigError
from fusionkit.data import make_synthetic
from fusionkit.embed_shards import embed_to_shards, read_embeddings
from fusionkit.models import FusionModel, create_model

N, SHARD = 14, 4  # 4 shards, the last one short


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny"
    create_model("tiny").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir: Path) -> FusionModel:
    return FusionModel.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(N, image_size=32)


def shards(model: FusionModel, data, out: Path, **kw) -> dict:
    return embed_to_shards(
        model, data, out, shard_size=SHARD, batch_size=SHARD, precision="fp32", progress=False, **kw
    )


def test_shards_hold_ids_and_vectors_in_input_order(tmp_path: Path, model: FusionModel, data) -> None:
    manifest = shards(model, data, tmp_path / "out")
    assert manifest["complete"] and manifest["rows"] == N
    assert [s["rows"] for s in manifest["shards"]] == [SHARD] * 3 + [2]
    ids, vectors = read_embeddings(tmp_path / "out")
    assert ids == data.ids
    texts, images = [ex.text for ex in data], [ex.image for ex in data]
    np.testing.assert_allclose(
        vectors, embed(model, texts, images, batch_size=5, precision="fp32"), atol=1e-5
    )
    # a stream (no len, no indexing) gives the same shards
    shards(model, (ex for ex in data), tmp_path / "stream")
    np.testing.assert_array_equal(read_embeddings(tmp_path / "stream")[1], vectors)


def test_interrupted_run_resumes_without_redoing_finished_shards(
    tmp_path: Path, model: FusionModel, data
) -> None:
    out = tmp_path / "out"

    def crash_after_two(k: int, rows: int) -> None:
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards(model, data, out, on_shard=crash_after_two)
    with pytest.raises(RuntimeError, match="not complete"):
        read_embeddings(out)
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.parquet")}
    assert sorted(before) == ["shard-00000.parquet", "shard-00001.parquet"]
    redone: list[int] = []
    shards(model, data, out, on_shard=lambda k, rows: redone.append(k))
    assert redone == [2, 3]
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in before.items())
    shards(model, data, tmp_path / "fresh")
    np.testing.assert_array_equal(read_embeddings(out)[1], read_embeddings(tmp_path / "fresh")[1])


def test_resume_with_other_settings_is_refused(tmp_path: Path, model: FusionModel, data) -> None:
    shards(model, data, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"shard_size=4 \(now 5\)"):
        embed_to_shards(model, data, tmp_path / "out", shard_size=5, batch_size=SHARD, precision="fp32")
    other = create_model("tiny", fusion={"strategy": "gated"})
    with pytest.raises(ConfigError, match=r"by another model \(its weights' fingerprint differs\): write to"):
        shards(other, data, tmp_path / "out")
    edited = data.subset(list(reversed(data.ids)))  # the same ids, rows reordered: old shards would not match
    with pytest.raises(ConfigError, match=r"of other rows, or rows whose captions or images changed since \(the data's fingerprint differs\): write to"):
        shards(model, edited, tmp_path / "out")
    with pytest.raises(ConfigError) as e:  # the hashes say nothing to a user: rows vs settings, and what to do
        embed_to_shards(model, data.subset(data.ids[:8]), tmp_path / "out", shard_size=SHARD, batch_size=2,
                        precision="fp32")  # fmt: skip
    assert str(e.value) == (f"{tmp_path / 'out'} holds an embedding of other rows, or rows whose captions or images "
                            "changed since (the data's fingerprint differs), "
                            "made with other settings: batch_size=4 (now 2): write to another directory, or delete "
                            f"{tmp_path / 'out'} to embed anew there")  # fmt: skip
    with pytest.raises(ConfigError, match=r"other settings: batch_size=4 \(now 2\): rerun with its settings to resume"):
        embed_to_shards(model, data, tmp_path / "out", shard_size=SHARD, batch_size=2, precision="fp32")
    foreign = tmp_path / "foreign"  # shards copied without their manifest: another model's vectors, not adopted
    foreign.mkdir()
    shutil.copy(tmp_path / "out" / "shard-00000.parquet", foreign)
    with pytest.raises(ConfigError, match="holds files but no manifest.json"):
        shards(other, data, foreign)
    assert [p.name for p in foreign.iterdir()] == ["shard-00000.parquet"]


def test_cli_writes_shards_to_a_directory(tmp_path: Path, model_dir: Path, model: FusionModel) -> None:
    out = tmp_path / "vecs"
    argv = ["embed", str(model_dir), "--data", "synthetic:6", "--output", f"{out}/", "--shard-size", "4",
            "--precision", "fp32", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["rows"] == 6
    ids, vectors = read_embeddings(out)
    ds = make_synthetic(6)
    assert ids == ds.ids
    expected = embed(model, [ex.text for ex in ds], [ex.image for ex in ds], batch_size=4, precision="fp32")
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert main(argv) == 0  # complete: nothing to redo


WORKER = """
import os, signal, sys
from fusionkit.data import make_synthetic
from fusionkit.embed_shards import embed_to_shards
from fusionkit.models import FusionModel

model_dir, out, n, shard, kill_after = sys.argv[1:6]
model = FusionModel.from_pretrained(model_dir)
written = []

def on_shard(k, rows):
    written.append(k)
    if int(os.environ["RANK"]) == 1 and len(written) == int(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill, midway through this rank's shards

embed_to_shards(model, make_synthetic(int(n), image_size=32), out, shard_size=int(shard), batch_size=int(shard),
                precision="fp32", progress=False, on_shard=on_shard)
"""


@pytest.mark.timeout(240)
def test_two_process_embed_killed_midway_resumes_to_the_one_process_result(
    tmp_path: Path, model_dir: Path, model: FusionModel, data
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"

    def torchrun(kill_after: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(model_dir), str(out), str(N), str(SHARD), str(kill_after)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)

    killed = torchrun(kill_after=1)  # rank 1 dies after its first shard (shard 1)
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.parquet")}
    assert "shard-00001.parquet" in before and "shard-00003.parquet" not in before
    resumed = torchrun(kill_after=0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in before.items())  # not recomputed
    ids, vectors = read_embeddings(out)
    shards(model, data, tmp_path / "single")
    single_ids, single = read_embeddings(tmp_path / "single")
    assert ids == single_ids == data.ids
    np.testing.assert_allclose(vectors, single, rtol=0, atol=1e-6)


def test_a_shard_deleted_from_a_complete_folder_is_embedded_again(tmp_path: Path, model: FusionModel, data) -> None:
    out = tmp_path / "out"
    shards(model, data, out)
    ids, vectors = read_embeddings(out)
    (out / "shard-00001.parquet").unlink()
    redone: list[int] = []
    shards(model, data, out, on_shard=lambda k, rows: redone.append(k))
    assert redone == [1]
    again_ids, again = read_embeddings(out)
    assert again_ids == ids and np.allclose(again, vectors, atol=1e-6)


def test_output_names_the_cli_would_write_wrongly_are_refused_or_honoured(
    tmp_path: Path, model_dir: Path, model: FusionModel, capsys
) -> None:
    table = tmp_path / "pairs.parquet"
    make_synthetic(6, image_size=32).to_hf().to_parquet(str(table))
    base = ["embed", str(model_dir), "--data", str(table)]
    assert main([*base, "--output", str(tmp_path / "v.npy"), "--shard-size", "2"]) == 2  # a folder, not a file
    assert "--shard-size writes a folder of Parquet shards" in capsys.readouterr().err
    assert not (tmp_path / "v.npy").exists()
    assert main([*base, "--output", str(tmp_path / "V.NPY")]) == 0  # the suffix in capitals: still one .npy file
    assert np.load(tmp_path / "V.NPY").shape == (6, 64) and not list(tmp_path.glob(".V.tmp*"))


def _dict_rows(ds, texts=None) -> list[dict]:
    return [{"id": ex.id, "text": t if texts else ex.text, "image": ex.image}
            for ex, t in zip(ds, texts or [None] * len(ds))]  # fmt: skip


def test_other_rows_given_as_a_list_are_refused_not_answered_with_old_vectors(
    tmp_path: Path, model: FusionModel, data, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    rows = _dict_rows(data)
    shards(model, rows, out)
    with caplog.at_level("WARNING", logger="fusionkit.embed"):
        shards(model, [dict(r) for r in rows], out)  # the same rows again: reused, and said so
    assert "nothing to do; reusing it" in caplog.text
    other = _dict_rows(data, texts=[f"another caption {i}" for i in range(N)])
    with pytest.raises(ConfigError, match="of other rows"):
        shards(model, other, out)
    # rows as a DataFrame (empty cells: missing sides) embed as the same rows given as a list
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(other).astype(object)
    frame.loc[0, "text"] = float("nan")
    shards(model, frame, tmp_path / "frame")
    listed = [dict(r, text=None) if i == 0 else r for i, r in enumerate(other)]
    shards(model, listed, tmp_path / "listed")
    assert json.loads((tmp_path / "frame" / "manifest.json").read_text())["data"] == json.loads(
        (tmp_path / "listed" / "manifest.json").read_text())["data"]  # fmt: skip
    np.testing.assert_array_equal(read_embeddings(tmp_path / "frame")[1], read_embeddings(tmp_path / "listed")[1])
    with pytest.raises(TypeError, match="not a dict of columns"):
        shards(model, {"id": ["a"], "text": ["b"], "image": [None]}, tmp_path / "columns")


def test_other_rows_as_a_datasets_dataset_or_a_stream_are_refused(tmp_path: Path, model: FusionModel, data) -> None:
    """Rows with no content hash of their own used to get the folder's old vectors back (a warning only)."""
    hf = data.to_hf()
    shards(model, hf, tmp_path / "hf")
    with pytest.raises(ConfigError, match="of other rows"):  # an in-memory Dataset is hashed by its rows
        shards(model, hf.select(range(N // 2)), tmp_path / "hf")
    assert read_embeddings(tmp_path / "hf")[0] == data.ids  # kept as it was
    stream = tmp_path / "stream"
    shards(model, (ex for ex in data), stream)
    shards(model, (ex for ex in data), stream)  # the same stream again: reused
    with pytest.raises(ConfigError, match="shards hold 14 rows but the input has 8"):  # its first 2 shards
        shards(model, (ex for ex in data.subset(range(2 * SHARD))), stream)
    with pytest.raises(ConfigError, match=r"shard-00001.parquet holds other rows than the input's"):
        shards(model, (ex for ex in data.subset(range(N // 2))), stream)
    with pytest.raises(ConfigError, match="holds other rows than the input's"):
        shards(model, (ex for ex in data.subset(list(range(N))[::-1])), stream)
    assert read_embeddings(stream)[0] == data.ids


def test_a_dataframe_gets_the_reader_ids_and_bad_arguments_write_nothing(tmp_path: Path, model: FusionModel, data) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"id": [100, None, 300], "text": [ex.text for ex in data][:3], "image": [None] * 3})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        embed_to_shards(model, frame, tmp_path / "sb", batch_size=0, progress=False)
    assert not (tmp_path / "sb").exists()  # no manifest recording batch_size=0 to block the corrected call
    shards(model, frame, tmp_path / "sb", modality="text")
    assert read_embeddings(tmp_path / "sb")[0] == ["100", "1", "300"]  # as load_dataset(frame).ids


def test_reading_a_folder_with_a_deleted_shard_names_it(tmp_path: Path, model: FusionModel, data) -> None:
    shards(model, data, tmp_path / "out")
    (tmp_path / "out" / "shard-00002.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00002.parquet\): run embed_to_shards .* again"):
        read_embeddings(tmp_path / "out")


def test_shards_follow_embeds_rules_for_caption_only_rows_ids_and_empty_input(
    tmp_path: Path, model: FusionModel, data
) -> None:
    """Caption-only rows give text vectors, as `embed(model, texts)` and `fusionkit embed` give them (joint ones
    before, 0.3 apart); an id given twice is refused, as the readers refuse it; an empty input reads as [0, dim]."""
    rows = [{"id": ex.id, "text": ex.text} for ex in data]
    manifest = shards(model, rows, tmp_path / "captions")
    assert manifest["modality"] == "text"
    np.testing.assert_allclose(read_embeddings(tmp_path / "captions")[1],
                               embed(model, [ex.text for ex in data], precision="fp32"), atol=1e-5)  # fmt: skip
    twice = [*rows[:5], dict(rows[1])]  # the same id in one shard, and across shards
    with pytest.raises(ValueError, match=r"duplicate id '.*' \(rows 1 and 5 of the input\)"):
        shards(model, twice, tmp_path / "twice")
    assert not (tmp_path / "twice").exists()  # refused before the manifest: the corrected call runs there
    shards(model, rows[:6], tmp_path / "twice")
    pd = pytest.importorskip("pandas")  # a DataFrame with its own index: its labels name the rows, as training's
    frame = pd.DataFrame({"text": [ex.text for ex in data][:3]}, index=["k1", "k2", "k3"])
    assert embed(model, frame, return_ids=True)[1] == ["k1", "k2", "k3"]
    shards(model, frame, tmp_path / "indexed")
    assert read_embeddings(tmp_path / "indexed")[0] == ["k1", "k2", "k3"]
    with pytest.raises(ValueError, match=r"duplicate id 'x' \(rows 0 and 1 of the input\)"):
        embed(model, ["a", "b"], ids=["x", "x"])
    with pytest.raises(ValueError, match=r"^images ended after 2 items, texts go on"):  # streams: said where
        embed(model, iter(["a", "b", "c"]), iter([data[0].image, data[1].image]), batch_size=2)
    shards(model, [], tmp_path / "empty", modality="joint")
    ids, vectors = read_embeddings(tmp_path / "empty")
    assert ids == [] and vectors.shape == (0, model.config.fusion.dim)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        shards(model, rows, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "mine"
    with pytest.raises(TypeError, match=r"row 0: embed_to_shards takes rows as dicts"):
        shards(model, [("a", "red", None)], tmp_path / "tuples")


@pytest.mark.parametrize("as_image_feature", [True, False])
def test_an_image_file_replaced_under_a_datasets_dataset_read_from_files_is_other_rows(
    tmp_path: Path, model: FusionModel, data, as_image_feature: bool
) -> None:
    """A Dataset read from files is fingerprinted by its table; its image cells only name files, whose bytes
    the vectors depend on: a replaced image used to get the old vector back ("the same rows: reusing it")."""
    datasets = pytest.importorskip("datasets")
    for ex in data:
        ex.image.save(tmp_path / f"{ex.id}.png")
    table = tmp_path / "rows.csv"
    table.write_text("id,text,image\n" + "".join(f"{ex.id},{ex.text},{tmp_path / ex.id}.png\n" for ex in data))
    hf = datasets.load_dataset("csv", data_files=str(table), split="train", cache_dir=str(tmp_path / "hf"))
    if as_image_feature:
        hf = hf.cast_column("image", datasets.Image())
    assert hf.cache_files
    out = tmp_path / "out"
    shards(model, hf, out)
    shards(model, hf, out)  # unchanged: reused
    before = read_embeddings(out)[1]

    def interrupt(k: int, rows: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards(model, hf, tmp_path / "partial", on_shard=interrupt)
    shutil.copy2(tmp_path / f"{data[1].id}.png", tmp_path / f"{data[5].id}.png")  # `cp -p`: name, size aside
    with pytest.raises(ConfigError, match="of other rows"):
        shards(model, hf, out)
    with pytest.raises(ConfigError, match="of other rows"):  # nor resumed over shards of the old image
        shards(model, hf, tmp_path / "partial")
    np.testing.assert_array_equal(read_embeddings(out)[1], before)  # kept as it was
    shards(model, hf, tmp_path / "fresh")
    fresh = read_embeddings(tmp_path / "fresh")[1]
    changed = ~np.isclose(fresh, before, atol=1e-4).all(axis=1)
    assert changed.tolist() == [i == 5 for i in range(N)]  # the replaced image's row, and only it
