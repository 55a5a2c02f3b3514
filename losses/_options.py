"""Option and argument checks shared by the chunked and the fused KD losses.

Each raises ``ValueError`` naming the argument, the bad value and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

REDUCTIONS = ("mean", "sum")


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def check_common_options(
    ignore_index: int, reduction: str, num_output_chunks: int | None = None
) -> None:
    check_int("ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}.")
    if num_output_chunks is not None:
        check_int("num_output_chunks", num_output_chunks, minimum=1)


def check_kd_options(
    temperature: float, temperature_squared: bool, vocab_columns: int | None
) -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(
            f"temperature must be a finite number > 0 (1.0 leaves the logits unchanged), "
            f"got {temperature!r}."
        )
    if not isinstance(temperature_squared, bool):
        raise ValueError(f"temperature_squared must be True or False, got {temperature_squared!r}.")
    if vocab_columns is not None:
        check_int("vocab_columns", vocab_columns, minimum=1)


def check_num_tokens(num_tokens: Tensor | int | None, reduction: str) -> None:
    if num_tokens is None:
        return
    if reduction != "mean":
        raise ValueError(
            f"num_tokens is only used with reduction='mean' (it is the divisor), but reduction="
            f"{reduction!r}; drop num_tokens or use reduction='mean'."
        )
    if isinstance(num_tokens, Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(
                f"num_tokens must be a one-element tensor (the count of non-ignored tokens), "
                f"got shape {tuple(num_tokens.shape)}."
            )
        return
    check_int("num_tokens", num_tokens, minimum=0)


def compared_vocab(student_vocab: int, teacher_vocab: int, vocab_columns: int | None) -> int:
    """How many leading vocabulary columns the divergence compares."""
    if vocab_columns is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student vocabulary size {student_vocab} differs from teacher vocabulary size "
                f"{teacher_vocab}. If the extra columns are padding, pass vocab_columns=N to "
                f"compare only the first N columns of both (N <= "
                f"{min(student_vocab, teacher_vocab)})."
            )
        return student_vocab
    if vocab_columns > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_columns={vocab_columns} exceeds the vocabulary sizes (student "
            f"{student_vocab}, teacher {teacher_vocab}); use at most "
            f"{min(student_vocab, teacher_vocab)}."
        )
    return vocab_columns
