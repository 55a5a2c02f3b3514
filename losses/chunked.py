"""The chunked knowledge-distillation losses: torchtune's contract, true divergence values.

A model whose output head is in chunked mode (``model.set_num_output_chunks(n)``) returns its
logits as a list of chunks ``[B, S_i, V]`` in the model dtype, split along the tokens. The losses
here take those lists (or one plain ``[B, S, V]`` tensor, which is one chunk) and labels
``[B, S]``, upcast one chunk at a time to fp32, skip the positions whose label is
``ignore_index``, and return a scalar.

Contract (shared with :mod:`kdtune.losses.fused`):

- Every chunk contributes a per-token *sum*. ``reduction="mean"`` divides the total by
  ``num_tokens`` when the caller gives it (the global count of non-ignored tokens across
  micro-batches and ranks) and otherwise by the local count of non-ignored labels; a count
  below 1 is treated as 1, so an all-ignored batch returns an exact 0 that is still on the
  autograd graph (no Python branch on tensor values, so ``torch.compile`` traces it).
  ``reduction="sum"`` returns the total itself.
- ``temperature`` T divides both logit sets; with ``temperature_squared=True`` the per-token
  divergence is multiplied by T² (Hinton et al., 2015), which keeps the gradient magnitude
  independent of T.
- Labels are split with the lengths of the chunks actually received, so the chunk boundaries of
  logits and labels always agree (``torch.chunk`` and ``torch.tensor_split`` chunks, uneven or
  empty ones included).
- Student and teacher vocabulary sizes must match unless ``vocab_columns=N`` is given, which
  compares only the first N columns of both (for a model whose embedding is padded beyond the
  tokenizer, e.g. Qwen2.5-7B's 152,064 rows against 151,936; only correct when the columns past
  N are padding that no label uses).
- Masked vocabulary follows :mod:`kdtune.losses.divergences`: a column that is ``-inf`` in both
  models contributes 0; a column whose exact contribution would be infinite (forward KL: the
  student masks a column the teacher puts mass on; reverse KL: the other way round) is dropped
  from the sum, so the loss and its gradient stay finite. Every row must hold at least one
  finite logit; ``+inf`` and NaN logits are not supported.

Values. These losses return the divergence itself: zero when the student equals the teacher.
torchtune's ``ForwardKLWithChunkedOutputLoss`` returns the teacher-student cross-entropy
``-sum_v p_v log q_v``, which is the forward KL plus the teacher's entropy; the gradient with
respect to the student is the same (the entropy does not depend on the student), so training
is unchanged and only the logged number differs. torchtune's reverse KL already returns the
true KL; its symmetric KL differs from ours by ``sym_kd_ratio`` times the teacher entropy.

Memory. Each chunk's loss and gradients are computed eagerly in fp32 inside an autograd
``Function`` (:func:`kdtune.losses._kernel.chunk_value_and_grads`); only the gradient, in the
chunk's own dtype and shape, is kept for backward. No fp32 copy of more than one chunk exists at
a time and no softmax intermediates are kept between forward and backward. Double backward
(gradients of gradients) is not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdtune.losses._kernel import chunk_value_and_grads, upcast
from kdtune.losses._options import (
    check_common_options,
    check_kd_options,
    check_num_tokens,
    compared_vocab,
)
from kdtune.losses.divergences import PerTokenDivergence, get_divergence

Reduction = Literal["mean", "sum"]
Logits = Sequence[Tensor] | Tensor
PerTokenLoss = Callable[[Tensor, Tensor], Tensor]
"""``(student [N, V], teacher [N, V] or a placeholder) -> [N]`` on upcast logits."""


# ------------------------------------------------------------------------------------------------
# Option validation (raised at construction time by the modules, at call time by the functions)


# ------------------------------------------------------------------------------------------------
# Input validation and splitting


def _as_chunks(logits: Logits, name: str) -> list[Tensor]:
    """The chunk list for ``logits``: a plain ``[B, S, V]`` tensor is one chunk."""
    chunks = [logits] if isinstance(logits, Tensor) else list(logits)
    if not chunks:
        raise ValueError(f"{name} is an empty list; expected at least one [B, S_i, V] chunk.")
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, Tensor):
            raise ValueError(f"{name}[{i}] must be a Tensor, got {type(chunk).__name__}.")
        if chunk.dim() != 3:
            raise ValueError(
                f"{name}[{i}] must have shape [batch, tokens, vocab], got shape "
                f"{tuple(chunk.shape)}."
            )
        if not chunk.is_floating_point():
            raise ValueError(f"{name}[{i}] must be a floating-point tensor, got {chunk.dtype}.")
    first = chunks[0]
    for i, chunk in enumerate(chunks[1:], start=1):
        if chunk.shape[0] != first.shape[0] or chunk.shape[2] != first.shape[2]:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(chunk.shape)} but {name}[0] has shape "
                f"{tuple(first.shape)}; all chunks must share the batch and vocabulary sizes."
            )
    return chunks


def _check_chunk_count(count: int, num_output_chunks: int, name: str) -> None:
    """At most ``num_output_chunks`` chunks: ``torch.chunk`` returns fewer for short sequences."""
    if count > num_output_chunks:
        raise ValueError(
            f"{name} has {count} chunks but the loss was built with num_output_chunks="
            f"{num_output_chunks}; configure the model with "
            f"model.set_num_output_chunks({num_output_chunks}) or build the loss with "
            f"num_output_chunks={count}."
        )


def _check_pairs(student_chunks: list[Tensor], teacher_chunks: list[Tensor]) -> None:
    """Same number of chunks, and each student/teacher pair covers the same ``[B, S_i]``."""
    if len(student_chunks) != len(teacher_chunks):
        raise ValueError(
            f"student_logits has {len(student_chunks)} chunks but teacher_logits has "
            f"{len(teacher_chunks)}; both models must use the same num_output_chunks."
        )
    for i, (student, teacher) in enumerate(zip(student_chunks, teacher_chunks)):
        if student.shape[:2] != teacher.shape[:2]:
            raise ValueError(
                f"student_logits[{i}] has shape {tuple(student.shape)} but teacher_logits[{i}] "
                f"has shape {tuple(teacher.shape)}; each chunk pair must cover the same "
                f"[batch, tokens]."
            )


def _split_labels(labels: Tensor, chunks: list[Tensor]) -> tuple[Tensor, ...]:
    """``labels [B, S]`` split into ``[B, S_i]`` pieces with the lengths of the chunks received."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a Tensor of shape [batch, tokens], got {type(labels)}.")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [batch, tokens], got {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}.")
    lengths = [chunk.shape[1] for chunk in chunks]
    batch = chunks[0].shape[0]
    if labels.shape[0] != batch or labels.shape[1] != sum(lengths):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but the logit chunks cover "
            f"[{batch}, {sum(lengths)}] (chunk lengths {lengths}); labels must be "
            f"[batch, tokens] for the same tokens as the logits."
        )
    return torch.split(labels, lengths, dim=1)


