"""Run the reliability suite (tests/test_reliability_*.py, test_readers_families.py); write results/reliability.*.

Each test appends its figures to the JSON-lines file named by $FUSIONKIT_RELIABILITY_JSON (see
tests/reliability_utils.py `record`); pytest's own exit status and per-test outcomes come from its
JUnit XML. Usage::

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


def run_suite(slow: bool, fuzz_examples: int) -> tuple[list[dict], list[dict], float, int]:
    with tempfile.TemporaryDirectory() as d:
        figures, junit = Path(d) / "figures.jsonl", Path(d) / "junit.xml"
        env = dict(
            os.environ, FUSIONKIT_RELIABILITY_JSON=str(figures), FUSIONKIT_FUZZ_EXAMPLES=str(fuzz_examples)
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-m", "" if slow else "not slow", *sorted(map(str, (REPO / "tests").glob("test_reliability_*.py"))),
               str(REPO / "tests" / "test_readers_families.py")]  # fmt: skip
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
        seconds = time.perf_counter() - start
        cases = [json.loads(x) for x in figures.read_text().splitlines()] if figures.exists() else []
        tests = []
        for tc in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                    outcome += f": {(el.get('message') or '')[:120]}"
            tests.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "seconds": float(tc.get("time", 0)),
                          "outcome": outcome})  # fmt: skip
    return cases, tests, seconds, rc


def _fmt(v: object) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else str(v)


def write_report(cases: list[dict], tests: list[dict], seconds: float, rc: int, slow: bool) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    lines = [
        "# Reliability suite",
        "",
        f"Produced by `python benchmarks/reliability.py{' --slow' if slow else ''}` on {machine}, "
        f"{time.strftime('%Y-%m-%d')}; pytest exit status {rc}, {seconds:.0f} s in all.",
        "The figures come from the tests themselves (tests/test_reliability_*.py); every figure below is "
        "from a test that passed unless its outcome says otherwise.",
        "",
        "## Cases and figures",
        "",
        "| case | figures |",
        "|---|---|",
    ]
    for c in sorted(cases, key=lambda c: c["case"]):
        figs = "; ".join(f"{k}={_fmt(v)}" for k, v in c["figures"].items()).replace("|", "\\|")
        lines.append(f"| `{c['case']}` | {figs} |")
    totals = {
        "training runs killed (SIGKILL) and resumed": sum(
            c["figures"].get("kills", 0) for c in cases if c["case"].startswith("interrupt/sigkill")
        ),
        "runs stopped by SIGTERM/SIGINT": sum(
            1 for c in cases if c["case"] in ("interrupt/SIGTERM", "interrupt/SIGINT")
        ),
        "broken rows tried": sum(c["figures"].get("broken_rows_tried", 0) for c in cases),
        "fuzz examples run": sum(
            c["figures"].get("examples", 0) for c in cases if c["case"].startswith(("fuzz/", "readers/"))
        ),
        "reader rows tried / reported / kept under skip": "/".join(
            str(sum(c["figures"].get(k, 0) for c in cases)) for k in ("rows_tried", "rows_reported", "rows_kept")
        ),
    }
    for c in cases:
        if c["case"].startswith("load/"):
            for n, mib in c["figures"]["peak_rss_mib"].items():
                totals[f"embed peak RSS at {int(n):,} pairs (MiB)"] = mib
    lines += ["", "## Totals", ""] + [f"- {k}: {v}" for k, v in totals.items()]
    lines += ["", "## Tests", "", "| test | outcome | seconds |", "|---|---|---|"]
    lines += [f"| `{t['test']}` | {t['outcome'].replace('|', '/')} | {t['seconds']:.1f} |" for t in tests]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    payload = {"slow": slow, "exit_status": rc, "seconds": round(seconds, 1), "machine": machine,
               "totals": totals, "cases": cases, "tests": tests}  # fmt: skip
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
