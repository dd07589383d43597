"""One number written two ways ("+1" and "1", "01" and "1", "-0" and "0") is one class or a clear error, never two
classes without a word; and bad-row errors say what to write and how to skip (train's option, not eval's flag)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import fusionkit
from fusionkit.cli import main
from fusionkit.config import ConfigError
from fusionkit.data import DataError, load_dataset
from fusionkit.tasks import bind_labels
from fusionkit.tasks.classification import canonical_name
from tests.test_own_data import train_args, write_table

SKIP_HINT = "data.on_error: skip (eval, predict, embed: --on-error skip)"


def _jsonl(path: Path, labels: list[object], **extra: object) -> Path:
    rows = [{"id": f"r{i}", "caption": f"caption {i}", "mood": v, **extra} for i, v in enumerate(labels)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bind(path: Path, task: fusionkit.TaskConfig) -> tuple[list[object], list[str]]:
    ds = load_dataset(path, text_column="caption", image_column="", missing_image="keep")
    bound, [cfg] = bind_labels(ds, [task])
    return [ex.labels["mood"] for ex in bound], cfg.class_names


def test_two_spellings_of_one_number_in_a_column_are_refused_naming_both(tmp_path: Path) -> None:
    """The trial's sentiment file: "+1" beside "1", "-0" beside 0 trained 5 classes for 3 (['-1','-0','0','+1','1'])."""
    labels = ["1", 1, -1, "-1", 0, "0", "1", "+1", "-0", 0, -0.0, "1"]
    path = _jsonl(tmp_path / "tweets.jsonl", labels)
    with pytest.raises(ConfigError) as e:
        _bind(path, fusionkit.TaskConfig("mood"))
    message = str(e.value)
    assert "tweets" in message and "one number written two ways" in message
    assert "'-0' (1 row) and '0' (4 rows)" in message and "'+1' (1 row) and '1' (4 rows)" in message
    assert "class_names (e.g. ['-1', '0', '1'])" in message  # the fix: list each number once
    # ... which reads every spelling as its listed class: nothing lost, 3 classes
    encoded, names = _bind(path, fusionkit.TaskConfig("mood", class_names=["-1", "0", "1"]))
    assert names == ["-1", "0", "1"] and encoded == [2, 2, 0, 0, 1, 1, 2, 2, 1, 1, 1, 2]


def test_a_number_keeps_the_spelling_the_data_gives_it(tmp_path: Path) -> None:
    """Nothing renamed but pandas' floats: "+1"/"-1" sentiment and "01"/"02" codes are classes as written."""
    assert [canonical_name(x) for x in ["+1", "+1.0", "01", "01.0", "-0", "2.0", "-0.0"]] == [
        "+1", "+1.0", "01", "01.0", "-0", "2", "0"]  # fmt: skip
    _, names = _bind(_jsonl(tmp_path / "pm.jsonl", ["+1", "-1", "+1", "-1"]), fusionkit.TaskConfig("mood"))
    assert names == ["-1", "+1"]
    _, names = _bind(_jsonl(tmp_path / "codes.jsonl", ["01", "02", "10", "02"]), fusionkit.TaskConfig("mood"))
    assert names == ["01", "02", "10"]
    # pandas' CSV of an int column with gaps ("2.0") and its JSON/Parquet numbers are still one class each
    encoded, names = _bind(_jsonl(tmp_path / "pandas.jsonl", ["2.0", 2, 2.0, "-0.0", 0, "0"]),
                           fusionkit.TaskConfig("mood"))  # fmt: skip
    assert names == ["0", "2"] and encoded == [1, 1, 1, 0, 0, 0]


def test_listed_classes_match_each_spelling_exactly_before_by_number(tmp_path: Path) -> None:
    """A model saved before this rule with both spellings as classes still reads each as its own; a spelling that is
    two listed classes' number at once is said to be ambiguous, not guessed."""
    old = ["-1", "-0", "0", "+1", "1"]
    encoded, names = _bind(_jsonl(tmp_path / "old.jsonl", ["+1", "1", "-0", 0, "-1", "1.0"]),
                           fusionkit.TaskConfig("mood", class_names=old))  # fmt: skip
    assert names == old and encoded == [3, 4, 1, 2, 0, 4]  # "1.0" is pandas' "1"
    with pytest.raises(DataError, match=r"label '01' of task 'mood' is the number of several listed classes"):
        _bind(_jsonl(tmp_path / "ambiguous.jsonl", ["01", "1"]), fusionkit.TaskConfig("mood", class_names=old))