# ------------------------------------------------------------------------------------------------
# One chunk


class _ChunkSum(torch.autograd.Function):
    """Sum over one chunk of ``per_token_loss`` at the kept tokens, times ``scale``.

    The forward computes the value and the gradients at once in fp32
    (:func:`chunk_value_and_grads`) and keeps only the gradients, cast to the dtype of the
    logits they belong to, so backward is a multiplication by the incoming scalar gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        per_token_loss: PerTokenLoss,
        keep: Tensor,
        scale: float,
        student: Tensor,
        teacher: Tensor,
    ) -> Tensor:
        chunk_loss = partial(_kept_sum, per_token_loss=per_token_loss, keep=keep, scale=scale)
        student_needs_grad, teacher_needs_grad = ctx.needs_input_grad[3:5]
        value, grad_student, grad_teacher = chunk_value_and_grads(
            chunk_loss, student, teacher, teacher_needs_grad=teacher_needs_grad
        )
        ctx.save_for_backward(
            grad_student.to(student.dtype) if student_needs_grad else None,
            grad_teacher.to(teacher.dtype) if grad_teacher is not None else None,
        )
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        # A 0-dim fp32 grad_output does not promote a bf16 gradient: the results stay bf16.
        grad_student, grad_teacher = (
            None if grad is None else grad * grad_output for grad in ctx.saved_tensors
        )
        return None, None, None, grad_student, grad_teacher


def _kept_sum(
    student: Tensor, teacher: Tensor, *, per_token_loss: PerTokenLoss, keep: Tensor, scale: float
) -> Tensor:
    """``scale * sum_n keep_n * loss_n`` for upcast ``[N, V]`` logits; a scalar."""
    return (per_token_loss(student, teacher) * keep).sum() * scale


def _chunk_sum(
    per_token_loss: PerTokenLoss, keep: Tensor, scale: float, student: Tensor, teacher: Tensor
) -> Tensor:
    """One chunk's contribution; ``student``/``teacher`` ``[N, V]``, ``keep`` bool ``[N]``.

    Without autograd (evaluation, ``torch.no_grad``) only the value is computed.
    """
    if torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad):
        return _ChunkSum.apply(per_token_loss, keep, scale, student, teacher)
    with torch.no_grad():
        return _kept_sum(
            upcast(student), upcast(teacher), per_token_loss=per_token_loss, keep=keep, scale=scale
        )


def _tempered(
    student: Tensor, teacher: Tensor, *, divergence: PerTokenDivergence, temperature: float
) -> Tensor:
    """The divergence of the temperature-softened distributions; ``[N, V]`` -> ``[N]``."""
    return divergence(student / temperature, teacher / temperature)


def _cross_entropy_per_token(logits: Tensor, _placeholder: Tensor, *, labels: Tensor) -> Tensor:
    """``logsumexp(logits) - logits[label]`` per token; ``[N, V]`` and ``labels [N]`` -> ``[N]``.

    ``labels`` must already hold a valid class at ignored positions (they are masked later).
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - picked


