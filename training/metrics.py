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
from pathlib import Path
from typing import Any

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
        """Drop records of steps after ``step`` (a resumed run redoes them). Atomic rewrite."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        temporary = self.path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(f"{line}\n" for line in kept))
        os.replace(temporary, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({key: _json_number(value) for key, value in record.items()})
        with self.path.open("a") as file:
            file.write(line + "\n")


def read_metrics(output_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``<output_dir>/metrics.jsonl`` (optionally only one kind)."""
    path = Path(output_dir) / METRICS_FILENAME
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
