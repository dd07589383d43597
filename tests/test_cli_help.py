"""What the command line's help and messages say must be what it does: fast, no training."""

from __future__ import annotations

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