# ------------------------------------------------------------------------------------------------
# Reduction


def _reduce(
    total: Tensor,
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    num_tokens: Tensor | int | None,
) -> Tensor:
    """Apply the reduction to the summed loss (see the module docstring)."""
    if reduction == "sum":
        return total
    if num_tokens is None:
        count = (labels != ignore_index).sum()
    elif isinstance(num_tokens, Tensor):
        count = num_tokens.reshape(())
    else:
        return total / max(num_tokens, 1)
    # Clamping instead of branching: an all-ignored batch has total == 0 exactly, so 0 / 1.
    return total / count.to(device=total.device, dtype=total.dtype).clamp(min=1)


# ------------------------------------------------------------------------------------------------
# Functional forms


def _distillation_loss(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: Tensor,
    divergence: PerTokenDivergence,
    *,
    ignore_index: int,
    temperature: float,
    temperature_squared: bool,
    reduction: str,
    num_tokens: Tensor | int | None,
    vocab_columns: int | None,
    num_output_chunks: int | None = None,
) -> Tensor:
    """The chunked KD loss with already validated options; see :func:`kd_loss`."""
    check_num_tokens(num_tokens, reduction)
    student_chunks = _as_chunks(student_logits, "student_logits")
    teacher_chunks = _as_chunks(teacher_logits, "teacher_logits")
    if num_output_chunks is not None:
        _check_chunk_count(len(student_chunks), num_output_chunks, "student_logits")
    _check_pairs(student_chunks, teacher_chunks)
    vocab = compared_vocab(student_chunks[0].shape[-1], teacher_chunks[0].shape[-1], vocab_columns)
    label_chunks = _split_labels(labels, student_chunks)

    per_token: PerTokenLoss = divergence
    if temperature != 1.0:
        per_token = partial(_tempered, divergence=divergence, temperature=temperature)
    scale = float(temperature) ** 2 if temperature_squared else 1.0

    sums = [
        _chunk_sum(
            per_token,
            label_chunk.reshape(-1) != ignore_index,
            scale,
            student[..., :vocab].reshape(-1, vocab),
            teacher[..., :vocab].reshape(-1, vocab),
        )
        for student, teacher, label_chunk in zip(student_chunks, teacher_chunks, label_chunks)
    ]
    total = torch.stack(sums).sum()
    return _reduce(total, labels, ignore_index, reduction, num_tokens)


