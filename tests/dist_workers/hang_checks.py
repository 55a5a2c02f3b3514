"""Workers for ``tests/test_no_hangs.py`` (2 processes under torchrun, gloo on CPU).

Usage (from the repository root)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_workers/hang_checks.py {timeout|wait} DIR

``timeout``: the group starts with a 3-second collective timeout; rank 1 stops taking part
(sleeps), rank 0 all-reduces, adds the note the recipe adds to such errors
(:func:`kdtune.training.process_group.explain_timeout`, called by
:func:`kdtune.training.console.run_context`) and writes what it raised, and how long after
the call, to ``DIR/rank0.json``. Only torch and ``process_group`` are imported (fast start). ``wait``: each rank writes its pid to ``DIR/rank{R}.pid``
once the group is up, then sleeps (the test kills the launcher).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from kdtune.training import process_group

TIMEOUT_SECONDS = 3.0


def stop_taking_part(out: Path) -> None:
    rank, _, _ = process_group.init_distributed("cpu", timeout_minutes=TIMEOUT_SECONDS / 60)
    if rank == 1:
        time.sleep(60)  # a stopped rank (torchrun ends it once rank 0 fails)
        return
    started = time.monotonic()
    try:
        process_group.all_reduce_sum(torch.ones(1))
        error = None
    except RuntimeError as raised:
        process_group.explain_timeout(raised)
        error = raised
    report = {
        "seconds": time.monotonic() - started,
        "type": type(error).__name__ if error else None,
        "message": str(error) if error else None,
        "notes": getattr(error, "__notes__", []),
    }
    (out / "rank0.json").write_text(json.dumps(report))
    sys.exit(1)


def wait_for_kill(out: Path) -> None:
    rank, _, _ = process_group.init_distributed("cpu")
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(120)


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    {"timeout": stop_taking_part, "wait": wait_for_kill}[mode](folder)
