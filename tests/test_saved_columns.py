"""A model folder written by `save_pretrained` keeps the data columns its run read (text, image, id): `predict`,
`eval` and `embed` of that folder read a new file by them, as they do with the run dir, and flags still win."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fusionkit.cli import main
from fusionkit.data import make_synthetic
from fusionkit.models import FusionModel


def _write(path: Path, rows: list) -> None:
    """A table with its own column names; its images in pics/ beside it."""
    pics = path.parent / "pics"
    pics.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["post_id", "caption", "photo", "sentiment"])
        for ex in rows:
            ex.image.save(pics / f"{ex.id}.png")
            writer.writerow([f"P-{ex.id}", ex.text, f"pics/{ex.id}.png", ex.labels["sentiment"]])


def test_a_saved_model_folder_reads_new_files_by_its_runs_columns(tmp_path: Path) -> None:
    """Without them, `predict FOLDER --data new.csv` failed until --text-column/--image-column were given, and
    without --id-column the rows were silently named 0..N."""
    _write(tmp_path / "posts.csv", make_synthetic(24, seed=1, image_size=32))
    _write(tmp_path / "batch2" / "new.csv", make_synthetic(3, seed=2, image_size=32))
    argv = ["train", "--data.dataset", str(tmp_path / "posts.csv"), "--data.text_column", "caption",
            "--data.image_column", "photo", "--data.id_column", "post_id", "--optim.max_steps", "2",
            "--data.cache_dir", str(tmp_path / "cache"), "--run.output_dir", str(tmp_path / "runs"), "--run.name", "r",
            "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    assert main(argv) == 0
    FusionModel.from_pretrained(tmp_path / "runs" / "r").save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["data_columns"] == {
        "text_column": "caption", "image_column": "photo", "id_column": "post_id"}  # fmt: skip

    def predict(checkpoint: Path, out: str, *flags: str) -> list[dict]:
        argv = ["predict", str(checkpoint), "--data", str(tmp_path / "batch2" / "new.csv"), "--output", str(tmp_path / out)]
        assert main([*argv, "--cache-dir", str(tmp_path / "cache"), *flags]) == 0
        return list(csv.DictReader((tmp_path / out).open()))

    saved = predict(tmp_path / "saved", "saved.csv")
    assert [r["id"] for r in saved] == ["P-syn-000000", "P-syn-000001", "P-syn-000002"]
    assert saved == predict(tmp_path / "runs" / "r", "run.csv")  # as the run dir reads the file
    assert [r["id"] for r in predict(tmp_path / "saved", "numbered.csv", "--id-column", "")] == ["0", "1", "2"]
    assert main(["embed", str(tmp_path / "saved"), "--data", str(tmp_path / "batch2" / "new.csv"), "--output",
                 str(tmp_path / "v.npy")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "v.ids.json").read_text())[0] == "P-syn-000000"
