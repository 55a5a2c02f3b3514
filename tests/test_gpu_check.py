"""benchmarks/gpu_check.py stays alive: its CPU dry run passes every check, and without CUDA the
real run stops at once with a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_without_cuda_it_fails_fast_and_clearly(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_dry_run_passes_every_check(tmp_path):
    """One tiny config (2 steps, then resumed) and the loss benchmark's dry run: ~1-2 min."""
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--dry-run", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(
        [*command, "--configs", "tiny/full_chunked"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    names = [c["check"] for c in summary["checks"]]
    assert names[0] == "gpu_losses" and "resume equals the uninterrupted run" in names
    assert (out / "gpu_losses.json").is_file() and (out / "summary.md").is_file()
    recipe_runs = [c for c in summary["checks"] if c["check"].startswith("recipe ")]
    assert len(recipe_runs) == 1 and len(recipe_runs[0]["losses"]) == 2
