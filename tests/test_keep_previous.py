"""An --output that exists is kept as NAME.~N~ before it is replaced: a symlink of the user's too."""

from __future__ import annotations

import os
from pathlib import Path

from fusionkit.training.report import keep_previous


def test_a_symlink_at_the_output_is_kept_as_a_link(tmp_path: Path) -> None:
    target = tmp_path / "mine.csv"
    target.write_text("the user's\n")
    out = tmp_path / "preds.csv"
    out.symlink_to(target.name)
    (tmp_path / "gone.csv").symlink_to("nowhere.csv")  # a dangling link is the user's as well
    for link in (out, tmp_path / "gone.csv"):
        backup = keep_previous(link)
        assert backup == link.with_name(f"{link.name}.~1~") and backup.is_symlink()
        assert os.readlink(backup) == os.readlink(link)
    new = tmp_path / "new.csv"
    new.write_text("new\n")
    os.replace(new, out)  # what the writer does next
    assert target.read_text() == "the user's\n" and (tmp_path / "preds.csv.~1~").read_text() == "the user's\n"
    assert keep_previous(out) == tmp_path / "preds.csv.~2~"
