"""No hangs: a stopped rank fails the others within ``collective_timeout_minutes``, and the
workers of a killed launcher exit (2 processes under torchrun, gloo on CPU).

The workers are ``tests/dist_workers/hang_checks.py``. ``kdtune run --nproc_per_node N`` runs
torchrun's launcher in its own process, so its workers have the same parent relation as
here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_workers" / "hang_checks.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="this torch build has no torch.distributed gloo backend",
    ),
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_stopped_rank_fails_the_other_within_the_collective_timeout(tmp_path):
    """(The same launch first checks that a rank-local NaN loss is every rank's.)"""
    proc = subprocess.run(
        [*TORCHRUN, str(WORKER), "timeout", str(tmp_path)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,  # a hang fails here, far above the 3-second collective timeout
        check=False,
    )
    assert proc.returncode != 0
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert 2.5 <= report["seconds"] < 30, report  # the 3 s limit, not torch's 30 min default
    assert "Timed out" in report["message"]
    assert any("collective_timeout_minutes = 0.05" in note for note in report["notes"]), report
    # Before that: a NaN loss on rank 1 alone made both ranks see a non-finite step.
    finite = [json.loads((tmp_path / f"finite{rank}.json").read_text()) for rank in (0, 1)]
    assert finite == [False, False]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    launcher = subprocess.Popen(
        [*TORCHRUN, str(WORKER), "wait", str(tmp_path)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while len(pid_files := list(tmp_path.glob("rank*.pid"))) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "workers never started"
            time.sleep(0.2)
        pids = [int(path.read_text()) for path in pid_files]
        assert all(_alive(pid) for pid in pids)
        os.kill(launcher.pid, signal.SIGKILL)  # no chance to clean up
        launcher.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), "orphan workers outlived the launcher"
    finally:
        for pid in [launcher.pid, *pids]:  # only the processes this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
