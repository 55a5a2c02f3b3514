"""Stopping a run on a scheduler's signal: finish the step, save a checkpoint, exit cleanly.

SIGTERM (a time limit or a preemption), SIGINT (Ctrl-C) and SIGUSR1 (a scheduler's warning
signal) set a flag instead of killing the process; the training loop reads it after each
optimizer step (:meth:`StopRequest.agreed`: every rank takes the same decision at the same
step), saves one checkpoint and raises :class:`Preempted`, whose one-line message says how to
resume; the process exits with :data:`PREEMPTED_EXIT_CODE`. A second signal exits at once,
without a checkpoint. The same signal reaching a process twice within
:data:`DUPLICATE_WINDOW_S` (the terminal's Ctrl-C and the launcher forwarding it) counts once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

import torch

from kdtune.training.guard import TrainingStopped
from kdtune.training.process_group import all_reduce_sum, is_distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL: retry,
with ``resume_from_checkpoint=true``)."""
DUPLICATE_WINDOW_S = 1.0


class Preempted(TrainingStopped):
    """The run stopped on a signal after saving a checkpoint; the message says how to resume."""


class StopRequest:
    """The flag the signal handlers set, and the cross-rank decision the loop reads."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Handle :data:`STOP_SIGNALS` in this process (main thread only; else a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signal is not None:
            if now - self._received_at < DUPLICATE_WINDOW_S:
                return  # one event delivered twice (terminal and launcher)
            sys.stderr.write(f"\nkdtune: second {name}: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signal, self._received_at = signum, now
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(
                f"\nkdtune: {name} received: finishing this step, then saving a checkpoint and "
                "stopping (send it again to exit at once)\n"
            )
            sys.stderr.flush()

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank received a stop signal (one all-reduce and host
        read per call in a multi-process run; none in one process)."""
        local = self.signal is not None
        if not is_distributed():
            return local
        flag = torch.tensor([int(local)], device=device)
        return bool(all_reduce_sum(flag).item())

    def stopped(self, step: int, checkpoint: object) -> Preempted:
        """The error ending a run stopped at ``step``, its checkpoint saved at ``checkpoint``."""
        name = signal.Signals(self.signal).name if self.signal is not None else "a signal"
        return Preempted(
            f"stopped by {name} after step {step}; checkpoint {checkpoint}. To continue, run "
            "the same command with resume_from_checkpoint=true"
        )
