"""Fused output projection + distillation loss: no logits tensor is ever materialised.

The chunked losses (:mod:`kdtune.losses.chunked`) receive the models' logits, ``[B, S, V]`` for
the student and the teacher. Here the loss receives the *hidden states* instead (the final-norm
output of each model, see :mod:`kdtune.training.lm_head`) and the output-projection weights, and
forms the logits one chunk of tokens at a time:

    for each chunk of rows of the flattened ``[B * S]`` tokens:
        student logits = h_chunk @ W_s.T (+ b)      one projection serves the KD and the CE term
        teacher logits = h_t_chunk @ W_t.T          (or rows of precomputed teacher logits)
        value, d(value)/d(student logits)           one fp32 call of ``chunk_value_and_grads``
        grad_h_chunk  = d_logits @ W_s               written into a ``[B * S, Ds]`` buffer
        grad_W       += d_logits.T @ h_chunk         fp32 accumulator, only for a trainable W
        grad_b       += d_logits.sum(0)

All gradients are formed in the forward, so after it only hidden-sized and weight-sized tensors
remain; backward multiplies them by the incoming scalar gradient. Peak memory is a handful of
fp32 ``[rows, V]`` chunk temporaries plus, for a trainable weight, the weight-sized gradient.

Contract (the same as the chunked family, so the two are interchangeable):

- ``loss = kd_ratio * kd + (1 - kd_ratio) * ce``. ``kd`` is the divergence of the
  temperature-softened distributions (times T² when ``temperature_squared``), summed over the
  tokens whose label is not ``ignore_index``; ``ce`` is the cross-entropy of the student's
  logits at temperature 1 over the same tokens. ``reduction="mean"`` divides both by
  ``num_tokens`` when given (the global count of non-ignored tokens across micro-batches and
  ranks), else by the local count, clamped to >= 1: an all-ignored batch gives an exact 0 that
  is still on the autograd graph. ``reduction="sum"`` returns the sums.
- ``vocab_columns=N`` compares only the first N columns of both vocabularies in the KD term
  (padding rows of an embedding); the CE term always uses the student's whole vocabulary.
- Masked (``-inf``) logits follow :mod:`kdtune.losses.divergences`.
- The teacher is a constant: no gradient flows to its hidden states, weight or logits.

Precision. fp32 and fp64 inputs are computed in their own dtype throughout. For bf16/fp16
inputs: the chunk's projections run in the input dtype (the matmul accumulates in fp32); their
output is produced directly in fp32 where the backend supports ``out_dtype`` (CUDA), else it is
rounded to the input dtype and upcast, which is exactly what a bf16 model head followed by
torchtune's chunked loss computes. The loss and its logit gradients are fp32; the weight
gradient is accumulated across chunks in fp32 (on CPU each chunk's contribution is an fp32
matmul; on CUDA a bf16 matmul with fp32 output) and cast to the weight's dtype once at the end;
the hidden-state gradient is a matmul in the input dtype.

Chunk size. ``chunk_size`` rows per chunk when given, else ``ceil(B * S / num_chunks)``. With
``chunk_size`` the peak memory does not grow with the sequence length, so prefer it for long
sequences: at V = 128,256 each fp32 ``[rows, V]`` temporary is ``rows * 0.5 MB`` and about eight
exist at a time (measured: 1.1 GB for ``chunk_size=256``), plus, for a trainable bf16 weight, the
fp32 weight-gradient accumulator (1 GB at 128,256 x 2048).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdtune.losses._kernel import chunk_value_and_grads
from kdtune.losses._options import (
    check_common_options,
    check_int,
    check_kd_options,
    check_num_tokens,
    compared_vocab,
)
from kdtune.losses.divergences import PerTokenDivergence, get_divergence

Reduction = Literal["mean", "sum"]


class FusedKDOutput(NamedTuple):
    """What :class:`FusedLinearKDLoss` returns; every field is a 0-dim fp32 tensor.

    Attributes:
        loss: ``kd_ratio * kd_loss + (1 - kd_ratio) * ce_loss``, differentiable.
        kd_loss: the distillation term alone, detached (for logging).
        ce_loss: the cross-entropy term alone, detached (for logging).
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor


