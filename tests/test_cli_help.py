"""What the command line's help and messages say must be what it does: fast, no training."""

from __future__ import annotations

import json

import pytest

from fusionkit.cli import main
from fusionkit.precision import CPU_AUTO_BF16_FLAGS, CPU_BF16_FLAGS, choose_precision


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: one line of words


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "predict", "embed"])
def test_precision_auto_help_names_the_cpus_auto_picks_bf16_on(command: str, capsys, monkeypatch, tmp_path) -> None:
    text = help_of([command], capsys)
    assert "bf16 units" not in text  # AVX512-BF16 has bf16 units, and auto keeps fp32 there
    assert "AMX" in text and "Arm BF16" in text and "AVX512-BF16 alone" in text
    import fusionkit.precision as precision

    for flag in CPU_BF16_FLAGS:  # what the help says is what the code does
        (tmp_path / "cpuinfo").write_text(f"flags\t: fpu sse {flag}\n")
        monkeypatch.setattr(precision, "CPUINFO", tmp_path / "cpuinfo")
        assert choose_precision("auto", "cpu").name == ("bf16" if flag in CPU_AUTO_BF16_FLAGS else "fp32")


@pytest.mark.parametrize("given,meant", [(["--epochs", "1"], "--optim.epochs"), (["--lr", "1e-3"], "--optim.lr"),
                                         (["--seed", "3"], "--run.seed"), (["--output-dir", "out"], "--run.output_dir"),
                                         (["--data.text-column", "caption"], "--data.text_column")])  # fmt: skip
def test_an_unknown_key_suggests_the_config_key_meant(given: list[str], meant: str, capsys) -> None:
    assert f"unknown option {given[0]}; did you mean {meant}?" in error_of(["train", *given], capsys)


def test_an_unknown_key_in_a_config_file_or_dict_suggests_the_key_meant(tmp_path) -> None:
    from fusionkit.config import ConfigError
    from fusionkit.training.config import build_config

    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epochs'\] \(did you mean optim.epochs\?\)"):
        build_config({"epochs": 1})
    (tmp_path / "c.yaml").write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim: unknown key\(s\) \['lrr'\] \(did you mean optim.lr\?\)"):
        build_config(tmp_path / "c.yaml")


def test_an_unknown_option_is_called_so_not_an_override_without_a_value(capsys, tmp_path) -> None:
    err = error_of(["train", "--foo"], capsys)
    assert "unknown option --foo" in err and "has no value" not in err
    assert "unknown option --print_config; did you mean --print-config?" in error_of(["train", "--print_config"], capsys)
    pytest.importorskip("optuna")
    (tmp_path / "c.yaml").write_text("optim:\n  epochs: 1\n")
    err = error_of(["tune", str(tmp_path / "c.yaml"), "--trials", "1", "--print-config"], capsys)
    assert "unknown option --print-config" in err and "has no value" not in err
    # a real key without its value says so, also when the next word is an option, not its value
    assert "--optim.lr has no value" in error_of(["train", "--optim.lr"], capsys)
    assert "--run.name has no value" in error_of(["train", "--run.name", "--optim.lr", "0.1"], capsys)
    # a key and its value quoted together: the option exists, the quoting is what is wrong
    err = error_of(["train", '--model.tasks [{"name": "mood"}]'], capsys)
    assert "--model.tasks and its value reached fusionkit as one word" in err and "unknown option" not in err
    assert "unknown option --no such" in error_of(["train", "--no such"], capsys)


def test_keys_inside_mappings_and_tasks_are_still_overrides(capsys) -> None:
    import yaml

    argv = ["train", "--print-config", "--model.text.config_overrides.hidden_size", "8",
            "--model.tasks.sentiment.label_smoothing", "0.1"]  # fmt: skip
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["text"]["config_overrides"] == {"hidden_size": 8}
    assert cfg["model"]["tasks"][0]["label_smoothing"] == 0.1


def test_accept_changes_without_resume_is_refused_with_print_config_too(capsys) -> None:
    err = error_of(["train", "--accept-changes", "--print-config"], capsys)
    assert "--accept-changes only applies to --resume" in err and capsys.readouterr().out == ""


def test_a_list_setting_given_one_value_names_it_as_written_and_says_how_to_write_a_list(capsys) -> None:
    err = error_of(["train", "--data.split_ratios", "0.5"], capsys)
    assert "expected a list, got the number 0.5" in err and "_FloatText" not in err and "in brackets" in err
    err = error_of(["train", "--run.report_to", "tensorboard"], capsys)
    assert "expected a list, got the text 'tensorboard'" in err and "[tensorboard]" in err


