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


def test_regression_is_scored_by_rmse_and_r2_beside_mse_and_mae_with_their_directions(
    run: Path, tmp_path: Path
) -> None:
    """rmse is in the targets' units (lower is better), r2 as sklearn computes it (higher is better)."""
    from sklearn.metrics import r2_score

    from fusionkit.models import FusionModel
    from fusionkit.training.metrics import higher_is_better

    out, preds = tmp_path / "m.json", tmp_path / "p.csv"
    assert main(["eval", str(run), "--split", "test", "--output", str(out)]) == 0
    assert main(["predict", str(run), "--split", "test", "--output", str(preds)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["test/price/rmse"] == pytest.approx(metrics["test/price/mse"] ** 0.5)
    truth = {r["id"]: float(r["price"]) for r in table_rows(run)}
    rows = list(csv.DictReader(preds.open()))
    expected = r2_score([truth[r["id"]] for r in rows], [float(r["price"]) for r in rows])
    assert metrics["test/price/r2"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    tasks = FusionModel.from_pretrained(run).tasks
    assert higher_is_better("val/price/r2", tasks) and not higher_is_better("val/price/rmse", tasks)


def test_regression_predictions_are_the_float32_values_shortest_decimals_everywhere(run: Path, tmp_path: Path) -> None:
    """4218.4, not 4218.39990234375 (a float32 widened to a double): in CSV, JSONL and model.predict alike."""
    import numpy as np

    from fusionkit.models import FusionModel

    def shortest(value: str) -> bool:  # the text a float32 prints as, and still that float32
        return value == str(np.float32(value))

    written = {}
    for suffix in (".csv", ".jsonl"):
        path = tmp_path / f"p{suffix}"
        assert main(["predict", str(run), "--split", "all", "--output", str(path)]) == 0
        text = path.read_text()
        rows = list(csv.DictReader(text.splitlines())) if suffix == ".csv" else [json.loads(line) for line in
                                                                                 text.splitlines()]  # fmt: skip
        written[suffix] = {r["id"]: str(r["price"]) for r in rows}
        assert all(shortest(v) for v in written[suffix].values()), written[suffix]
    assert written[".csv"] == written[".jsonl"]
    table = table_rows(run)[:5]
    model = FusionModel.from_pretrained(run)
    preds = model.predict(texts=[r["caption"] for r in table],
                          images=[str(run.parent.parent / r["photo"]) for r in table], precision="fp32")  # fmt: skip
    assert all(shortest(repr(p["price"])) for p in preds)
    # the same values as the file's, up to the batching of the eval path
    assert [p["price"] for p in preds] == pytest.approx([float(written[".csv"][r["id"]]) for r in table], rel=1e-3)


def test_an_ensemble_that_lists_one_model_twice_is_refused(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--ensemble RUN` beside RUN itself (or its best checkpoint) would count one model twice: said, nothing run."""
    out = tmp_path / "p.csv"
    for again in (run, run / "best"):
        for argv in (["--output", str(out)], ["--text", "a happy day"]):
            capsys.readouterr()
            assert main(["predict", str(run), "--ensemble", str(again), *argv]) == 2  # a usage error
            err = capsys.readouterr().err
            assert f"--ensemble: {again} is the model of {run} again" in err and "list each once" in err, err
    assert not out.exists()


def test_model_predict_takes_one_ensemble_model_and_says_what_its_arguments_take(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`ensemble=other` (one model) is a list of one; the model itself, a path or a precision spelled as torch spells
    it get errors that name the argument as the caller passed it; fp16 on a CPU runs fp32 and says so, as training."""
    from fusionkit.config import ConfigError
    from fusionkit.models import FusionModel

    model, other = FusionModel.from_pretrained(run), FusionModel.from_pretrained(run)
    pair = {"texts": ["happy day"], "images": [str(run.parent.parent / "img0.png")]}
    alone = model.predict(**pair, precision="fp32")
    assert model.predict(**pair, precision="fp32", ensemble=other) == model.predict(**pair, precision="fp32",
                                                                                     ensemble=[other])  # fmt: skip
    assert model.predict(**pair, precision="fp32", ensemble=other)[0]["mood"] == alone[0]["mood"]
    with pytest.raises(ValueError, match="listed twice"):
        model.predict(**pair, ensemble=model)
    from fusionkit import create_model

    stranger = create_model("tiny", tasks=[{"name": "mood", "class_names": ["calm", "wild"]}])
    with pytest.raises(ValueError, match=r"ensemble\[0\] differs \(mood: \[.*'happy'.*\] here, \['calm', 'wild'\] "
                                         r"in it; price: \[\] here, no such task in it\)"):  # fmt: skip
        model.predict(**pair, ensemble=stranger)
    with pytest.raises(TypeError, match=r"ensemble takes another FusionModel or a list of them, got str"):
        model.predict(**pair, ensemble=str(run))
    with pytest.raises(ConfigError, match=r"^precision must be one of .*'float16' is 'fp16'") as e:
        model.predict(**pair, precision="float16")
    assert "run.precision" not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        half = model.predict(**pair, precision="fp16")
    assert "precision fp16: fp32" in caplog.text and "CPU runs in fp32" in caplog.text
    assert half == alone
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusionkit"):  # the CLI's --precision, the same rule
        assert main(["predict", str(run), "--split", "test", "--precision", "fp16", "--output", str(tmp_path / "p.csv")]) == 0
        assert main(["predict", str(run), "--text", "a happy day", "--precision", "fp16"]) == 0
    assert caplog.text.count("precision fp16: fp32") == 2, caplog.text
    caplog.clear()
    import fusionkit

    with caplog.at_level(logging.WARNING, logger="fusionkit"):  # embed and embed_to_shards: the same rule
        fusionkit.embed(model, **pair, precision="fp16")
        rows = [{"id": "a", "text": pair["texts"][0], "image": pair["images"][0]}]
        fusionkit.embed_to_shards(model, rows, tmp_path / "shards", precision="fp16", progress=False)
    assert caplog.text.count("precision fp16: fp32") == 2, caplog.text
    with pytest.raises(ConfigError, match=r"^precision must be one of .*'bfloat16' is 'bf16'"):
        fusionkit.embed(model, **pair, precision="bfloat16")


def test_predict_writes_parquet_with_the_csvs_columns_and_values(run: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    paths = {s: tmp_path / f"p{s}" for s in (".csv", ".parquet")}
    for path in paths.values():
        assert main(["predict", str(run), "--split", "test", "--output", str(path)]) == 0
    csv_rows = list(csv.DictReader(paths[".csv"].open()))
    table = pq.read_table(paths[".parquet"])
    assert table.column_names == list(csv_rows[0])
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [r["id"] for r in csv_rows]
    assert [r["mood"] for r in rows] == [r["mood"] for r in csv_rows]
    assert [r["price"] for r in rows] == [float(r["price"]) for r in csv_rows]  # numbers, not text
    assert [r["mood_prob_sad"] for r in rows] == pytest.approx([float(r["mood_prob_sad"]) for r in csv_rows])


def test_r2_of_a_split_with_one_labelled_row_is_not_reported_as_a_score(caplog: pytest.LogCaptureFixture) -> None:
    """sklearn's r2 of one row is NaN (undefined); reporting 0.0 let `run.metric val/price/r2` pick checkpoints on
    a number that means nothing. Two rows or more: sklearn's value."""
    import torch
    from sklearn.metrics import r2_score

    from fusionkit import TaskConfig
    from fusionkit.tasks import create_task

    task = create_task(TaskConfig("price", type="regression"))
    one = torch.tensor([[980.0], [0.0]]), torch.tensor([[1000.0], [0.0]]), torch.tensor([True, False])
    with caplog.at_level("WARNING"):
        scores, _ = task.metrics(*one)
    assert "r2" not in scores and scores["mae"] == pytest.approx(20.0)
    assert "r2 is undefined on 1 labelled row" in caplog.text
    scores, _ = task.metrics(torch.tensor([[980.0], [20.0]]), torch.tensor([[1000.0], [0.0]]), torch.tensor([True, True]))
    assert scores["r2"] == pytest.approx(r2_score([1000.0, 0.0], [980.0, 20.0]))