def test_a_saved_model_evaluates_its_numbers_written_another_way(tmp_path: Path) -> None:
    """Trained on "1"/"0"/"-1", evaluated on a file (another tool's export) that writes "+1" and "-0": same classes."""
    table = write_table(tmp_path / "data", 24)
    numbers = {"happy": "1", "meh": "0", "sad": "-1"}
    rows = [{**r, "mood": numbers[r["mood"]]} for r in csv.DictReader(table.open())]
    with table.open("w", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writeheader()
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows(rows)
    assert main(train_args(table, tmp_path / "runs", "r")) == 0
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "config.json").read_text())["model"]["tasks"][0]["class_names"] == ["-1", "0", "1"]
    other = table.with_name("other.csv")
    spelled = {"1": "+1", "0": "-0", "-1": "-1"}
    with other.open("w", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writeheader()
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows({**r, "mood": spelled[r["mood"]]} for r in rows)
    out = tmp_path / "m.json"
    assert main(["eval", str(run), "--data", str(other), "--text-column", "caption", "--image-column", "photo",
                 "--output", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())["details"]["mood"]["report"]
    assert [report[c]["support"] for c in ("-1", "0", "1")] == [8, 8, 8]


def test_bad_row_hints_say_how_train_skips_them(tmp_path: Path) -> None:
    """`fusionkit train` has no --on-error flag: the hint named it ('unknown option --on-error' when followed)."""
    rows = list(csv.DictReader(write_table(tmp_path / "data", 24).open()))
    path = tmp_path / "data" / "badline.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(6, '{"id": "x1", "caption": "oops"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="badline.jsonl:7: invalid JSON") as e:
        load_dataset(path, text_column="caption", image_column="photo")
    assert SKIP_HINT in str(e.value)
    quoted = tmp_path / "quote.csv"
    quoted.write_text('id,caption,mood\nr0,"never closed,a\nr1,fine,b\nr2,fine,a\n')
    with pytest.raises(DataError, match="not closed") as e:
        load_dataset(quoted, text_column="caption", image_column="", missing_image="keep")
    assert SKIP_HINT in str(e.value)
    # what it names works for train
    assert main(train_args(path, tmp_path / "runs", "r", "--data.on_error", "skip")) == 0


def test_a_wrong_kind_of_cell_says_what_to_write(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "numimg.jsonl", ["a", "b"], photo=7)
    with pytest.raises(DataError, match=r"numimg.jsonl:1, item r0: image cell must be .* got int 7\. Write the image "
                                        r"file's path as text"):  # fmt: skip
        load_dataset(path, text_column="caption", image_column="photo")
    with pytest.raises(DataError, match=r"listlab.jsonl:2, item r1: label \[1\] \(list\) is not a class name\. Write "
                                        r"one class name .* per cell; a row with several labels is a multilabel task"):  # fmt: skip
        _bind(_jsonl(tmp_path / "listlab.jsonl", ["a", [1], "b"]), fusionkit.TaskConfig("mood"))


def test_a_multilabel_task_reads_a_listed_number_written_another_way(tmp_path: Path) -> None:
    """Tags "+1" for a listed "1" are that tag, as a classification task reads them; an unlisted one is refused."""
    path = _jsonl(tmp_path / "tags.jsonl", ["+1|2", "1", "2|+1"])
    ds = load_dataset(path, text_column="caption", image_column="", missing_image="keep")
    bound, [cfg] = bind_labels(ds, [fusionkit.TaskConfig("mood", type="multilabel", class_names=["1", "2"])])
    assert [ex.labels["mood"] for ex in bound] == [[0, 1], [0], [0, 1]] and cfg.class_names == ["1", "2"]
    with pytest.raises(DataError, match="unknown label '3'"):
        bind_labels(load_dataset(_jsonl(tmp_path / "more.jsonl", ["3"]), text_column="caption", image_column="",
                                 missing_image="keep"), [cfg])  # fmt: skip


def test_an_exponent_spelling_an_infinite_label_and_an_ambiguous_number_are_each_said_plainly(tmp_path: Path) -> None:
    """"1e0" beside "1" is one number written two ways; "inf" is no class, named by its row (and skippable, as
    any bad label); "+1" where "01" and "1" are both listed is said to be ambiguous, not unknown."""
    with pytest.raises(ConfigError, match=r"'1' \(\d+ rows?\) and '1e0'|'1e0' \(\d+ rows?\) and '1'"):
        _bind(_jsonl(tmp_path / "e.jsonl", ["1e0", "1", "2"] * 3), fusionkit.TaskConfig("mood"))
    path = _jsonl(tmp_path / "inf.jsonl", ["a", "b", "inf", "a", "b"])
    with pytest.raises(DataError, match=r"inf.jsonl:3, item r2: label 'inf' is not a class"):
        _bind(path, fusionkit.TaskConfig("mood"))
    ds = load_dataset(path, text_column="caption", image_column="", missing_image="keep")
    bound, [cfg] = bind_labels(ds, [fusionkit.TaskConfig("mood")], on_error="skip")
    assert cfg.class_names == ["a", "b"] and [ex.labels["mood"] for ex in bound] == [0, 1, None, 0, 1]
    with pytest.raises(DataError, match=r"label '\+1' of task 'mood' is the number of several listed classes "
                                        r"\['01', '1'\]"):  # fmt: skip
        _bind(_jsonl(tmp_path / "amb.jsonl", ["+1"]), fusionkit.TaskConfig("mood", class_names=["01", "1"]))


def test_a_nan_spelled_label_is_missing_and_counted_as_other_missing_spellings_are(tmp_path: Path, caplog) -> None:
    """A pandas NaN written into a string column ("nan") is a missing label, said with the others ("None")."""
    with caplog.at_level("WARNING", logger="fusionkit"):
        encoded, names = _bind(_jsonl(tmp_path / "n.jsonl", ["a", "nan", "b", "None", "NaN"]), fusionkit.TaskConfig("mood"))
    assert encoded == [0, None, 1, None, None] and names == ["a", "b"]
    assert "3 labels ['NaN', 'None', 'nan']" in caplog.text
