"""Held-out metrics: student CE and perplexity, KL to the teacher, top-1 agreement.

Computed from final hidden states and the output weights one sequence chunk at a time, only at
positions with a target, so no ``[B, S, V]`` logits tensor exists. Sums are accumulated in fp64
and all-reduced before dividing, so the numbers are exact token means over all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.losses.divergences import forward_kl
from kdtune.training.data import Batch, batch_to_device, shift_labels
from kdtune.training.lm_head import forward_hidden, output_projection, release_output_projection
from kdtune.training.process_group import all_reduce_sum
from kdtune.training.runtime import Runtime


@dataclass(frozen=True)
class ValidationMetrics:
    """Token means over the held-out data (teacher metrics are None without a teacher)."""

    ce: float
    perplexity: float
    kl_to_teacher: float | None
    top1_agreement: float | None
    num_tokens: int


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[N, D] -> [N, V]`` in fp32."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


@torch.no_grad()
def validate(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[Batch],
    *,
    runtime: Runtime,
    ignore_index: int,
    num_chunks: int,
    vocab_columns: int | None,
    max_batches: int | None,
) -> ValidationMetrics:
    """Evaluate the student (in eval mode; its previous mode is restored) on ``batches``.

    Args:
        student, teacher: torchtune decoders (teacher None: CE and perplexity only).
        batches: ``{"tokens": [B, S], "labels": [B, S]}`` batches (labels not yet shifted).
        runtime: the device (sums are all-reduced over ranks; every rank must run the same
            number of batches, which the loader guarantees by padding the dataset to a
            multiple of the rank count).
        ignore_index: label value without a target.
        num_chunks: sequence chunks per batch (bounds the size of the logits in memory).
        vocab_columns: compare only the first N vocabulary columns (KL, agreement); None: all.
        max_batches: stop after this many batches (None: all).
    """
    was_training = student.training
    student.eval()
    # ce_sum, kl_sum, agree_sum, count
    sums = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        batch = batch_to_device(batch, runtime.device)
        labels = shift_labels(batch["labels"], ignore_index)
        sums += _batch_sums(
            student, teacher, batch["tokens"], labels, ignore_index, num_chunks, vocab_columns
        )
    student.train(was_training)
    sums = all_reduce_sum(sums)
    count = max(int(sums[3].item()), 1)
    ce = sums[0].item() / count
    return ValidationMetrics(
        ce=ce,
        perplexity=math.exp(ce) if ce < 700 else math.inf,
        kl_to_teacher=sums[1].item() / count if teacher is not None else None,
        top1_agreement=sums[2].item() / count if teacher is not None else None,
        num_tokens=int(sums[3].item()),
    )


def _batch_sums(
    student: nn.Module,
    teacher: nn.Module | None,
    tokens: Tensor,
    labels: Tensor,
    ignore_index: int,
    num_chunks: int,
    vocab_columns: int | None,
) -> Tensor:
    """``[ce_sum, kl_sum, agreement_count, token_count]`` of one batch (fp64)."""
    sums = torch.zeros(4, dtype=torch.float64, device=tokens.device)
    student_hidden = forward_hidden(student, tokens)  # [B, S, D_s]
    student_weight, student_bias = output_projection(student)
    teacher_hidden = teacher_weight = teacher_bias = None
    if teacher is not None:
        teacher_hidden = forward_hidden(teacher, tokens)  # [B, S, D_t]
        teacher_weight, teacher_bias = output_projection(teacher)
    keep = labels != ignore_index  # [B, S]
    for chunk in range(num_chunks):
        # Positions of this chunk of the sequence that have a target.
        rows = keep.tensor_split(num_chunks, dim=1)[chunk]
        if not rows.any():
            continue
        targets = labels.tensor_split(num_chunks, dim=1)[chunk][rows]  # [N]
        hidden = student_hidden.tensor_split(num_chunks, dim=1)[chunk][rows]  # [N, D_s]
        student_logits = _logits(hidden, student_weight, student_bias)  # [N, V_s]
        sums[0] += F.cross_entropy(student_logits, targets, reduction="sum").double()
        sums[3] += targets.numel()
        if teacher is None:
            continue
        hidden_t = teacher_hidden.tensor_split(num_chunks, dim=1)[chunk][rows]
        teacher_logits = _logits(hidden_t, teacher_weight, teacher_bias)  # [N, V_t]
        columns = vocab_columns or student_logits.shape[-1]
        student_logits, teacher_logits = student_logits[:, :columns], teacher_logits[:, :columns]
        sums[1] += forward_kl(student_logits, teacher_logits).sum().double()
        sums[2] += (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum().double()
    # No backward follows: reshard what output_projection unsharded (no-op without FSDP2).
    release_output_projection(student)
    if teacher is not None:
        release_output_projection(teacher)
    return sums
