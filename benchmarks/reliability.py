"""Run the reliability suite (the test files in `FAMILIES`); write benchmarks/results/reliability.*.

Each test appends its figures to the JSON-lines file named by $FUSIONKIT_RELIABILITY_JSON (see
tests/reliability_utils.py `record` and `tally`); pytest's own exit status and per-test outcomes come
from its JUnit XML. Usage::

    python benchmarks/reliability.py            # the default (fast) cases
    python benchmarks/reliability.py --slow     # every case: all kill points, 100k pairs, 300 fuzz examples
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# family -> (test files, case-name prefixes of the figures they record)
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "training faults, corrupt corpus, load": (
        ("test_reliability_corpus.py", "test_reliability_faults.py", "test_reliability_fuzz.py",
         "test_reliability_interrupt.py", "test_reliability_load.py"),
        ("corpus/", "fuzz/", "interrupt/", "load/", "numerical/", "resource/", "untrusted/"),
    ),
    "readers (CSV, TSV, JSONL, Parquet, DataFrame, HF, MVSA)": (("test_readers_families.py",), ("readers/",)),
    "untrusted images": (("test_images_untrusted.py", "test_reliability_images.py"), ("images/",)),
    "caches (one store)": (("test_cache_store.py",), ("cache/",)),
    "run directories and output paths": (("test_rundir.py",), ("rundir/",)),
}  # fmt: skip


def suite_files() -> list[str]:
    """The files of `FAMILIES`, then any other tests/test_reliability_*.py (reported as family "other")."""
    named = [REPO / "tests" / f for files, _ in FAMILIES.values() for f in files]
    others = sorted(set((REPO / "tests").glob("test_reliability_*.py")) - set(named))
    return [str(p) for p in [*named, *others] if p.exists()]


def merge_tallies(lines: list[dict]) -> list[dict]:
    """One entry per `tally` case, counts summed (first-seen order); `record` entries as they are."""
    out: list[dict] = []
    summed: dict[str, dict] = {}
    for entry in lines:
        if not entry.pop("sum", False):
            out.append(entry)
        elif entry["case"] in summed:
            figs = summed[entry["case"]]["figures"]
            for k, v in entry["figures"].items():
                figs[k] = figs.get(k, 0) + v
        else:
            summed[entry["case"]] = entry
            out.append(entry)
    return out


def run_suite(slow: bool, fuzz_examples: int) -> tuple[list[dict], list[dict], float, int]:
    with tempfile.TemporaryDirectory() as d:
        figures, junit = Path(d) / "figures.jsonl", Path(d) / "junit.xml"
        env = dict(
            os.environ, FUSIONKIT_RELIABILITY_JSON=str(figures), FUSIONKIT_FUZZ_EXAMPLES=str(fuzz_examples)
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-m", "" if slow else "not slow", *suite_files()]  # fmt: skip
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
        seconds = time.perf_counter() - start
        lines = [json.loads(x) for x in figures.read_text().splitlines()] if figures.exists() else []
        cases = merge_tallies(lines)
        tests = []
        for tc in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                    outcome += f": {(el.get('message') or '')[:120]}"
            name = f"{tc.get('classname')}::{tc.get('name')}"
            tests.append({"test": name, "seconds": float(tc.get("time", 0)), "outcome": outcome})
    return cases, tests, seconds, rc


SIGNAL_CASES = ("interrupt/SIGTERM", "interrupt/SIGINT")


def _fmt(v: object) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else str(v)


def _cpu() -> str:
    """The CPU's model name as lscpu gives it (from /proc/cpuinfo), or the architecture elsewhere."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), "?")


def _family(test: str) -> str:
    """The family of a JUnit test name such as `tests.test_rundir::test_x` (by its test file)."""
    module = next((p for p in test.split("::")[0].split(".") if p.startswith("test_")), "")
    return next((f for f, (files, _) in FAMILIES.items() if f"{module}.py" in files), "other")


def _sum(cases: list[dict], prefixes: tuple[str, ...], *keys: str) -> list[int]:
    return [sum(c["figures"].get(k, 0) for c in cases if c["case"].startswith(prefixes)) for k in keys]


