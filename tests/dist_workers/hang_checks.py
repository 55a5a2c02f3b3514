"""Workers for ``tests/test_no_hangs.py`` (2 processes under torchrun, gloo on CPU).

Usage (from the repository root)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_workers/hang_checks.py {timeout|wait} DIR

``timeout``: first, rank 1 alone has a NaN loss: each rank writes whether the guard finds
the step finite (:func:`kdtune.training.guard.step_is_finite` of the step's losses summed over
ranks, as the recipe does) to ``DIR/finite{R}.json``. Then, with the group's 3-second
collective timeout, rank 1 stops taking part (sleeps), rank 0 all-reduces, adds the note the recipe adds to such errors
(:func:`kdtune.training.process_group.explain_timeout`, called by
:func:`kdtune.training.console.run_context`) and writes what it raised, and how long after
the call, to ``DIR/rank0.json``. ``wait``: each rank writes its pid to ``DIR/rank{R}.pid``
once the group is up, then sleeps (the test kills the launcher).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from kdtune.training import process_group
from kdtune.training.guard import step_is_finite
from kdtune.training.metrics import StepLosses

TIMEOUT_SECONDS = 3.0


def rank_local_nan(rank: int, out: Path) -> None:
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    part = SimpleNamespace(loss=loss, ce=loss, kd=None)  # a micro-batch's MicroBatchLoss
    losses = StepLosses.summed([part], num_tokens=torch.tensor(4))
    finite = step_is_finite(losses.sums, grad_norm=torch.tensor(1.0))
    (out / f"finite{rank}.json").write_text(json.dumps(bool(finite)))


def stop_taking_part(out: Path) -> None:
    rank, _, _ = process_group.init_distributed("cpu", timeout_minutes=TIMEOUT_SECONDS / 60)
    rank_local_nan(rank, out)
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
