"""A scraped-looking CSV where a share of the rows is broken every way, trained through the Trainer.

By design (fusionkit/data): CMYK and 16-bit images are converted to 8-bit RGB, a megabyte caption is
cut to `MAX_TEXT_CHARS`; everything else in `BROKEN_KINDS` is an error (skipped and reported under
`on_error="skip"`, raised naming the file and the problem under `"raise"`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusionkit.data import MAX_TEXT_CHARS, DataError, read_table
from fusionkit.training.config import build_config
from fusionkit.training.trainer import Trainer
from tests.reliability_utils import BROKEN_KINDS, CLASSES, make_corpus, record

TASKS = [{"name": "sentiment", "type": "classification", "num_classes": 3, "class_names": CLASSES}]


def corpus_config(tmp_path: Path, csv: Path, on_error: str, name: str):
    return build_config(None, {
        "data.dataset": str(csv), "data.on_error": on_error, "data.cache_dir": str(tmp_path / "cache"),
        "data.num_proc": 1, "model.tasks": TASKS, "optim.epochs": 1, "optim.batch_size": 16,
        "run.output_dir": str(tmp_path / "runs"), "run.name": name, "run.progress": False, "run.plots": False,
    })  # fmt: skip


def _reported(run: Path, trainer: Trainer) -> dict[str, str]:
    """Row id -> problem, from the run dir's reports alone: rows the reader left out, labels it dropped, and (copied
    from the cache's report) images the cache could not decode."""
    reports = [run / "skipped_rows.jsonl", run / "skipped_labels.jsonl"]
    out: dict[str, str] = {}
    for path in reports:
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                assert row["item"] not in out, f"{row['item']} reported twice"
                out[row["item"]] = row["problem"]
    return out


def test_skip_trains_and_reports_exactly_the_broken_rows(tmp_path: Path) -> None:
    csv, broken = make_corpus(tmp_path / "corpus", n_good=60, copies=2)
    trainer = Trainer(corpus_config(tmp_path, csv, "skip", "skip"))
    summary = trainer.fit()
    run = tmp_path / "runs" / "skip"
    assert (run / "summary.json").is_file() and summary["steps"] > 0

    must_skip = {rid for rid, kind in broken.items() if BROKEN_KINDS[kind][0] == "skip"}
    reported = _reported(run, trainer)
    assert set(reported) == must_skip
    for rid, problem in reported.items():
        assert BROKEN_KINDS[broken[rid]][1] in problem, (rid, problem)

    kept = {i for d in trainer.datasets.values() for i in d.ids}
    good = {f"good{i}" for i in range(60)}
    accepted = {rid for rid, kind in broken.items() if BROKEN_KINDS[kind][0] == "ok"}
    # a bad label costs the label, not the row: its caption and image still train the other objectives
    unlabelled = {rid for rid, kind in broken.items() if kind == "unknown_label"}
    assert kept == good | accepted | unlabelled  # no good row dropped, nothing unreadable kept
    for split in trainer.datasets.values():
        for i, rid in enumerate(split.ids):
            assert (rid in unlabelled) == (split[i]["labels"]["sentiment"] is None), rid

    # accepted-and-fixed rows: converted images carry real content, the huge caption was capped
    for split in trainer.datasets.values():
        for i, rid in enumerate(split.ids):
            if rid.startswith(("cmyk_jpeg", "png16")):
                assert len(np.unique(split[i]["pixel_values"].numpy())) > 10, rid
    table = read_table(csv, label_columns=["sentiment"], on_error="skip")
    caption = table[table.index_of("megabyte_caption0")].text
    assert len(caption) == MAX_TEXT_CHARS
    record("corpus/skip", rows=len(good) + len(broken), broken_rows_tried=len(broken),
           kinds=len(BROKEN_KINDS), skipped=len(reported), accepted_by_design=sorted(accepted),
           unknown_labels_tried=sum(k == "unknown_label" for k in broken.values()),
           unknown_labels_reported=sum(broken[r] == "unknown_label" for r in reported),
           good_rows_kept=len(good & kept), good_rows_dropped=len(good - kept), train_steps=summary["steps"])  # fmt: skip


@pytest.mark.parametrize(
    ("kinds", "first"),
    [
        (None, "read"),  # read-time problems are found first, in file order
        (["truncated_jpeg", "zero_byte", "not_an_image", "giant", "cmyk_jpeg", "png16"], "image"),
    ],
)
def test_raise_names_the_file_and_the_problem(tmp_path: Path, kinds: list[str] | None, first: str) -> None:
    csv, broken = make_corpus(tmp_path / "corpus", n_good=12, copies=1)
    if kinds is not None:  # keep only these broken rows
        lines = csv.read_bytes().split(b"\n")
        keep = [ln for ln in lines if not any(ln.startswith(f"{k}".encode()) for k in BROKEN_KINDS) or
                any(ln.startswith(k.encode()) for k in kinds)]  # fmt: skip
        csv.write_bytes(b"\n".join(keep))
        broken = {r: k for r, k in broken.items() if k in kinds}
    order = [ln.split(b",")[0].decode() for ln in csv.read_bytes().split(b"\n")[1:] if ln]
    read_time = {"missing_file", "empty_caption", "invalid_utf8", "unknown_label"}
    candidates = [r for r in order if r in broken and BROKEN_KINDS[broken[r]][0] == "skip"]
    if first == "read":
        expected = next(r for r in candidates if broken[r] in read_time)
    else:
        expected = None  # image errors surface per split; any of them may come first
    with pytest.raises(DataError) as info:
        Trainer(corpus_config(tmp_path, csv, "raise", "raise"))
    err = info.value
    rid = err.item
    assert rid in candidates and (expected is None or rid == expected), (rid, expected)
    assert BROKEN_KINDS[broken[rid]][1] in err.problem
    if first == "read":
        line = order.index(rid) + 2
        assert f"{csv}:{line}" in str(err)
    else:
        assert f"{rid}." in str(err)  # the image file's name
    record(f"corpus/raise/{first}", first_error=str(err)[:160], broken_rows=len(broken))
