"""A broken plugin named in $FUSIONKIT_PLUGINS: one line naming it and its error, exit 2, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusionkit.cli import main


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("def broken(:\n", "SyntaxError at fk_plug_bad.py:1"),
        ("x = 1\nraise RuntimeError('boom at import')\n", "RuntimeError at fk_plug_bad.py:2: boom at import"),
        ("import fusionkit\n\n@fusionkit.register_fusion('concat')\nclass C(fusionkit.FusionStrategy):\n  pass\n",
         "ValueError at fk_plug_bad.py:3: fusion strategy 'concat' is already registered"),
    ],
)
def test_a_broken_plugin_is_named_in_one_line(tmp_path: Path, monkeypatch, capsys, source: str, said: str) -> None:
    (tmp_path / "fk_plug_bad.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FUSIONKIT_PLUGINS", "fk_plug_bad")
    assert main(["train", "--print-config", "--model.fusion.strategy", "typo"]) == 2
    err = capsys.readouterr().err
    assert "fusionkit plugin 'fk_plug_bad' (from $FUSIONKIT_PLUGINS) failed to import: " + said in err
    assert "Traceback" not in err