def kd_loss(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    divergence_params: dict[str, float] | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    temperature_squared: bool = True,
    reduction: Reduction = "mean",
    num_tokens: Tensor | int | None = None,
    vocab_columns: int | None = None,
) -> Tensor:
    """Distillation loss between chunked student and teacher logits (functional form).

    Args:
        student_logits: list of ``[B, S_i, V_s]`` chunks (any float dtype; the model's chunked
            output), or one ``[B, S, V_s]`` tensor.
        teacher_logits: the teacher's chunks ``[B, S_i, V_t]``, same count and ``[B, S_i]``.
        labels: ``[B, S]`` integer labels, ``S = sum_i S_i``; ``ignore_index`` marks skipped
            positions.
        divergence: a name from :data:`kdtune.losses.divergences.DIVERGENCES`.
        divergence_params: its parameters, e.g. ``{"beta": 0.5}`` for ``"jsd"``.
        ignore_index: label value of positions that do not contribute.
        temperature: both logit sets are divided by it (> 0).
        temperature_squared: multiply the divergence by ``temperature**2``.
        reduction: ``"mean"`` (divide by ``num_tokens`` or the local non-ignored count) or
            ``"sum"``.
        num_tokens: divisor for ``"mean"``, e.g. the global count of non-ignored tokens.
        vocab_columns: ``None`` (vocabulary sizes must match) or N (compare the first N columns).

    Returns:
        A 0-dim tensor: fp32 (fp64 for fp64 logits).

    Raises:
        ValueError: for a bad option, or logits/labels whose chunk count, shapes or vocabulary
            sizes disagree.
    """
    divergence_fn = get_divergence(divergence, **(divergence_params or {}))
    check_common_options(ignore_index, reduction)
    check_kd_options(temperature, temperature_squared, vocab_columns)
    return _distillation_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence_fn,
        ignore_index=ignore_index,
        temperature=temperature,
        temperature_squared=temperature_squared,
        reduction=reduction,
        num_tokens=num_tokens,
        vocab_columns=vocab_columns,
    )


def forward_kl_loss(
    student_logits: Logits, teacher_logits: Logits, labels: Tensor, **options: Any
) -> Tensor:
    """:func:`kd_loss` with KL(teacher || student); ``options`` as in :func:`kd_loss`."""
    return kd_loss(student_logits, teacher_logits, labels, divergence="forward_kl", **options)


def reverse_kl_loss(
    student_logits: Logits, teacher_logits: Logits, labels: Tensor, **options: Any
) -> Tensor:
    """:func:`kd_loss` with KL(student || teacher); ``options`` as in :func:`kd_loss`."""
    return kd_loss(student_logits, teacher_logits, labels, divergence="reverse_kl", **options)


def symmetric_kl_loss(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: Tensor,
    *,
    ratio: float = 0.5,
    **options: Any,
) -> Tensor:
    """:func:`kd_loss` with ``ratio * forward KL + (1 - ratio) * reverse KL``."""
    return kd_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence="symmetric_kl",
        divergence_params={"ratio": ratio},
        **options,
    )


def jsd_loss(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: Tensor,
    *,
    beta: float = 0.5,
    **options: Any,
) -> Tensor:
    """:func:`kd_loss` with the generalised Jensen-Shannon divergence (0: forward, 1: reverse)."""
    return kd_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence="jsd",
        divergence_params={"beta": beta},
        **options,
    )


def skew_forward_kl_loss(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: Tensor,
    *,
    alpha: float = 0.1,
    **options: Any,
) -> Tensor:
    """:func:`kd_loss` with ``KL(p || alpha * p + (1 - alpha) * q)`` (DistiLLM)."""
    return kd_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence="skew_forward_kl",
        divergence_params={"alpha": alpha},
        **options,
    )