def test_bare_words_in_brackets_are_a_list_of_strings_as_in_yaml(capsys) -> None:
    import yaml

    argv = ["train", "--print-config", "--run.report_to", "[tensorboard]", "--model.tasks",
            '[{"name": "mood", "class_names": ["neg", "pos"]}]', "--model.tasks.mood.class_names", "[neg, neu, pos]",
            "--optim.betas", "[0.8,0.9]", "--run.name", "[draft]"]  # fmt: skip
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["run"]["report_to"] == yaml.safe_load("[tensorboard]") == ["tensorboard"]
    assert cfg["model"]["tasks"][0]["class_names"] == ["neg", "neu", "pos"]
    assert cfg["optim"]["betas"] == [0.8, 0.9] and cfg["run"]["name"] == "[draft]"  # a str setting keeps its text


@pytest.mark.parametrize("command", ["eval", "predict", "embed"])
def test_batch_size_and_device_say_what_they_take(command: str, capsys) -> None:
    text = help_of([command], capsys)
    assert "--batch-size BATCH_SIZE rows per forward pass (default 128)" in text
    assert "--device DEVICE auto (this process's GPU, else the CPU), cpu, cuda or cuda:N" in text


def test_export_help_names_the_graphs_and_the_format(capsys) -> None:
    from fusionkit.export import PARTS

    text = help_of(["export"], capsys)
    assert f"--parts PARTS comma-separated graphs to export, of {','.join(PARTS)}" in text
    assert "--format {onnx} onnx" in text


def test_the_train_help_example_runs_outside_the_source_tree(capsys, monkeypatch, tmp_path) -> None:
    example = help_of(["train"], capsys).split("example: ")[1].split()
    assert example[:2] == ["fusionkit", "train"]
    monkeypatch.chdir(tmp_path)  # as after pip install: no configs/ folder here
    assert main([*example[1:], "--print-config"]) == 0


def test_a_missing_image_is_said_before_any_warning_of_a_missing_caption(tmp_path, capsys, caplog) -> None:
    from fusionkit.models import FusionModel, get_config

    FusionModel(get_config("tiny")).save_pretrained(tmp_path / "m")
    assert main(["predict", str(tmp_path / "m"), "--image", str(tmp_path / "nope.png")]) == 1
    assert "image file not found" in capsys.readouterr().err
    assert "caption" not in caplog.text  # the pair is not predicted, so nothing to warn of


def test_rows_a_split_names_that_are_gone_are_reported_in_one_sentence(tmp_path, capsys, caplog) -> None:
    import csv

    from fusionkit.data import make_synthetic

    (tmp_path / "pics").mkdir()
    rows = [["id", "text", "image", "sentiment"]]
    for ex in make_synthetic(30, seed=1, image_size=16):
        ex.image.save(tmp_path / "pics" / f"{ex.id}.png")
        rows.append([ex.id, ex.text, f"pics/{ex.id}.png", ex.labels["sentiment"]])
    with open(tmp_path / "posts.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert main(["train", "--data.dataset", str(tmp_path / "posts.csv"), "--optim.epochs", "1", "--run.output_dir",
                 str(tmp_path / "runs"), "--run.name", "r", "--run.progress", "false", "--run.plots", "false",
                 "--data.cache_dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    test_ids = json.loads((tmp_path / "runs" / "r" / "split.json").read_text())["test"]
    with open(tmp_path / "new.csv", "w", newline="") as f:
        csv.writer(f).writerows([r for r in rows if r[0] != test_ids[0]])
    caplog.clear()
    assert main(["embed", str(tmp_path / "runs" / "r"), "--data", str(tmp_path / "new.csv"), "--split", "test",
                 "--on-error", "skip", "--output", str(tmp_path / "e.npy")]) == 0  # fmt: skip
    [warning] = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert f"1 of the {len(test_ids)} rows its test split names are missing" in warning
    assert warning.count("see the report above") == 1


def test_a_mistyped_option_of_eval_predict_embed_export_suggests_the_one_meant(capsys) -> None:
    """`fusionkit eval RUN --splt test` said only "unexpected arguments ['--splt', 'test']"."""
    from fusionkit.cli import main

    for argv, meant in ((["eval", "run", "--splt", "test"], "--split"),
                        (["predict", "run", "--outptu", "p.csv"], "--output"),
                        (["embed", "run", "--output", "e.npy", "--modalty", "text"], "--modality")):  # fmt: skip
        assert main(argv) == 2
        assert f"did you mean {meant}?" in capsys.readouterr().err


def test_a_mistyped_task_option_suggests_the_one_meant(capsys) -> None:
    """`--model.tasks.sentiment.label_smothing` said "no task 'sentiment' with option ...", as if the task were
    missing; the task is named as there, and the option meant is suggested."""
    assert main(["train", "--model.tasks.sentiment.label_smothing", "0.1", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "task 'sentiment' has no option 'label_smothing'; did you mean model.tasks.sentiment.label_smoothing?" in err
