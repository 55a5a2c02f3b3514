"""The process group of a run: start, stop, and the few collectives the recipe needs.

Every function works in a plain single process (no process group) as a no-op or its trivial
equivalent, so the recipe calls the same functions with one process or many. Under
``torchrun`` with several processes :func:`init_distributed` starts a gloo (CPU) or NCCL+gloo
(CUDA) group; rank 0 reads checkpoints, writes files and logs.

Kept instead of ``torchtune.training.init_distributed``/``get_world_size_and_rank``: those
start a group even for one process and pick no per-rank CUDA device; these are no-ops there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size_and_rank() -> tuple[int, int]:
    """``(world_size, rank)``; ``(1, 0)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    return world_size_and_rank()[1] == 0


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_timeout_minutes: float | None = None  # the group's collective timeout, for error messages
_started_group = False  # this process started a multi-process group (kept after teardown)


def exit_with_launcher() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent (the launcher: torchrun's
    agent, or ``kdtune run``, which runs it in-process) dies, so killed launchers leave no
    orphan workers (torchrun does not ask for this). A process whose launcher is already gone
    (re-parented to init) exits at once. Elsewhere a no-op.

    Returns:
        True when the kernel accepted the request.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before the request
        os._exit(1)
    return True


def init_distributed(
    device: str | torch.device, timeout_minutes: float | None = None
) -> tuple[int, int, torch.device]:
    """Initialise the process group when ``torchrun`` started more than one process.

    Reads torchrun's ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. With one process (or none of
    them set) nothing is initialised and the run is a plain single process. The backend is
    ``cuda:nccl,cpu:gloo`` for CUDA (gloo carries CPU tensors: CPU offload, CPU all-reduces)
    and ``gloo`` for CPU. Calling it again after initialisation returns the same answer.

    Each process launched by torchrun (``LOCAL_RANK`` set) exits when its launcher dies
    (:func:`exit_with_launcher`).

    Args:
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``. With several CUDA processes each
            takes ``cuda:LOCAL_RANK``; an explicit index is refused there.
        timeout_minutes: ``collective_timeout_minutes``: a collective (gloo or NCCL) that waits
            longer fails the run instead of hanging (None: torch's default, 10 min for NCCL,
            30 for gloo). NCCL's watchdog then ends the process (torch's default
            ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``; 1 also aborts the communicators first).

    Returns:
        ``(rank, world_size, device)``: ``device`` is the one this process computes on,
        ``cuda:LOCAL_RANK`` for a CUDA run with several processes, else ``device`` itself.

    Raises:
        ValueError: ``device`` names one CUDA index while several processes were launched.
    """
    device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "LOCAL_RANK" in os.environ:
        exit_with_launcher()
    if world_size <= 1:
        return 0, 1, device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"device={str(device)!r} names one GPU but torchrun started {world_size} "
                "processes: set device: cuda and each process takes cuda:LOCAL_RANK"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        global _timeout_minutes, _started_group
        _timeout_minutes, _started_group = timeout_minutes, True
        timeout = timedelta(minutes=timeout_minutes) if timeout_minutes is not None else None
        dist.init_process_group(backend=backend, timeout=timeout)
    return rank, world_size, device


def group_was_torn_down() -> bool:
    """True when this process started a multi-process group and it has been destroyed since
    (:func:`teardown`): nothing of torch.distributed is left for the process to finish."""
    return _started_group and not dist.is_initialized()


def explain_timeout(error: BaseException) -> None:
    """Add a note to a collective's timeout error (gloo: "Timed out waiting ...ms") saying
    what it means and which key sets it. Works after the group was torn down too (the recipe
    destroys it before the error reaches its run context)."""
    if (_started_group or is_distributed()) and "Timed out" in str(error):
        limit = f" = {_timeout_minutes}" if _timeout_minutes is not None else ""
        error.add_note(
            f"a collective waited longer than collective_timeout_minutes{limit}: another rank "
            "stopped, hung or died (see its output); raise the key if a rank legitimately "
            "works alone that long (e.g. a long save)"
        )


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown(*, wait_for_all: bool = True) -> None:
    """Barrier, then destroy the process group (no-op without one).

    The barrier matters: gloo sometimes aborts at teardown when one rank destroys the group
    while another is still in a collective. ``wait_for_all=False`` (after a failure) skips it:
    the other ranks may never reach it, and the failing rank must exit.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks, as a new detached tensor.

    Used for the global count of non-ignored tokens (the loss denominator) and for logging
    sums. Any shape; ``tensor`` itself is left unchanged. In a single process: a detached copy.
    """
    summed = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order, on every rank (``[obj]`` in one process).

    For small per-rank state saved by rank 0 (random-generator states). A collective.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself in one process).

    Lets rank 0 alone read a file (a checkpoint's training state) and share what it read, so
    the other ranks need neither the file nor the memory for its large parts. A collective;
    the other ranks' ``obj`` is ignored (pass None).
    """
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_from_ranks(value: float) -> list[float]:
    """Every rank's ``value`` in rank order (``[value]`` in a single process).

    For logging per-rank numbers (peak memory) from rank 0. A collective: call on every rank.
    """
    if not is_distributed():
        return [float(value)]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, float(value))
    return [float(item) for item in gathered]