def skew_reverse_kl_loss(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: Tensor,
    *,
    alpha: float = 0.1,
    **options: Any,
) -> Tensor:
    """:func:`kd_loss` with ``KL(q || alpha * q + (1 - alpha) * p)`` (DistiLLM)."""
    return kd_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence="skew_reverse_kl",
        divergence_params={"alpha": alpha},
        **options,
    )


def tvd_loss(
    student_logits: Logits, teacher_logits: Logits, labels: Tensor, **options: Any
) -> Tensor:
    """:func:`kd_loss` with the total variation distance; ``options`` as in :func:`kd_loss`."""
    return kd_loss(student_logits, teacher_logits, labels, divergence="total_variation", **options)


def _cross_entropy_loss(
    logits: Logits,
    labels: Tensor,
    *,
    ignore_index: int,
    reduction: str,
    num_tokens: Tensor | int | None,
    num_output_chunks: int | None = None,
) -> Tensor:
    """The chunked cross-entropy with already validated options; see :func:`ce_loss`."""
    check_num_tokens(num_tokens, reduction)
    chunks = _as_chunks(logits, "logits")
    if num_output_chunks is not None:
        _check_chunk_count(len(chunks), num_output_chunks, "logits")
    label_chunks = _split_labels(labels, chunks)
    sums = []
    for chunk, label_chunk in zip(chunks, label_chunks):
        flat_logits = chunk.reshape(-1, chunk.shape[-1])
        flat_labels = label_chunk.reshape(-1)
        keep = flat_labels != ignore_index
        per_token = partial(
            _cross_entropy_per_token, labels=torch.where(keep, flat_labels, 0).long()
        )
        # No teacher here: a detached zero-column view stands in for it (upcasting it is free).
        placeholder = flat_logits.detach()[:, :0]
        sums.append(_chunk_sum(per_token, keep, 1.0, flat_logits, placeholder))
    total = torch.stack(sums).sum()
    return _reduce(total, labels, ignore_index, reduction, num_tokens)


def ce_loss(
    logits: Logits,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_tokens: Tensor | int | None = None,
) -> Tensor:
    """Cross-entropy over chunked logits with the same chunking and reduction contract.

    Args:
        logits: list of ``[B, S_i, V]`` chunks or one ``[B, S, V]`` tensor.
        labels: ``[B, S]`` integer labels in ``[0, V)`` or ``ignore_index``.
        ignore_index, reduction, num_tokens: as in :func:`kd_loss`.

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 logits).
    """
    check_common_options(ignore_index, reduction)
    return _cross_entropy_loss(
        logits, labels, ignore_index=ignore_index, reduction=reduction, num_tokens=num_tokens
    )


# ------------------------------------------------------------------------------------------------
# Modules