def family_figures(cases: list[dict], tests: list[dict]) -> dict[str, dict]:
    """Per family: tests (passed, skipped, all, seconds), generated examples, rows tried/reported/kept."""
    out = {}
    for family, (_, prefixes) in {**FAMILIES, "other": ((), ())}.items():
        mine = [t for t in tests if _family(t["test"]) == family]
        if family == "other" and not mine:
            continue
        tried, reported, kept = _sum(cases, prefixes, "rows_tried", "rows_reported", "rows_kept")
        out[family] = {
            "tests_passed": sum(t["outcome"] == "passed" for t in mine),
            "tests_skipped": sum(t["outcome"].startswith("skipped") for t in mine),
            "tests": len(mine),
            "seconds": round(sum(t["seconds"] for t in mine), 1),
            "generated_examples": sum(_sum(cases, prefixes, "examples", "files")),
            "rows_tried": tried,
            "rows_reported": reported,
            "rows_kept": kept,
        }
    return out


def family_rows(families: dict[str, dict]) -> list[str]:
    head = (
        "| family | tests passed | seconds | generated examples | rows tried / reported / kept under skip |"
    )
    rows = [head, "|---|---|---|---|---|"]
    for family, f in families.items():
        skipped = f" ({f['tests_skipped']} skipped)" if f["tests_skipped"] else ""
        rows_ = f"{f['rows_tried']} / {f['rows_reported']} / {f['rows_kept']}" if f["rows_tried"] else "-"
        rows.append(f"| {family} | {f['tests_passed']}/{f['tests']}{skipped} | {f['seconds']:.0f} | "
                    f"{f['generated_examples'] or '-'} | {rows_} |")  # fmt: skip
    return rows