# ------------------------------------------------------------------------------------------------
# Option and input validation


def _check_options(
    num_chunks: int,
    chunk_size: int | None,
    ignore_index: int,
    temperature: float,
    temperature_squared: bool,
    reduction: str,
    vocab_columns: int | None,
) -> None:
    check_int("num_chunks", num_chunks, minimum=1)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)
    check_common_options(ignore_index, reduction)
    check_kd_options(temperature, temperature_squared, vocab_columns)


def _check_kd_ratio(kd_ratio: float) -> None:
    if (
        isinstance(kd_ratio, bool)
        or not isinstance(kd_ratio, int | float)
        or not 0.0 <= kd_ratio <= 1.0
    ):
        raise ValueError(
            f"kd_ratio must be a number in [0, 1] (the weight of the KD term; the CE term gets "
            f"1 - kd_ratio), got {kd_ratio!r}."
        )


def _check_tensor(name: str, value: Any, dims: int, shape_text: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a Tensor of shape {shape_text}, got {type(value)}.")
    if value.dim() != dims:
        raise ValueError(f"{name} must have shape {shape_text}, got {tuple(value.shape)}.")
    return value


def _check_float(name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}.")


def _check_projection(
    prefix: str, hidden: Tensor, weight: Any, bias: Any
) -> tuple[Tensor, Tensor | None]:
    """``{prefix}_weight [V, D]`` (and ``{prefix}_bias [V]``) that fit ``{prefix}_hidden``."""
    weight = _check_tensor(f"{prefix}_weight", weight, 2, "[vocab, hidden]")
    if _is_dtensor(weight):
        raise ValueError(
            f"{prefix}_weight is a DTensor (an FSDP-sharded parameter); pass the unsharded "
            f"weight from kdtune.training.lm_head.output_projection(model) instead."
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight has shape {tuple(weight.shape)} but {prefix}_hidden has hidden "
            f"size {hidden.shape[-1]}; the weight must be [vocab, {hidden.shape[-1]}] (the "
            f"output projection's weight, not its transpose)."
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{prefix}_weight is {weight.dtype} but {prefix}_hidden is {hidden.dtype}; "
            f"the projection needs one dtype (cast one of them)."
        )
    if weight.device != hidden.device:
        raise ValueError(
            f"{prefix}_weight is on {weight.device} but {prefix}_hidden is on {hidden.device}."
        )
    if bias is not None:
        bias = _check_tensor(f"{prefix}_bias", bias, 1, "[vocab]")
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(
                f"{prefix}_bias must be [{weight.shape[0]}] in {weight.dtype} like "
                f"{prefix}_weight, got {tuple(bias.shape)} in {bias.dtype}."
            )
    return weight, bias


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    return isinstance(tensor, DTensor)


def _check_labels(labels: Any, batch: int, tokens: int) -> Tensor:
    labels = _check_tensor("labels", labels, 2, "[batch, tokens]")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}.")
    if tuple(labels.shape) != (batch, tokens):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but student_hidden covers "
            f"[{batch}, {tokens}]; labels must be [batch, tokens] for the same tokens."
        )
    return labels


# ------------------------------------------------------------------------------------------------
# Matmuls with fp32 results (see "Precision" in the module docstring)

_OUT_DTYPE_SUPPORT: dict[str, bool] = {}


