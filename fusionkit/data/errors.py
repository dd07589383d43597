"""Bad-input policy shared by every reader and the cache: raise with a precise message, or skip and report.

Nothing is dropped silently: with `on_error="skip"` each problem is appended to a JSONL report file
and the count is logged, so a user can always see (and fix) what was left out.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger("fusionkit.data")

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """One bad item: says which file/row, what is wrong and what to do about it."""

    def __init__(self, problem: str, *, source: str | None = None, item: str | None = None, hint: str = ""):
        self.problem, self.source, self.item, self.hint = problem, source, item, hint
        where = ", ".join(p for p in (source, f"item {item}" if item is not None else None) if p)
        msg = f"{where}: {problem}" if where else problem
        super().__init__(f"{msg}. {hint[:1].upper()}{hint[1:]}" if hint else msg)


def check_policy(on_error: str) -> OnError:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error  # type: ignore[return-value]


@dataclass
class SkipLog:
    """Collects skipped items under `on_error="skip"`; raises immediately under `"raise"`."""

    on_error: OnError
    what: str  # e.g. "read_mvsa(/data/mvsa)", used in the log line and the default report name
    skipped: list[dict[str, str | None]] = field(default_factory=list)

    def __call__(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.record(err)

    def record(self, err: DataError) -> None:
        """Report a skip the user asked for (e.g. `missing_text="skip"`), whatever `on_error` says."""
        self.skipped.append({"item": err.item, "source": err.source, "problem": err.problem})

    def finish(self, report_path: str | Path | None, total: int) -> Path | None:
        """Write the report (if anything was skipped) and log the count; returns the report's path."""
        if not self.skipped:
            return None
        if report_path is None:
            report_dir = Path(tempfile.gettempdir()) / "fusionkit-skipped"
            report_dir.mkdir(parents=True, exist_ok=True)
            report_path = report_dir / f"skipped-{time.strftime('%Y%m%d-%H%M%S')}-{id(self):x}.jsonl"
        from ..store import replace_file

        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:  # whole, by rename: a hard-linked copy of a run keeps its own report
            with tmp.open("w", encoding="utf-8", errors="backslashreplace") as f:  # a row's undecodable bytes
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in self.skipped)

        replace_file(report_path, write, "another report path")
        log.warning("%s: skipped %d of %d items; see %s", self.what, len(self.skipped), total, report_path)
        return report_path