def image_rows(cases: list[dict]) -> list[str]:
    """The memory each worst-case image costs `preprocess_image` (tests/test_reliability_images.py)."""
    rows = ["| image | file bytes | result | peak RSS (MiB) | tracemalloc peak (MiB) | seconds |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for c in cases:
        f = c["figures"]
        if c["case"].startswith("images/allocation/") and "file_bytes" in f:
            result = f["result"] if f["result"] == "decoded" else f["result"].split(":")[0]
            mib = f"{f['peak_rss_bytes'] / 2**20:.1f} | {f['traced_bytes'] / 2**20:.2f}"
            name = c["case"].rsplit("/", 1)[1]
            rows.append(f"| `{name}` | {f['file_bytes']:,} | {result} | {mib} | {f['seconds']} |")
    return rows if len(rows) > 2 else []


def totals_of(cases: list[dict], tests: list[dict]) -> dict[str, object]:
    by = {c["case"]: c["figures"] for c in cases}
    totals: dict[str, object] = {
        "tests passed": f"{sum(t['outcome'] == 'passed' for t in tests)} of {len(tests)}",
        "training runs killed (SIGKILL) and resumed": _sum(cases, ("interrupt/sigkill",), "kills")[0],
        "runs stopped by SIGTERM/SIGINT": sum(c["case"] in SIGNAL_CASES for c in cases),
        "broken rows tried (corrupt corpus)": _sum(cases, ("corpus/",), "broken_rows_tried")[0],
        "labels outside the configured classes (corpus): reported and skipped": "{1} of {0}".format(
            *_sum(cases, ("corpus/skip",), "unknown_labels_tried", "unknown_labels_reported")
        ),
        "fuzz examples run": _sum(cases, ("fuzz/", "readers/"), "examples")[0],
    }  # fmt: skip
    if "corpus/skip" in by:
        f = by["corpus/skip"]
        totals["good rows kept (corrupt corpus, on_error=skip)"] = (
            f"{f['good_rows_kept']} of {f['good_rows_kept'] + f['good_rows_dropped']}"
        )
    if "images/corrupted_bytes" in by:
        f = by["images/corrupted_bytes"]
        totals["corrupted image files tried (decoded / refused)"] = (
            f"{f['files']} ({f['decoded']} / {f['refused']})"
        )
    for name in ("strip_2000000x1_png", "over_limit_41mp_png"):
        if f"images/allocation/{name}" in by:
            f = by[f"images/allocation/{name}"]
            totals[
                f"`{name}` ({f['file_bytes']:,} B): bytes allocated to refuse it (peak RSS / tracemalloc)"
            ] = f"{f['peak_rss_bytes']:,} / {f['traced_bytes']:,}"
    if "images/allocation/worst_accepted" in by:
        f = by["images/allocation/worst_accepted"]
        totals[f"worst accepted image, `{f['image']}` ({f['pixels']:,} px): peak RSS"] = (
            f"{f['peak_rss_bytes'] / 2**20:.0f} MiB ({f['bytes_per_pixel'][f['image']]} B/px)"
        )
    if "rundir/never_overwritten" in by:  # an existing run: same name again, any dir state, a refused resume
        f = by["rundir/never_overwritten"]
        totals["existing run dirs left byte-identical by a new run or a refused resume"] = (
            f"{f.get('intact', 0)} of {f.get('tried', 0)}"
        )
    if "rundir/outputs_refused" in by:
        refused = by["rundir/outputs_refused"]["refused"]
        totals["`--output` paths refused before any work (the input data, a run's files)"] = refused
    for c in cases:
        if c["case"].startswith("load/"):
            for n, mib in c["figures"]["peak_rss_mib"].items():
                totals[f"embed peak RSS at {int(n):,} pairs (MiB)"] = mib
    return totals


def write_report(cases: list[dict], tests: list[dict], seconds: float, rc: int, slow: bool) -> None:
    families = family_figures(cases, tests)
    machine = (f"{_cpu()} ({platform.machine()}, {os.cpu_count()} CPUs), Python {platform.python_version()}, "
               f"torch {torch.__version__}")  # fmt: skip
    lines = [
        "# Reliability suite",
        "",
        f"Produced by `python benchmarks/reliability.py{' --slow' if slow else ''}` on {machine}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; pytest exit status {rc}, {seconds:.0f} s in all.",
        "The figures come from the tests themselves (the files in `FAMILIES` of benchmarks/reliability.py); "
        "every figure below is from a test that passed unless its outcome says otherwise.",
        "",
        "## Families",
        "",
        *family_rows(families),
    ]
    totals = totals_of(cases, tests)
    lines += ["", "## Totals", ""] + [f"- {k}: {v}" for k, v in totals.items()]
    images = image_rows(cases)
    if images:
        lines += ["", "## What the worst images cost (`preprocess_image`, case by case, fresh interpreter)",
                  "", *images, "", "Peak RSS is the high-water mark above what was resident before the case; "
                  "0.0 means no growth at the kernel's 4 KiB page resolution; "
                  "tracemalloc sees numpy's buffers but not Pillow's."]  # fmt: skip
    lines += ["", "## Cases and figures", "", "| case | figures |", "|---|---|"]
    for c in sorted(cases, key=lambda c: c["case"]):
        figs = "; ".join(f"{k}={_fmt(v)}" for k, v in c["figures"].items()).replace("|", "\\|")
        lines.append(f"| `{c['case']}` | {figs} |")
    lines += ["", "## Tests", "", "| test | outcome | seconds |", "|---|---|---|"]
    lines += [f"| `{t['test']}` | {t['outcome'].replace('|', '/')} | {t['seconds']:.1f} |" for t in tests]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    payload = {"slow": slow, "exit_status": rc, "seconds": round(seconds, 1), "machine": machine,
               "totals": totals, "families": families, "cases": cases, "tests": tests}  # fmt: skip
    (RESULTS / "reliability.json").write_text(json.dumps(payload, indent=1) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slow", action="store_true", help="also run the cases marked slow")
    p.add_argument("--fuzz-examples", type=int, help="hypothesis max_examples (default 25, 300 with --slow)")
    args = p.parse_args()
    fuzz = args.fuzz_examples or (300 if args.slow else 25)
    cases, tests, seconds, rc = run_suite(args.slow, fuzz)
    write_report(cases, tests, seconds, rc, args.slow)
    print(f"wrote {RESULTS / 'reliability.md'} ({len(cases)} cases, {len(tests)} tests, exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
