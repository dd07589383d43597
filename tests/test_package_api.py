"""The README's Python snippets work right after `import fusionkit`."""

from __future__ import annotations

import subprocess
import sys


def test_documented_submodules_resolve_after_import_fusionkit() -> None:
    code = ("import fusionkit; assert fusionkit.export.OnnxModel and fusionkit.hub; "
            "import fusionkit.tune as t; from fusionkit.tune import default_space; "
            "assert t is fusionkit.tune and callable(t) and callable(default_space)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # a fresh interpreter:
    assert run.returncode == 0, run.stderr  # no other test has imported the submodules there