def _supports_fp32_out_dtype(tensor: Tensor) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` works for this device and dtype."""
    if tensor.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = f"{tensor.device.type}:{tensor.dtype}"
    if key not in _OUT_DTYPE_SUPPORT:
        probe = torch.ones(2, 2, dtype=tensor.dtype, device=tensor.device)
        try:
            torch.mm(probe, probe, out_dtype=torch.float32)
            _OUT_DTYPE_SUPPORT[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _OUT_DTYPE_SUPPORT[key] = False
    return _OUT_DTYPE_SUPPORT[key]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs, the input's dtype for fp32/fp64 (never a downcast)."""
    return torch.promote_types(dtype, torch.float32)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden [n, D] @ weight[V, D].T + bias`` as an fp32 (fp64) ``[n, V]`` tensor."""
    if hidden.dtype in (torch.float32, torch.float64):
        if bias is None:
            return torch.mm(hidden, weight.t())
        return torch.addmm(bias, hidden, weight.t())
    if _supports_fp32_out_dtype(hidden):
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        return logits if bias is None else logits.add_(bias)
    # The model-head numerics: a matmul in the input dtype, then an upcast.
    if bias is None:
        return torch.mm(hidden, weight.t()).float()
    return torch.addmm(bias, hidden, weight.t()).float()


class _WeightGradAccumulator:
    """``sum over chunks of grad_logits.T @ hidden_chunk`` in fp32 (fp64), shape ``[V, D]``.

    The accumulator is weight-sized: for a bf16 weight it costs twice the final gradient, which
    is the price of fp32 accumulation across chunks.
    """

    # Rows of the accumulator updated per matmul when a bf16 matmul writes fp32 output: bounds
    # the temporary to ``_ROW_BLOCK * D * 4`` bytes where in-place fp32 accumulation is missing.
    _ROW_BLOCK = 8192

    def __init__(self, weight: Tensor) -> None:
        self.total = torch.zeros(
            weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device
        )
        self._lowp_out_fp32 = _supports_fp32_out_dtype(weight)

    def add(self, grad_logits: Tensor, grad_logits_lowp: Tensor, hidden: Tensor) -> None:
        """Add one chunk: ``grad_logits`` fp32 ``[n, V]`` (and its input-dtype copy), ``hidden [n, D]``."""
        if hidden.dtype == self.total.dtype:
            self.total.addmm_(grad_logits.t(), hidden)
        elif self._lowp_out_fp32:
            # CUDA: tensor-core matmul in the input dtype with fp32 output, added in row blocks.
            grad_t = grad_logits_lowp.t()
            for start in range(0, self.total.shape[0], self._ROW_BLOCK):
                block = slice(start, start + self._ROW_BLOCK)
                self.total[block].add_(torch.mm(grad_t[block], hidden, out_dtype=torch.float32))
        else:
            # CPU: an fp32 matmul (the upcast is only hidden-chunk sized) is exact and, without
            # bf16 matrix units, as fast as a bf16 one.
            self.total.addmm_(grad_logits.t(), hidden.to(self.total.dtype))

    def result(self, dtype: torch.dtype) -> Tensor:
        """The accumulated gradient cast to ``dtype`` once (no copy when it already is)."""
        return self.total.to(dtype)


# ------------------------------------------------------------------------------------------------
# Teacher logits, one chunk of rows at a time


@dataclass(frozen=True)
class _TeacherFromHidden:
    """Teacher logits projected per chunk from ``hidden [N, Dt]`` and ``weight [V_c, Dt]``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None

    def rows(self, start: int, stop: int) -> Tensor:
        return _logits(self.hidden[start:stop], self.weight, self.bias)


@dataclass(frozen=True)
class _TeacherFromLogits:
    """Rows of precomputed teacher ``logits [N, V_t]``, cut to the compared columns."""

    logits: Tensor
    columns: int

    def rows(self, start: int, stop: int) -> Tensor:
        return self.logits[start:stop, : self.columns]


_Teacher = _TeacherFromHidden | _TeacherFromLogits


# ------------------------------------------------------------------------------------------------
# One chunk's objective


@dataclass(frozen=True)
class _Objective:
    """How a chunk's fp32 logits become the scalar the gradients are taken of.

    ``kd_weight`` folds ``kd_ratio``, T² and the mean's divisor together, ``ce_weight`` folds
    ``1 - kd_ratio`` and the divisor; either may be a 0-dim tensor (a divisor from a tensor).
    """

    divergence: PerTokenDivergence
    temperature: float
    compared_columns: int
    kd_weight: Tensor | float
    ce_weight: Tensor | float


def _kd_per_token(objective: _Objective, student: Tensor, teacher: Tensor) -> Tensor:
    """The divergence of the softened distributions over the compared columns; ``[n]``."""
    if objective.compared_columns != student.shape[-1]:
        student = student[:, : objective.compared_columns]
    if objective.temperature != 1.0:
        student = student / objective.temperature
        teacher = teacher / objective.temperature
    return objective.divergence(student, teacher)


def _ce_per_token(student: Tensor, safe_labels: Tensor) -> Tensor:
    """``logsumexp(logits) - logits[label]`` per token at temperature 1; ``[n]``."""
    picked = student.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(student, dim=-1) - picked


def _chunk_objective(
    student: Tensor,
    teacher: Tensor,
    *,
    objective: _Objective,
    keep: Tensor,
    safe_labels: Tensor,
    sums: list[tuple[Tensor, Tensor]],
) -> Tensor:
    """``kd_weight * KD_sum + ce_weight * CE_sum`` over the kept rows of one chunk.

    ``student [n, V_s]`` and ``teacher [n, V_c]`` are fp32 (fp64); ``keep`` bool ``[n]``;
    ``safe_labels [n]`` hold a valid class at ignored rows. The raw sums are appended to
    ``sums`` (detached) for logging.
    """
    kd_sum = (_kd_per_token(objective, student, teacher) * keep).sum()
    ce_sum = (_ce_per_token(student, safe_labels) * keep).sum()
    sums.append((kd_sum.detach(), ce_sum.detach()))
    return kd_sum * objective.kd_weight + ce_sum * objective.ce_weight


# ------------------------------------------------------------------------------------------------
# The chunk loop


@dataclass
class _Grads:
    """Gradients formed in the forward (``None`` where not needed)."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def _chunk_bounds(rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows_per_chunk, rows)) for start in range(0, rows, rows_per_chunk)]


def _run_chunks(
    objective: _Objective,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: _Teacher,
    labels: Tensor,
    ignore_index: int,
    rows_per_chunk: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, _Grads]:
    """Loop over row chunks; returns ``(weighted_total, kd_sum, ce_sum, grads)``.

    ``hidden [N, Ds]``, ``weight [V_s, Ds]``, ``bias [V_s]``, ``labels [N]``; ``needs_grad``
    says which of hidden, weight and bias want a gradient (all False: values only).
    """
    needs_hidden, needs_weight, needs_bias = needs_grad
    compute_dtype = _compute_dtype(hidden.dtype)
    grad_hidden = torch.empty_like(hidden) if needs_hidden else None
    weight_grad = _WeightGradAccumulator(weight) if needs_weight else None
    grad_bias = (
        torch.zeros(weight.shape[0], dtype=compute_dtype, device=weight.device)
        if needs_bias
        else None
    )
    keep_all = labels != ignore_index
    safe_labels_all = torch.where(keep_all, labels, 0).long()

    totals: list[Tensor] = []
    sums: list[tuple[Tensor, Tensor]] = []
    for start, stop in _chunk_bounds(hidden.shape[0], rows_per_chunk):
        hidden_chunk = hidden[start:stop]
        chunk_objective = partial(
            _chunk_objective,
            objective=objective,
            keep=keep_all[start:stop],
            safe_labels=safe_labels_all[start:stop],
            sums=sums,
        )
        student_logits = _logits(hidden_chunk, weight, bias)
        teacher_logits = teacher.rows(start, stop)
        if not any(needs_grad):
            totals.append(chunk_objective(student_logits, teacher_logits.to(compute_dtype)))
            continue
        value, grad_logits, _ = chunk_value_and_grads(
            chunk_objective, student_logits, teacher_logits
        )
        totals.append(value)
        del student_logits, teacher_logits  # free the chunk's logits before the matmuls
        grad_logits_lowp = grad_logits.to(hidden.dtype)
        if grad_hidden is not None:
            torch.mm(grad_logits_lowp, weight, out=grad_hidden[start:stop])
        if weight_grad is not None:
            weight_grad.add(grad_logits, grad_logits_lowp, hidden_chunk)
        if grad_bias is not None:
            grad_bias += grad_logits.sum(dim=0)
        del grad_logits, grad_logits_lowp

    zero = torch.zeros((), dtype=compute_dtype, device=hidden.device)
    total = torch.stack(totals).sum() if totals else zero
    kd_sum = torch.stack([kd for kd, _ in sums]).sum() if sums else zero
    ce_sum = torch.stack([ce for _, ce in sums]).sum() if sums else zero
    grads = _Grads(
        hidden=grad_hidden,
        weight=weight_grad.result(weight.dtype) if weight_grad is not None else None,
        bias=grad_bias.to(weight.dtype) if grad_bias is not None else None,
    )
    return total, kd_sum, ce_sum, grads


@dataclass(frozen=True)
class _Plan:
    """Everything of one call that is not a differentiable tensor."""

    objective: _Objective
    teacher: _Teacher
    labels: Tensor
    ignore_index: int
    rows_per_chunk: int
    kd_scale: Tensor | float
    ce_scale: Tensor | float


def _scaled(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    """``grad * grad_output`` without a weight-sized copy when ``grad_output`` is 1."""
    if grad is None:
        return None
    if grad_output.numel() == 1 and bool(grad_output == 1):
        return grad
    # A 0-dim fp32 grad_output does not promote a bf16 gradient: the result keeps its dtype.
    return grad * grad_output


class _FusedLinearKD(torch.autograd.Function):
    """The fused loss; gradients for hidden, weight and bias are computed in the forward."""

    @staticmethod
    def forward(
        ctx: Any,
        plan: _Plan,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        needs_grad = (
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2],
            bias is not None and ctx.needs_input_grad[3],
        )
        total, kd_sum, ce_sum, grads = _run_chunks(
            plan.objective,
            hidden,
            weight,
            bias,
            plan.teacher,
            plan.labels,
            plan.ignore_index,
            plan.rows_per_chunk,
            needs_grad,
        )
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        kd_loss, ce_loss = kd_sum * plan.kd_scale, ce_sum * plan.ce_scale
        ctx.mark_non_differentiable(kd_loss, ce_loss)
        return total, kd_loss, ce_loss

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_loss: Tensor, _grad_kd: Tensor, _grad_ce: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            None,
            _scaled(grad_hidden, grad_loss),
            _scaled(grad_weight, grad_loss),
            _scaled(grad_bias, grad_loss),
        )


# ------------------------------------------------------------------------------------------------
# Public API


def _divisor_scale(
    labels: Tensor, ignore_index: int, reduction: str, num_tokens: Tensor | int | None, dtype
) -> Tensor | float:
    """``1 / count`` for ``"mean"`` (count clamped to >= 1), ``1`` for ``"sum"``."""
    if reduction == "sum":
        return 1.0
    if isinstance(num_tokens, int):
        return 1.0 / max(num_tokens, 1)
    count = (labels != ignore_index).sum() if num_tokens is None else num_tokens.reshape(())
    return 1.0 / count.to(device=labels.device, dtype=dtype).clamp(min=1)


def _teacher_source(
    student_hidden: Tensor,
    student_vocab: int,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_logits: Tensor | None,
    vocab_columns: int | None,
) -> tuple[_Teacher, int]:
    """Validate the teacher inputs; returns the row source and the compared column count."""
    batch, tokens = student_hidden.shape[:2]
    from_hidden = teacher_hidden is not None or teacher_weight is not None
    if from_hidden == (teacher_logits is not None):
        raise ValueError(
            "Pass either teacher_hidden and teacher_weight (the teacher's final-norm hidden "
            "states and output-projection weight) or teacher_logits, not both and not neither."
        )
    if teacher_logits is not None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias only applies with teacher_hidden; drop it.")
        logits = _check_tensor("teacher_logits", teacher_logits, 3, "[batch, tokens, vocab]")
        _check_float("teacher_logits", logits)
        if tuple(logits.shape[:2]) != (batch, tokens):
            raise ValueError(
                f"teacher_logits has shape {tuple(logits.shape)} but student_hidden covers "
                f"[{batch}, {tokens}]; both must cover the same tokens."
            )
        columns = compared_vocab(student_vocab, logits.shape[-1], vocab_columns)
        flat = logits.detach().reshape(-1, logits.shape[-1])
        return _TeacherFromLogits(flat, columns), columns
    if teacher_hidden is None or teacher_weight is None:
        missing = "teacher_weight" if teacher_hidden is not None else "teacher_hidden"
        raise ValueError(f"{missing} is missing: teacher_hidden and teacher_weight go together.")
    hidden = _check_tensor("teacher_hidden", teacher_hidden, 3, "[batch, tokens, hidden]")
    _check_float("teacher_hidden", hidden)
    if tuple(hidden.shape[:2]) != (batch, tokens):
        raise ValueError(
            f"teacher_hidden has shape {tuple(hidden.shape)} but student_hidden covers "
            f"[{batch}, {tokens}]; both must cover the same tokens."
        )
    weight, bias = _check_projection("teacher", hidden, teacher_weight, teacher_bias)
    columns = compared_vocab(student_vocab, weight.shape[0], vocab_columns)
    # Only the compared rows of the teacher's projection are ever needed.
    source = _TeacherFromHidden(
        hidden.detach().reshape(-1, hidden.shape[-1]),
        weight.detach()[:columns],
        bias.detach()[:columns] if bias is not None else None,
    )
    return source, columns


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    kd_ratio: float,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    num_tokens: Tensor | int | None = None,
    divergence: str = "forward_kl",
    divergence_params: dict[str, float] | None = None,
    num_chunks: int = 8,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    temperature_squared: bool = True,
    reduction: Reduction = "mean",
    vocab_columns: int | None = None,
) -> FusedKDOutput:
    """The fused KD + CE loss (functional form of :class:`FusedLinearKDLoss`).

    Args:
        student_hidden: ``[B, S, Ds]`` final-norm hidden states of the student.
        student_weight: ``[V_s, Ds]`` output-projection weight, same dtype as the hidden states.
            Frozen (``requires_grad=False``): no weight gradient is computed.
        labels: ``[B, S]`` integer labels in ``[0, V_s)`` or ``ignore_index``.
        kd_ratio: weight of the KD term in ``loss``, in [0, 1].
        teacher_hidden: ``[B, S, Dt]`` teacher hidden states, with ``teacher_weight [V_t, Dt]``
            (and optional ``teacher_bias [V_t]``); or instead
        teacher_logits: ``[B, S, V_t]`` precomputed teacher logits (any float dtype).
        student_bias: optional ``[V_s]`` bias of the student's projection.
        num_tokens: divisor for ``reduction="mean"`` (global non-ignored count); default: the
            local count.
        divergence, divergence_params: see :func:`kdtune.losses.divergences.get_divergence`.
        num_chunks: split the ``B * S`` rows into this many chunks (unless ``chunk_size``).
        chunk_size: rows per chunk; when given it overrides ``num_chunks``.
        ignore_index, temperature, temperature_squared, reduction, vocab_columns: as in the
            chunked family (:mod:`kdtune.losses.chunked`).

    Returns:
        :class:`FusedKDOutput` ``(loss, kd_loss, ce_loss)``, 0-dim fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: for a bad option, or shapes, dtypes or devices that do not fit together.
    """
    divergence_fn = get_divergence(divergence, **(divergence_params or {}))
    _check_options(
        num_chunks,
        chunk_size,
        ignore_index,
        temperature,
        temperature_squared,
        reduction,
        vocab_columns,
    )
    return _fused_loss(
        divergence_fn,
        student_hidden,
        student_weight,
        labels,
        kd_ratio=kd_ratio,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_logits=teacher_logits,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        num_tokens=num_tokens,
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        temperature=temperature,
        temperature_squared=temperature_squared,
        reduction=reduction,
        vocab_columns=vocab_columns,
    )


def _fused_loss(
    divergence: PerTokenDivergence,
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    kd_ratio: float,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_logits: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    num_tokens: Tensor | int | None,
    num_chunks: int,
    chunk_size: int | None,
    ignore_index: int,
    temperature: float,
    temperature_squared: bool,
    reduction: str,
    vocab_columns: int | None,
) -> FusedKDOutput:
    """:func:`fused_linear_kd_loss` with already validated options."""
    _check_kd_ratio(kd_ratio)
    check_num_tokens(num_tokens, reduction)
    hidden = _check_tensor("student_hidden", student_hidden, 3, "[batch, tokens, hidden]")
    _check_float("student_hidden", hidden)
    weight, bias = _check_projection("student", hidden, student_weight, student_bias)
    batch, tokens = hidden.shape[:2]
    labels = _check_labels(labels, batch, tokens)
    teacher, columns = _teacher_source(
        hidden,
        weight.shape[0],
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        vocab_columns,
    )

    compute_dtype = _compute_dtype(hidden.dtype)
    divisor = _divisor_scale(labels, ignore_index, reduction, num_tokens, compute_dtype)
    temperature_factor = float(temperature) ** 2 if temperature_squared else 1.0
    objective = _Objective(
        divergence=divergence,
        temperature=float(temperature),
        compared_columns=columns,
        kd_weight=kd_ratio * temperature_factor * divisor,
        ce_weight=(1.0 - kd_ratio) * divisor,
    )
    flat_rows = batch * tokens
    rows_per_chunk = chunk_size or max(1, math.ceil(flat_rows / num_chunks))
    plan = _Plan(
        objective=objective,
        teacher=teacher,
        labels=labels.reshape(-1),
        ignore_index=ignore_index,
        rows_per_chunk=rows_per_chunk,
        kd_scale=temperature_factor * divisor,
        ce_scale=divisor,
    )
    flat_hidden = hidden.reshape(flat_rows, hidden.shape[-1])
    loss, kd_loss, ce_loss = _FusedLinearKD.apply(plan, flat_hidden, weight, bias)
    return FusedKDOutput(loss, kd_loss, ce_loss)


class FusedLinearKDLoss(nn.Module):
    """Fused output projection + KD + CE loss over token chunks (see the module docstring).

    Args:
        divergence: a name from :data:`kdtune.losses.divergences.DIVERGENCES`.
        divergence_params: its parameters (``ratio``, ``beta`` or ``alpha``), each in [0, 1].
        num_chunks: split the ``B * S`` rows into this many chunks (unless ``chunk_size``).
        ignore_index: label value of positions that do not contribute.
        temperature: both logit sets are divided by it in the KD term (> 0).
        temperature_squared: multiply the KD term by ``temperature**2`` (Hinton).
        reduction: ``"mean"`` or ``"sum"``.
        vocab_columns: ``None``: vocabulary sizes must match; N: the KD term compares the first
            N columns.
        chunk_size: rows per chunk; when given it overrides ``num_chunks`` and makes the peak
            memory independent of ``B * S``.

    Attributes:
        divergence_name, divergence_params: as on the chunked family's classes.

    Example::

        loss_fn = FusedLinearKDLoss("forward_kl", chunk_size=256)
        student_h = forward_hidden(student, tokens)                     # [B, S, Ds]
        with torch.no_grad():
            teacher_h = forward_hidden(teacher, tokens)                 # [B, S, Dt]
        out = loss_fn(
            student_h, output_projection(student)[0], labels, kd_ratio=0.5,
            teacher_hidden=teacher_h, teacher_weight=output_projection(teacher)[0],
        )
        out.loss.backward()
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        divergence_params: dict[str, float] | None = None,
        num_chunks: int = 8,
        ignore_index: int = -100,
        *,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.divergence_name = divergence
        self.divergence_params: dict[str, float] = dict(divergence_params or {})
        self._divergence = get_divergence(divergence, **self.divergence_params)
        _check_options(
            num_chunks,
            chunk_size,
            ignore_index,
            temperature,
            temperature_squared,
            reduction,
            vocab_columns,
        )
        self.num_chunks = num_chunks
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.temperature_squared = temperature_squared
        self.reduction = reduction
        self.vocab_columns = vocab_columns

    @classmethod
    def from_chunked(
        cls, chunked_loss: nn.Module, *, chunk_size: int | None = None
    ) -> FusedLinearKDLoss:
        """The fused loss with the divergence and options of a chunked KD loss module.

        Accepts the kdtune chunked family (anything exposing ``divergence_name`` and
        ``divergence_params``; its ``num_output_chunks`` becomes ``num_chunks``) and torchtune's
        ``ForwardKL``/``ReverseKL``/``SymmetricKLWithChunkedOutputLoss`` (whose values include
        the teacher entropy where ours return the true divergence; gradients agree).
        """
        name, params = _divergence_of(chunked_loss)
        return cls(
            name,
            params,
            getattr(chunked_loss, "num_output_chunks", 8),
            getattr(chunked_loss, "ignore_index", -100),
            temperature=getattr(chunked_loss, "temperature", 1.0),
            temperature_squared=getattr(chunked_loss, "temperature_squared", True),
            reduction=getattr(chunked_loss, "reduction", "mean"),
            vocab_columns=getattr(chunked_loss, "vocab_columns", None),
            chunk_size=chunk_size,
        )

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        labels: Tensor,
        *,
        kd_ratio: float,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_tokens: Tensor | int | None = None,
    ) -> FusedKDOutput:
        """``(loss, kd_loss, ce_loss)``; argument shapes as in :func:`fused_linear_kd_loss`."""
        return _fused_loss(
            self._divergence,
            student_hidden,
            student_weight,
            labels,
            kd_ratio=kd_ratio,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_logits=teacher_logits,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            num_tokens=num_tokens,
            num_chunks=self.num_chunks,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            temperature_squared=self.temperature_squared,
            reduction=self.reduction,
            vocab_columns=self.vocab_columns,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence_name!r}, divergence_params={self.divergence_params}, "
            f"num_chunks={self.num_chunks}, chunk_size={self.chunk_size}, "
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"temperature_squared={self.temperature_squared}, reduction={self.reduction!r}, "
            f"vocab_columns={self.vocab_columns}"
        )


def _torchtune_divergences() -> list[tuple[type, Callable[[Any], tuple[str, dict]]]]:
    from torchtune.modules.loss import (
        ForwardKLWithChunkedOutputLoss,
        ReverseKLWithChunkedOutputLoss,
        SymmetricKLWithChunkedOutputLoss,
    )

    return [
        (ForwardKLWithChunkedOutputLoss, lambda _: ("forward_kl", {})),
        (ReverseKLWithChunkedOutputLoss, lambda _: ("reverse_kl", {})),
        (
            SymmetricKLWithChunkedOutputLoss,
            lambda loss: ("symmetric_kl", {"ratio": float(loss.sym_kd_ratio)}),
        ),
    ]


def _divergence_of(chunked_loss: Any) -> tuple[str, dict[str, float]]:
    """``(divergence name, params)`` of a kdtune or torchtune chunked KD loss module."""
    if hasattr(chunked_loss, "divergence_name"):
        return chunked_loss.divergence_name, dict(getattr(chunked_loss, "divergence_params", {}))
    for torchtune_class, describe in _torchtune_divergences():
        if isinstance(chunked_loss, torchtune_class):
            return describe(chunked_loss)
    raise ValueError(
        f"from_chunked needs a kdtune chunked KD loss (with divergence_name) or torchtune's "
        f"ForwardKL/ReverseKL/SymmetricKLWithChunkedOutputLoss, got {type(chunked_loss).__name__}."
    )
