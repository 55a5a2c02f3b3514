"""Structured metrics: one JSON object per line in ``<output_dir>/metrics.jsonl``.

Training steps are records with ``"kind": "train"``, validations ``"kind": "val"``; each run
(or resumed run) opens with one ``"kind": "setup"`` record, and every ``log_every_n_steps``
a ``"kind": "memory"`` record gives each rank's peak memory. Tests and tools read this file;
the human-readable progress bar and torchtune's metric loggers get the same numbers. Only
rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdtune.training.parallel import local_parameter_bytes
from kdtune.training.process_group import all_reduce_sum, gather_from_ranks, gather_objects

METRICS_FILENAME = "metrics.jsonl"

TRAIN_FIELDS = (
    "kind",
    "step",
    "epoch",
    "loss",
    "ce_loss",
    "kd_loss",
    "lr",
    "grad_norm",
    "num_tokens",
    "tokens_per_second",
    "step_seconds",
    "peak_memory_gib",
)
"""Every training record has exactly these keys (``kd_loss`` is null in CE-only runs).
``peak_memory_gib`` is the largest over the ranks (see :data:`MEMORY_FIELDS` for each rank's)."""

SETUP_FIELDS = (
    "kind",
    "step",
    "world_size",
    "param_memory_gib",
    "student_param_memory_gib",
    "teacher_param_memory_gib",
)
"""The setup record: the step the run starts from, the process count and, per rank (lists in
rank order), the GiB of parameters the rank holds once the models are loaded (its FSDP2 shards;
everything in one process), student and teacher together and each alone (teacher 0.0 without
one)."""

MEMORY_FIELDS = ("kind", "step", "peak_memory_gib")
"""A memory record: each rank's peak memory so far in GiB (a list in rank order; CUDA: peak
allocated tensors; CPU: the process's peak resident set)."""

VAL_FIELDS = (
    "kind",
    "step",
    "epoch",
    "ce",
    "perplexity",
    "kl_to_teacher",
    "top1_agreement",
    "num_tokens",
)
"""Every validation record has these keys (teacher metrics are null in CE-only runs)."""


@dataclass
class StepLosses:
    """One optimizer step's mean losses, still on the device (reading them syncs the host).

    ``sums``: ``[3]`` fp32, loss, CE and KD summed over the step's micro-batches and ranks (each
    micro-batch term already divided by the step's token count; KD 0 without a teacher);
    ``num_tokens``: 0-dim int64, the step's target tokens over all ranks.
    """

    sums: Tensor
    num_tokens: Tensor
    has_kd: bool

    @classmethod
    def summed(cls, parts: list[Any], num_tokens: Tensor) -> StepLosses:
        """Sum the micro-batch terms (``MicroBatchLoss``: detached ``loss``, ``ce``, ``kd`` or
        None) over the step and over ranks (an all-reduce, no host sync)."""
        has_kd = parts[0].kd is not None
        no_kd = torch.zeros((), device=parts[0].loss.device)
        local = torch.stack(
            [
                torch.stack([p.loss.float() for p in parts]).sum(),
                torch.stack([p.ce.float() for p in parts]).sum(),
                torch.stack([p.kd.float() for p in parts]).sum() if has_kd else no_kd,
            ]
        )
        return cls(all_reduce_sum(local), num_tokens, has_kd)

    def to_host(self) -> dict[str, Any]:
        """``{"loss", "ce_loss", "kd_loss", "num_tokens"}`` as Python numbers (one host sync)."""
        return _loss_fields(self, _host_values([[self.sums, self.num_tokens]])[0])


@dataclass
class PendingStep:
    """A finished optimizer step whose device values are read at the next logging step."""

    step: int
    epoch: int
    lr: float
    seconds: float
    peak_memory_gib: float  # this rank's
    losses: StepLosses
    grad_norm: Tensor  # 0-dim, before clipping
    extra: dict[str, float] = field(default_factory=dict)  # host numbers (e.g. generation)


def _host_values(rows: list[Tensor]) -> list[list[float]]:
    """Each row's values (0-dim or 1-dim tensors, concatenated) as floats, in one host sync.

    fp64 holds every fp32 value and every integer below 2**53 exactly.
    """
    flat = [torch.cat([t.detach().double().reshape(-1) for t in row]) for row in rows]
    return torch.stack(flat).tolist()


def _loss_fields(losses: StepLosses, values: list[float]) -> dict[str, Any]:
    return {
        "loss": values[0],
        "ce_loss": values[1],
        "kd_loss": values[2] if losses.has_kd else None,
        "num_tokens": int(values[3]),
    }


def train_records(
    pending: list[PendingStep], peaks_by_rank: list[list[float]]
) -> list[dict[str, Any]]:
    """The ``"kind": "train"`` records of ``pending`` steps (one host sync for all of them).

    Args:
        peaks_by_rank: per rank, the peak memory of each pending step (GiB).
    """
    values = _host_values([[p.losses.sums, p.losses.num_tokens, p.grad_norm] for p in pending])
    records = []
    for index, (step, row) in enumerate(zip(pending, values, strict=True)):
        losses = _loss_fields(step.losses, row)
        records.append(
            {
                "kind": "train",
                "step": step.step,
                "epoch": step.epoch,
                **losses,
                "lr": step.lr,
                "grad_norm": row[4],
                "tokens_per_second": losses["num_tokens"] / step.seconds,
                "step_seconds": step.seconds,
                "peak_memory_gib": max(peaks[index] for peaks in peaks_by_rank),
                **step.extra,
            }
        )
        if "generation_seconds" in step.extra:  # an on-policy step: sampling, then training
            train_seconds = step.seconds - step.extra["generation_seconds"]
            records[-1]["train_seconds"] = train_seconds
            records[-1]["train_tokens_per_second"] = losses["num_tokens"] / train_seconds
    return records


class StepLog:
    """Where training steps are recorded: each finished step waits with its device values
    until a logging step (every ``log_every`` steps) or an explicit :meth:`flush`; then all
    waiting steps are read in one host sync and one gather of every rank's peaks, and written
    to ``metrics.jsonl``; the logging step's record also goes to the ``metric_logger`` (main
    rank; None elsewhere) and the progress bar. ``add`` and ``flush`` are collectives: every
    rank calls them at the same steps."""

    def __init__(
        self,
        writer: MetricsWriter,
        metric_logger: Any,
        log_every: int,
        memory_stats: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.writer = writer
        self.metric_logger = metric_logger
        self.log_every = log_every
        self.memory_stats = memory_stats  # extra numbers for the metric logger at logging steps
        self.progress: Any = None  # a tqdm bar while training
        self.pending: list[PendingStep] = []

    def add(self, step: PendingStep) -> None:
        self.pending.append(step)
        if self.progress is not None:
            self.progress.update(1)
        if step.step % self.log_every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        peaks_by_rank = gather_objects([p.peak_memory_gib for p in self.pending])
        for index, record in enumerate(train_records(self.pending, peaks_by_rank)):
            self.writer.write(record)
            if record["step"] % self.log_every != 0:
                continue
            peaks = [float(rank_peaks[index]) for rank_peaks in peaks_by_rank]
            self.writer.write({"kind": "memory", "step": record["step"], "peak_memory_gib": peaks})
            if self.progress is not None:
                generated = record.get("generation_tokens_per_second")
                self.progress.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    tok_s=f"{record['tokens_per_second']:.0f}",
                    **({} if generated is None else {"gen_tok_s": f"{generated:.0f}"}),
                )
            extra = self.memory_stats() if self.memory_stats is not None else {}
            self.to_metric_logger(record | extra, prefix="")
        self.pending = []

    def to_metric_logger(self, record: dict[str, Any], prefix: str) -> None:
        """The record's numbers (``prefix`` + key) at its step, to the metric logger if any."""
        if self.metric_logger is None:
            return
        payload = {
            f"{prefix}{key}": value
            for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, int | float)
        }
        self.metric_logger.log_dict(payload, step=record["step"])