class ChunkedKDLoss(nn.Module):
    """Chunked distillation loss for any divergence of :mod:`kdtune.losses.divergences`.

    The named classes below fix ``divergence``; this one is handy in a config, e.g.
    ``_component_: kdtune.losses.ChunkedKDLoss``, ``divergence: jsd``,
    ``divergence_params: {beta: 0.5}``.

    Args:
        divergence: the divergence name (``forward_kl``, ``reverse_kl``, ``symmetric_kl``,
            ``jsd``, ``skew_forward_kl``, ``skew_reverse_kl``, ``total_variation``).
        divergence_params: its parameters (``ratio``, ``beta`` or ``alpha``), each in [0, 1].
        num_output_chunks: the chunk count the model's output head is set to
            (``model.set_num_output_chunks``). A forward receiving more chunks raises
            ``ValueError``; fewer are accepted, since ``torch.chunk`` returns fewer for short
            sequences. A plain tensor is always accepted.
        ignore_index: label value of positions that do not contribute.
        temperature: both logit sets are divided by it (> 0).
        temperature_squared: multiply the divergence by ``temperature**2`` (Hinton).
        reduction: ``"mean"`` or ``"sum"`` (see :mod:`kdtune.losses.chunked`).
        vocab_columns: ``None``: vocabulary sizes must match; N: compare the first N columns.

    Attributes:
        divergence_name, divergence_params: what :class:`kdtune.losses.fused.FusedLinearKDLoss`
            and the recipe use to build the same divergence.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        divergence_params: dict[str, float] | None = None,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        *,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
    ) -> None:
        super().__init__()
        self.divergence_name = divergence
        self.divergence_params: dict[str, float] = dict(divergence_params or {})
        self._divergence = get_divergence(divergence, **self.divergence_params)
        check_common_options(ignore_index, reduction, num_output_chunks)
        check_kd_options(temperature, temperature_squared, vocab_columns)
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.temperature_squared = temperature_squared
        self.reduction = reduction
        self.vocab_columns = vocab_columns

    def forward(
        self,
        student_logits: Logits,
        teacher_logits: Logits,
        labels: Tensor,
        num_tokens: Tensor | int | None = None,
    ) -> Tensor:
        """The loss, a 0-dim fp32 tensor (fp64 for fp64 logits).

        Args:
            student_logits: list of ``[B, S_i, V_s]`` chunks, or one ``[B, S, V_s]`` tensor.
            teacher_logits: list of ``[B, S_i, V_t]`` chunks (same count and ``[B, S_i]``), or
                one tensor.
            labels: ``[B, S]`` with ``S = sum_i S_i``.
            num_tokens: divisor for ``reduction="mean"`` (global non-ignored token count);
                default: the local count.
        """
        return _distillation_loss(
            student_logits,
            teacher_logits,
            labels,
            self._divergence,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            temperature_squared=self.temperature_squared,
            reduction=self.reduction,
            num_tokens=num_tokens,
            vocab_columns=self.vocab_columns,
            num_output_chunks=self.num_output_chunks,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence_name!r}, divergence_params={self.divergence_params}, "
            f"num_output_chunks={self.num_output_chunks}, ignore_index={self.ignore_index}, "
            f"temperature={self.temperature}, temperature_squared={self.temperature_squared}, "
            f"reduction={self.reduction!r}, vocab_columns={self.vocab_columns}"
        )


class ForwardKLWithChunkedOutputLoss(ChunkedKDLoss):
    """KL(teacher || student) per non-ignored token; drop-in for torchtune's class.

    Same constructor and forward contract as
    ``torchtune.modules.loss.ForwardKLWithChunkedOutputLoss``, and the same gradients; the value
    is the true KL (0 when the student equals the teacher), which is torchtune's value minus
    the mean teacher entropy. Options and shapes as in :class:`ChunkedKDLoss`.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        *,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
    ) -> None:
        super().__init__(
            "forward_kl",
            None,
            num_output_chunks,
            ignore_index,
            temperature=temperature,
            temperature_squared=temperature_squared,
            reduction=reduction,
            vocab_columns=vocab_columns,
        )


class ReverseKLWithChunkedOutputLoss(ChunkedKDLoss):
    """KL(student || teacher) per non-ignored token; drop-in for torchtune's class.

    torchtune's reverse KL already returns this value; ours also returns 0 (not NaN) for an
    all-ignored batch and has no NaN gradient where the teacher masks a column.
    Options and shapes as in :class:`ChunkedKDLoss`.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        *,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
    ) -> None:
        super().__init__(
            "reverse_kl",
            None,
            num_output_chunks,
            ignore_index,
            temperature=temperature,
            temperature_squared=temperature_squared,
            reduction=reduction,
            vocab_columns=vocab_columns,
        )


class SymmetricKLWithChunkedOutputLoss(ChunkedKDLoss):
    """``sym_kd_ratio * KL(p || q) + (1 - sym_kd_ratio) * KL(q || p)``; drop-in for torchtune's.

    Positional order follows torchtune: ``(num_output_chunks, sym_kd_ratio, ignore_index)``.
    torchtune's value is larger by ``sym_kd_ratio`` times the mean teacher entropy.
    Options and shapes as in :class:`ChunkedKDLoss`.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        sym_kd_ratio: float = 0.5,
        ignore_index: int = -100,
        *,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
    ) -> None:
        super().__init__(
            "symmetric_kl",
            {"ratio": sym_kd_ratio},
            num_output_chunks,
            ignore_index,
            temperature=temperature,
            temperature_squared=temperature_squared,
            reduction=reduction,
            vocab_columns=vocab_columns,
        )
        self.sym_kd_ratio = sym_kd_ratio


