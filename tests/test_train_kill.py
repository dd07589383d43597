"""A real `fusionkit train` process killed with SIGKILL mid-epoch resumes to the uninterrupted result."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fusionkit.cli import main
from fusionkit.training.rundir import follow_pointer


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    def argv(name: str) -> list[str]:
        return ["train", "--data.dataset", "synthetic:400", "--data.cache_dir", str(tmp_path / "cache"),
                "--optim.epochs", "3", "--optim.batch_size", "16", "--run.checkpoint_every", "3",
                "--run.output_dir", str(tmp_path / "runs"), "--run.name", name, "--run.progress", "false",
                "--run.plots", "false"]  # fmt: skip

    assert main(argv("reference")) == 0
    proc = subprocess.Popen([sys.executable, "-m", "fusionkit", *argv("killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    last = tmp_path / "runs" / "killed" / "last"
    deadline = time.time() + 120
    while not (last.exists() and follow_pointer(last).name >= "step-00000009") and proc.poll() is None:
        assert time.time() < deadline, "training made no checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if follow_pointer(last).name >= "step-00000060":
        pytest.skip("the run finished before it could be killed")
    assert main(["train", "--resume", str(tmp_path / "runs" / "killed")]) == 0
    ref = load_file(follow_pointer(tmp_path / "runs" / "reference" / "last") / "model.safetensors")
    got = load_file(follow_pointer(last) / "model.safetensors")
    assert all((ref[k] == got[k]).all() for k in ref)
    metrics = [(tmp_path / "runs" / n / "metrics.jsonl").read_text() for n in ("reference", "killed")]
    assert metrics[0] == metrics[1]