def parameter_memory_record(
    student: torch.nn.Module, teacher: torch.nn.Module | None
) -> dict[str, list[float]]:
    """The setup record's GiB of parameters each rank holds (its shards), student and teacher
    together and each alone. A collective; call before any forward (afterwards gathered layers
    may still be registered)."""
    student_gib = local_parameter_bytes(student) / 2**30
    teacher_gib = local_parameter_bytes(teacher) / 2**30 if teacher is not None else 0.0
    return {
        "param_memory_gib": gather_from_ranks(student_gib + teacher_gib),
        "student_param_memory_gib": gather_from_ranks(student_gib),
        "teacher_param_memory_gib": gather_from_ranks(teacher_gib),
    }


def _json_number(value: Any) -> Any:
    """Floats that JSON can hold (NaN and inf become strings, which JSON cannot write)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends records to ``metrics.jsonl``; written by the main rank only."""

    def __init__(self, output_dir: str | Path, enabled: bool) -> None:
        self.path = Path(output_dir) / METRICS_FILENAME
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run redoes them), and a torn last
        line (a kill while writing it). Atomic rewrite."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line, record in _parse_lines(self.path) if record["step"] <= step]
        temporary = self.path.with_suffix(".jsonl.tmp")
        with temporary.open("w") as file:
            file.write("".join(f"{line}\n" for line in kept))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({key: _json_number(value) for key, value in record.items()})
        with self.path.open("a") as file:
            file.write(line + "\n")


def _parse_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` of each non-empty line of a metrics file. A last line that is not
    JSON (torn by a kill mid-write) is dropped with a warning.

    Raises:
        ValueError: an earlier line is not JSON (naming the file and the line number).
    """
    lines = path.read_text().splitlines()
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError as error:
            if number < last:
                raise ValueError(
                    f"{path} line {number} is not JSON ({error}); only a torn last line is "
                    "tolerated: delete or repair that line"
                ) from error
            warnings.warn(
                f"{path}: dropping a torn last line (the run was stopped while writing it): "
                f"{line[:80]!r}",
                stacklevel=3,
            )
    return parsed


def read_metrics(output_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``<output_dir>/metrics.jsonl`` (optionally only one kind); a torn last
    line is dropped with a warning."""
    records = [record for _, record in _parse_lines(Path(output_dir) / METRICS_FILENAME)]
    return [r for r in records if kind is None or r["kind"] == kind]


def peak_memory_gib(device: str | torch.device) -> float:
    """This process's peak memory in GiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only; reset it with
    ``torch.cuda.reset_peak_memory_stats``). CPU: the process's peak resident set (``VmHWM``
    from ``/proc/self/status``; ``ru_maxrss`` where there is no ``/proc``), which includes the
    interpreter and libraries.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 2**30  # the value is in kB
    except OSError:
        pass
    import resource
    import sys

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**30 if sys.platform == "darwin" else max_rss * 1024 / 2**30
