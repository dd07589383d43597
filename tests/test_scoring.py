"""Scoring and predicting a trained run: which rows `fusionkit eval` scores, the regression metrics, how
predictions are written (CSV, JSONL, Parquet, `model.predict`) and what an ensemble may hold."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from fusionkit.cli import main

MOODS = {"happy": (250, 200, 0), "sad": (0, 0, 200), "meh": (128, 128, 128)}
FAST = ["--optim.max_steps", "2", "--optim.batch_size", "16", "--run.progress", "false", "--run.plots", "false"]
TASKS = '[{"name": "mood"}, {"name": "price", "type": "regression"}]'
FIELDS = ["id", "caption", "photo", "mood", "price"]


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with a classification task (mood) and a regression task (price, in the thousands)."""
    root = tmp_path_factory.mktemp("scoring")
    rows = []
    for i in range(40):
        mood = list(MOODS)[i % 3]
        Image.new("RGB", (16, 16), MOODS[mood]).save(root / f"img{i}.png")
        rows.append({"id": f"r{i}", "caption": f"{mood} day #{i}", "photo": f"img{i}.png", "mood": mood,
                     "price": f"{1000 + 1000 * (i % 3) + 0.1 * i:.1f}"})  # fmt: skip
    table = write_rows(root / "posts.csv", rows)
    argv = ["train", "--data.dataset", str(table), "--data.text_column", "caption", "--data.image_column", "photo",
            "--model.tasks", TASKS, "--run.output_dir", str(root / "runs"), "--run.name", "r",
            "--data.cache_dir", str(root / "cache"), *FAST]  # fmt: skip
    assert main(argv) == 0
    return root / "runs" / "r"


def table_rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run.parent.parent / "posts.csv").open()))


def test_a_split_with_rows_missing_from_the_data_says_they_are_missing_not_edited(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A copy of the data without one of the run's test rows: the error says a row is missing (not that one was
    edited), offers no --on-error skip that would end in that refusal, and an empty selection of a labelled file
    is not said to have no labels."""
    test = json.loads((run / "split.json").read_text())["test"]
    rows = table_rows(run)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for i, row in enumerate(rows):  # beside the copies: the images of the rows
        Image.new("RGB", (16, 16), MOODS[row["mood"]]).save(tmp_path / f"img{i}.png")
    short = write_rows(tmp_path / "short.csv", [r for r in rows if r["id"] != test[0]])
    for extra in ([], ["--on-error", "skip"]):
        capsys.readouterr()
        assert main(["eval", str(run), "--data", str(short), "--split", "test", *cache, *extra]) == 1
        err = capsys.readouterr().err
        assert f"1 of the {len(test)} rows its test split names are missing from {short}" in err, err
        assert "changed content" not in err and "--on-error skip" not in err and "--split-file" in err
    other = write_rows(tmp_path / "other.csv", [{**r, "id": f"new{r['id']}"} for r in rows])  # labelled, other ids
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(["eval", str(run), "--data", str(other), "--split", "test", *cache]) == 1
    assert "has no label in column" not in caplog.text
    assert f"{len(test)} of the {len(test)} rows its test split names are missing" in capsys.readouterr().err
    # the hint's way out: a split file of the rows that are there
    split = json.loads((run / "split.json").read_text())
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({**split, "test": test[1:]}))
    out = tmp_path / "m.json"
    argv = ["eval", str(run), "--data", str(short), "--split", "test", "--split-file", str(mine), "--output", str(out)]
    assert main([*argv, *cache]) == 0
    assert json.loads(out.read_text())["details"]["mood"]["confusion"]
