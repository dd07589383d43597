"""Config mistakes the command line and `build_config` must refuse (or keep) as written: fast, no training."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from fusionkit.cli import main
from fusionkit.config import ConfigError
from fusionkit.training.config import build_config


def printed_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["train", "--print-config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_a_blank_or_null_text_setting_is_refused_not_turned_into_none(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  output_dir:\n")
    err = error_of(["train", str(cfg)], capsys)
    assert "run.output_dir: empty" in err and "remove the key" in err
    assert "data.text_column: empty" in error_of(["train", "--data.text_column", "null"], capsys)
    with pytest.raises(ConfigError, match="model.text.name: empty"):
        build_config({"model": {"text": {"name": None}}})


def test_null_keeps_its_meaning_where_none_or_null_is_a_value(capsys) -> None:
    cfg = printed_config(["--model.freeze", "none", "--model.text.normalize", "null", "--run.name", "null",
                          "--data.id_column", "null"], capsys)  # fmt: skip
    assert cfg["model"]["freeze"] == "none" and cfg["model"]["text"]["normalize"] == "none"
    assert cfg["run"]["name"] is None and cfg["data"]["id_column"] is None


def test_a_file_path_found_only_from_the_working_directory_is_stored_absolute(tmp_path: Path, monkeypatch,
                                                                              caplog) -> None:  # fmt: skip
    (tmp_path / "d").mkdir()
    (tmp_path / "e" / "sub").mkdir(parents=True)
    table = tmp_path / "d" / "tweets.csv"
    table.write_text("id,text,image\n")
    (tmp_path / "e" / "sub" / "rel.yaml").write_text("data:\n  dataset: ../d/tweets.csv\n")
    monkeypatch.chdir(tmp_path / "e")  # ../d/tweets.csv exists from here, not from sub/
    cfg = build_config("sub/rel.yaml")
    assert cfg.data.dataset == str(table)  # absolute: `fusionkit eval RUN` works from any directory
    assert "relative to the file" in caplog.text
    from transformers import BertModel

    from fusionkit.models.tiny import tiny_bert_config

    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "e" / "enc")  # an encoder folder: absolute too, or a
    (tmp_path / "e" / "sub" / "rel.yaml").write_text("model:\n  text:\n    name: enc\n")  # resume elsewhere reads
    assert build_config("sub/rel.yaml").model.text.name == str(tmp_path / "e" / "enc")  # another folder of that name
    (tmp_path / "e" / "tiny").mkdir()  # a folder named as the built-in encoder: the name stays the built-in
    (tmp_path / "e" / "sub" / "rel.yaml").write_text("model:\n  image:\n    name: tiny\n")
    assert build_config("sub/rel.yaml").model.image.name == "tiny"


@pytest.mark.parametrize(("override", "said"), [
    (["--model.text.config_overrides", '{"hiden_size": 32}'], "no key 'hiden_size'; did you mean 'hidden_size'"),
    (["--model.text.config_overrides", '{"hidden_size": "abc"}'], "Field 'hidden_size' expected int, got str"),
    (["--model.image.name", "vit_tiny_patch16_2244"], "model.image.name='vit_tiny_patch16_2244'"),
    (["--model.image.model_kwargs", '{"foo": 1}'], "model.image.model_kwargs={'foo': 1}"),
])  # fmt: skip
def test_an_encoder_setting_its_library_refuses_is_one_clear_line(override: list[str], said: str, tmp_path: Path,
                                                                  monkeypatch, capsys) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a run that starts anyway writes here
    err = error_of(["train", "--optim.max_steps", "1", *override], capsys)
    assert said in err and "Traceback" not in err


def test_an_empty_resume_is_refused_not_a_new_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert "--resume is empty" in error_of(["train", "--resume", "", "--optim.max_steps", "1"], capsys)
    assert not (tmp_path / "runs").exists()


def test_resume_dot_inside_the_run_dir_names_that_run(tmp_path: Path, monkeypatch, capsys) -> None:
    from fusionkit.config import to_dict

    run = tmp_path / "runs" / "my-run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(build_config(None))))
    monkeypatch.chdir(run)
    cfg = printed_config(["--resume", "."], capsys)
    assert (cfg["run"]["output_dir"], cfg["run"]["name"]) == (str(tmp_path / "runs"), "my-run")


@pytest.mark.parametrize("name", ["1.10", "1e3", "007", "2024"])
def test_a_run_name_that_looks_like_a_number_is_kept_as_written(name: str, tmp_path: Path, capsys) -> None:
    assert printed_config(["--run.name", name], capsys)["run"]["name"] == name
    (tmp_path / "c.yaml").write_text(f"run:\n  name: {name}\n  seed: 3\noptim:\n  lr: 1e-3\n")
    cfg = build_config(tmp_path / "c.yaml")
    assert (cfg.run.name, cfg.run.seed, cfg.optim.lr) == (name, 3, 1e-3)
    assert type(cfg.run.seed) is int and type(cfg.optim.lr) is float  # numbers stay plain numbers


def test_a_yaml_sexagesimal_name_keeps_its_text_and_numbers_still_parse(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("run:\n  name: 1:30\n")
    assert build_config(tmp_path / "c.yaml").run.name == "1:30"
    cfg = printed_config(["--optim.lr", "0.5", "--optim.epochs", "2", "--optim.max_steps", "null"], capsys)
    assert (cfg["optim"]["lr"], cfg["optim"]["epochs"], cfg["optim"]["max_steps"]) == (0.5, 2, None)
    with pytest.raises(ConfigError, match="run.name: expected text, got the number 1.1; quote it"):
        build_config({"run": {"name": 1.10}})


@pytest.mark.parametrize("command", ["eval", "predict", "embed"])
def test_a_mistyped_split_is_refused_before_the_model_loads(command: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path / "no-model"), "--split", "tst", "--output", str(tmp_path / "out.x")])
    assert exit_.value.code == 2 and "invalid choice: 'tst'" in capsys.readouterr().err


@pytest.mark.parametrize("top", ["[]", "null", "- a", "3"])
def test_a_config_file_whose_top_level_is_not_a_mapping_is_refused(top: str, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a run that starts anyway writes here
    (tmp_path / "c.yaml").write_text(top + "\n")
    assert "top level must be a mapping" in error_of(["train", str(tmp_path / "c.yaml")], capsys)


def test_an_empty_config_file_means_the_defaults(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("# nothing set yet\n")
    assert printed_config([str(tmp_path / "c.yaml")], capsys)["preset"] == "tiny"


def test_a_directory_given_as_a_config_file_or_space_file_is_named_so(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert "is a directory" in error_of(["train", str(tmp_path)], capsys)
    pytest.importorskip("optuna")
    (tmp_path / "c.yaml").write_text("optim:\n  epochs: 1\n")
    err = error_of(["tune", str(tmp_path / "c.yaml"), "--trials", "1", "--space", str(tmp_path / "missing.yaml")], capsys)
    assert "the search space file does not exist" in err and "config file" not in err


@pytest.mark.parametrize("option", [["--text-column", "txt"], ["--label-column", "sentiment=mood"]])
def test_a_mistyped_column_is_refused_before_the_model_loads(option: list[str], tmp_path: Path, capsys) -> None:
    table = tmp_path / "new.csv"
    table.write_text("id,text,image,sentiment\n1,hello,,positive\n")
    err = error_of(["eval", str(tmp_path / "no-model"), "--data", str(table), *option], capsys)
    assert f"{option[0]} {option[1]}: {table} has no column '{option[1].rpartition('=')[2]}'" in err
    assert "'text', 'image', 'sentiment'" in err


def test_yaml_merge_keys_work_and_a_key_given_twice_is_still_refused(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  tasks:\n    - &t {name: a, class_names: [x, y], weight: 2.0}\n"
                   "    - <<: *t\n      name: b\n")  # fmt: skip
    tasks = printed_config([str(cfg)], capsys)["model"]["tasks"]
    assert [(t["name"], t["class_names"], t["weight"]) for t in tasks] == [("a", ["x", "y"], 2.0), ("b", ["x", "y"], 2.0)]
    cfg.write_text("optim:\n  <<: {lr: 2.0e-3}\n  epochs: 3\n  epochs: 4\n")
    assert "'epochs' is given twice" in error_of(["train", str(cfg)], capsys)


@pytest.mark.parametrize("written", ["010", "0x10", "1_0", "1:30"])
def test_an_int_not_in_plain_decimal_is_refused_in_a_file_as_on_the_command_line(tmp_path: Path, capsys,
                                                                                  written: str) -> None:  # fmt: skip
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"optim:\n  epochs: {written}\nrun:\n  name: {written}\n")  # a name keeps its text
    assert "optim.epochs: '" + written + "' is not a plain decimal number" in error_of(["train", str(cfg)], capsys)
    assert "is not a plain decimal number" in error_of(["train", "--optim.epochs", written], capsys)
    cfg.write_text(f"optim:\n  epochs: 10\nrun:\n  name: {written}\n")
    assert printed_config([str(cfg)], capsys)["run"]["name"] == written


def test_a_json_config_is_read_as_json(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"optim": {"epochs": 010}}')
    assert f"{cfg}, line 1, column 23: not valid JSON" in error_of(["train", str(cfg)], capsys)
    cfg.write_text('{"optim": {"epochs": 1, "epochs": 2}}')
    assert "key 'epochs' is given twice" in error_of(["train", str(cfg)], capsys)
    cfg.write_text('{"optim": {"epochs": 3}, "run": {"name": 1.10}}')
    out = printed_config([str(cfg)], capsys)
    assert out["optim"]["epochs"] == 3 and out["run"]["name"] == "1.10"


@pytest.mark.parametrize(
    ("value", "said"),
    [('[{"name": "mood", "name": "x"}]', "key 'name' is given twice"),
     ('[{"name": "mood"},]', "column 19"),
     ("[{'name': 'mood'}]", "JSON wants double quotes")],
)
def test_a_json_override_says_its_mistake(value: str, said: str, capsys) -> None:
    err = error_of(["train", "--print-config", "--model.tasks", value], capsys)
    assert "--model.tasks: " in err and "is not a valid JSON list or mapping" in err and said in err


def test_text_in_brackets_stays_text(capsys) -> None:
    assert printed_config(["--run.name", "[draft]"], capsys)["run"]["name"] == "[draft]"


def test_a_key_given_nested_and_dotted_in_one_file_is_refused(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 2.0e-3\noptim.lr: 1.0e-3\n")
    assert "optim.lr is given twice (nested and dotted" in error_of(["train", str(cfg)], capsys)
    cfg.write_text("optim:\n  lr: 2.0e-3\noptim.epochs: 3\n")  # different keys: both kept
    out = printed_config([str(cfg)], capsys)["optim"]
    assert out["lr"] == 2.0e-3 and out["epochs"] == 3


def test_a_config_argument_that_is_no_config_is_said_so(tmp_path: Path, capsys) -> None:
    assert "unrecognized arguments: -x" in error_of(["train", "-x"], capsys)
    assert "unrecognized arguments: -v" in error_of(["-v", "train"], capsys)
    assert "CONFIG is empty" in error_of(["train", ""], capsys)
    assert f"config file {tmp_path / 'nope.yaml'} does not exist" in error_of(["train", str(tmp_path / "nope.yaml")],
                                                                              capsys)  # fmt: skip
    assert printed_config(["/dev/null", "--optim.epochs", "3"], capsys)["optim"]["epochs"] == 3  # all defaults


def test_a_utf16_config_is_read_and_a_binary_one_named(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  epochs: 3\n", encoding="utf-16")  # with a BOM, as PowerShell's `>` writes it
    assert printed_config([str(cfg)], capsys)["optim"]["epochs"] == 3
    cfg.write_bytes(b"optim:\n  epochs: \xff\xfe3\n")
    assert f"config file {cfg} is not UTF-8 text" in error_of(["train", str(cfg)], capsys)


def test_a_yaml_boolean_in_a_text_setting_says_to_quote_it(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  tasks:\n    - {name: country, class_names: [NO, SE, DK]}\n")
    err = error_of(["train", str(cfg)], capsys)
    assert "class_names[0]: expected str, got bool False" in err and "quote it ('NO')" in err


@pytest.mark.parametrize(
    ("name", "said"),
    [("", "it is empty"), ("  ", "it is empty"), ("a\nb", "no newline"), ("a\x1bb", "no newline or control character"),
     (" a", "leading or trailing space"), ("-a", "leading '-'"), ("é" * 128, "255 bytes"), ("a/b", "no / or ..")],
)
def test_a_run_name_no_folder_should_have_is_refused(name: str, said: str) -> None:
    with pytest.raises(ConfigError, match=f"run.name must be a plain folder name \\(.*{re.escape(said)}"):
        build_config({"run": {"name": name}})
    assert build_config({"run": {"name": "my run é 1"}}).run.name == "my run é 1"


def test_a_section_given_a_value_says_to_set_its_keys_and_an_empty_one_is_empty(tmp_path: Path, capsys) -> None:
    err = error_of(["train", "--optim", "1e-3"], capsys)
    assert "optim is a section, not a value: set its keys (--optim." in err and "_FloatText" not in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  # lr: 1.0e-3\nmodel:\n  fusion:\n    # depth: 3\n")
    out = printed_config([str(cfg)], capsys)
    assert out == printed_config([], capsys)  # nothing set: the preset's values


@pytest.mark.parametrize("written", ["1_0", "1_0.5", "1e-0_3"])
def test_a_float_with_underscores_is_refused_not_read_as_python_would(tmp_path: Path, capsys, written: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"optim:\n  lr: {written}\n  epochs: 1\nrun:\n  output_dir: {tmp_path}\n")
    assert "optim.lr: '" + written + "' is not a plain decimal number" in error_of(["train", str(cfg)], capsys)
    assert "is not a plain decimal number" in error_of(["train", str(cfg), "--optim.lr", written], capsys)


def test_an_override_given_twice_with_different_values_is_said(capsys, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert printed_config(["--optim.epochs", "3", "--optim.lr", "0.1", "--optim.epochs=5"], capsys)["optim"]["epochs"] == 5
    assert "--optim.epochs is given twice ('3', then '5'): the last one is used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert printed_config(["--optim.epochs", "3", "--optim.epochs", "3"], capsys)["optim"]["epochs"] == 3
    assert "given twice" not in caplog.text


@pytest.mark.parametrize(("written", "meant"), [("0.000_1", "e.g. 0.0001"), ("1_0.5", "e.g. 10.5"), ("0x10", "e.g. 16")])
def test_a_number_not_in_plain_decimal_is_shown_as_the_decimal_it_reads_as(capsys, written: str, meant: str) -> None:
    assert f"without leading zeros, {meant}" in error_of(["train", "--optim.lr", written], capsys)