class JSDWithChunkedOutputLoss(ChunkedKDLoss):
    """Generalised Jensen-Shannon divergence; ``beta=0`` is forward KL, ``beta=1`` reverse KL.

    See :func:`kdtune.losses.divergences.jsd`. Options and shapes as in :class:`ChunkedKDLoss`.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
    ) -> None:
        super().__init__(
            "jsd",
            {"beta": beta},
            num_output_chunks,
            ignore_index,
            temperature=temperature,
            temperature_squared=temperature_squared,
            reduction=reduction,
            vocab_columns=vocab_columns,
        )


class SkewForwardKLWithChunkedOutputLoss(ChunkedKDLoss):
    """Skew forward KL ``KL(p || alpha * p + (1 - alpha) * q)`` (DistiLLM).

    See :func:`kdtune.losses.divergences.skew_forward_kl`. Options and shapes as in
    :class:`ChunkedKDLoss`.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        *,
        alpha: float = 0.1,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
    ) -> None:
        super().__init__(
            "skew_forward_kl",
            {"alpha": alpha},
            num_output_chunks,
            ignore_index,
            temperature=temperature,
            temperature_squared=temperature_squared,
            reduction=reduction,
            vocab_columns=vocab_columns,
        )


class SkewReverseKLWithChunkedOutputLoss(ChunkedKDLoss):
    """Skew reverse KL ``KL(q || alpha * q + (1 - alpha) * p)`` (DistiLLM).

    See :func:`kdtune.losses.divergences.skew_reverse_kl`. Options and shapes as in
    :class:`ChunkedKDLoss`.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        *,
        alpha: float = 0.1,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
    ) -> None:
        super().__init__(
            "skew_reverse_kl",
            {"alpha": alpha},
            num_output_chunks,
            ignore_index,
            temperature=temperature,
            temperature_squared=temperature_squared,
            reduction=reduction,
            vocab_columns=vocab_columns,
        )


class TVDWithChunkedOutputLoss(ChunkedKDLoss):
    """Total variation distance ``0.5 * sum_v |p_v - q_v|`` per non-ignored token.

    Options and shapes as in :class:`ChunkedKDLoss`.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        *,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: Reduction = "mean",
        vocab_columns: int | None = None,
    ) -> None:
        super().__init__(
            "total_variation",
            None,
            num_output_chunks,
            ignore_index,
            temperature=temperature,
            temperature_squared=temperature_squared,
            reduction=reduction,
            vocab_columns=vocab_columns,
        )


class CEWithChunkedOutputLoss(nn.Module):
    """Cross-entropy over chunked logits; drop-in for torchtune's class of the same name.

    Same constructor and ``forward(logits, labels)`` as torchtune's, plus ``reduction`` and
    ``num_tokens`` with the contract of :class:`ChunkedKDLoss`; an all-ignored batch gives 0
    (torchtune's gives NaN). Memory as in the KD losses: only each chunk's gradient, in the
    logits' dtype, is kept for backward.

    Args:
        num_output_chunks: as in :class:`ChunkedKDLoss`.
        ignore_index: label value of positions that do not contribute.
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        *,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        check_common_options(ignore_index, reduction, num_output_chunks)
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(
        self, logits: Logits, labels: Tensor, num_tokens: Tensor | int | None = None
    ) -> Tensor:
        """``logits``: list of ``[B, S_i, V]`` chunks or ``[B, S, V]``; ``labels``: ``[B, S]``.

        Returns a 0-dim fp32 tensor (fp64 for fp64 logits).
        """
        return _cross_entropy_loss(
            logits,
            labels,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            num_tokens=num_tokens,
            num_output_chunks=self.num_output_chunks,
        )

    def extra_repr(self) -> str:
        return (
            f"num_output_chunks={self.num_output_chunks}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}"
        )
