"""The chunked knowledge-distillation losses: torchtune's contract, true divergence values.

A model whose output head is in chunked mode (``model.set_num_output_chunks(n)``) returns its
logits as a list of chunks ``[B, S_i, V]`` in the model dtype, split along the tokens. The losses
here take those lists (or one plain ``[B, S, V]`` tensor, which is one chunk) and labels
``[B, S]``, and evaluate them with the loss engine (:mod:`kdtune.losses.engine`): one chunk at a
time, values and gradients in closed form in fp32, only each chunk's gradient (in the chunk's
dtype) kept for backward. Labels are split with the lengths of the chunks actually received, so
chunk boundaries of logits and labels always agree (uneven and empty chunks included). The
teacher is the same kind of chunk list, or a sparse :class:`~kdtune.losses.TopKTeacher`
(``[B, S, k]`` rows, split the same way).

:meth:`ChunkedKDLoss.kd_and_ce` returns the KD and the CE term of every chunk from one engine
call (one upcast and one student log-softmax per chunk); ``forward`` returns the KD term alone
and :class:`CEWithChunkedOutputLoss` the CE term alone (torchtune's interface).

Values. These losses return the divergence itself: zero when the student equals the teacher.
torchtune's ``ForwardKLWithChunkedOutputLoss`` (and ``ForwardKLLoss``) returns the
teacher-student cross-entropy ``-sum_v p_v log q_v``, the forward KL plus the teacher's entropy;
the gradient with respect to the student is the same, so training is unchanged and only the
logged number differs. torchtune's reverse KL already returns the true KL; its symmetric KL is
larger than ours by ``sym_kd_ratio`` times the teacher entropy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdtune.losses._math import TopKTeacher
from kdtune.losses._options import check_int, compared_vocab
from kdtune.losses.base import KDLoss
from kdtune.losses.engine import KDOutput
from kdtune.losses.sources import LogitChunks, check_topk_teacher, split_topk

Logits = Sequence[Tensor] | Tensor
Teacher = Sequence[Tensor] | Tensor | TopKTeacher


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


def _check_chunk_count(count: int, num_output_chunks: int | None, name: str) -> None:
    """At most ``num_output_chunks`` chunks: ``torch.chunk`` returns fewer for short sequences."""
    if num_output_chunks is not None and count > num_output_chunks:
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


def _check_labels(labels: Any, chunks: list[Tensor]) -> list[int]:
    """The chunk lengths, after checking that ``labels [B, S]`` covers the chunks' tokens."""
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
    return lengths


def _splitter(lengths: list[int]):
    """Split ``[B, S, ...]`` along the tokens into the chunks' lengths, each flattened to rows."""
    return lambda x: [p.reshape(-1, *p.shape[2:]) for p in x.split(lengths, dim=1)]


# ------------------------------------------------------------------------------------------------
# Modules


class ChunkedKDLoss(KDLoss):
    """Chunked distillation loss for any divergence of :mod:`kdtune.losses.divergences`.

    The named classes below fix ``divergence``; this one is handy in a config, e.g.
    ``_component_: kdtune.losses.ChunkedKDLoss``, ``divergence: jsd``,
    ``divergence_params: {beta: 0.5}``.

    Args:
        divergence, divergence_params: see :class:`kdtune.losses.KDLoss`.
        num_output_chunks: the chunk count the model's output head is set to. A forward
            receiving more chunks raises ``ValueError``; fewer are accepted (``torch.chunk``
            returns fewer for short sequences); a plain tensor is always accepted.
        ignore_index, temperature, temperature_squared, reduction, vocab_columns, topk_mode:
            see :class:`kdtune.losses.KDLoss`.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        divergence_params: dict[str, float] | None = None,
        num_output_chunks: int | None = 8,
        ignore_index: int = -100,
        **options: Any,
    ) -> None:
        super().__init__(divergence, divergence_params, ignore_index, **options)
        if num_output_chunks is not None:
            check_int("num_output_chunks", num_output_chunks, minimum=1)
        self.num_output_chunks = num_output_chunks

    def forward(
        self,
        student_logits: Logits,
        teacher_logits: Teacher,
        labels: Tensor,
        num_tokens: Tensor | int | None = None,
    ) -> Tensor:
        """The KD loss, a 0-dim fp32 tensor (fp64 for fp64 logits).

        Args:
            student_logits: list of ``[B, S_i, V_s]`` chunks, or one ``[B, S, V_s]`` tensor.
            teacher_logits: list of ``[B, S_i, V_t]`` chunks (same count and ``[B, S_i]``), one
                tensor, or a :class:`TopKTeacher` of ``[B, S, k]`` rows.
            labels: ``[B, S]`` with ``S = sum_i S_i``.
            num_tokens: divisor for ``reduction="mean"`` (global non-ignored token count);
                default: the local count.
        """
        return self._chunked(student_logits, teacher_logits, labels, None, num_tokens).loss

    def kd_and_ce(
        self,
        student_logits: Logits,
        teacher_logits: Teacher,
        labels: Tensor,
        *,
        kd_ratio: float,
        num_tokens: Tensor | int | None = None,
    ) -> KDOutput:
        """``(kd_ratio * KD + (1 - kd_ratio) * CE, KD, CE)`` from one pass over the chunks.

        Arguments as in :meth:`forward`; the CE term uses the student's whole vocabulary at
        temperature 1 with this loss's ``ignore_index`` and reduction.
        """
        return self._chunked(student_logits, teacher_logits, labels, kd_ratio, num_tokens)

    def _chunked(
        self,
        student_logits: Logits,
        teacher_logits: Teacher | None,
        labels: Tensor,
        kd_ratio: float | None,
        num_tokens: Tensor | int | None,
        reduction: str | None = None,
    ) -> KDOutput:
        """One engine call; ``kd_ratio=None``: KD only; ``teacher_logits=None``: CE only."""
        name = "logits" if teacher_logits is None else "student_logits"
        student_chunks = _as_chunks(student_logits, name)
        _check_chunk_count(len(student_chunks), self.num_output_chunks, name)
        lengths = _check_labels(labels, student_chunks)
        split = _splitter(lengths)
        vocab = student_chunks[0].shape[-1]
        teacher: Any = None
        teacher_inputs: tuple[Tensor, ...] = ()
        columns = None
        if isinstance(teacher_logits, TopKTeacher):
            batch, tokens = labels.shape
            teacher = split_topk(check_topk_teacher(teacher_logits, batch, tokens), split)
            columns = self.vocab_columns
        elif teacher_logits is not None:
            teacher_chunks = _as_chunks(teacher_logits, "teacher_logits")
            _check_pairs(student_chunks, teacher_chunks)
            columns = compared_vocab(vocab, teacher_chunks[0].shape[-1], self.vocab_columns)
            teacher = LogitChunks(teacher_chunks, columns)
            teacher_inputs = teacher.inputs
        math_ = self._chunk_math(teacher_logits, kd_ratio is not None, columns)
        return self._run(
            math_,
            LogitChunks(student_chunks),
            teacher,
            labels,
            split(labels),
            1.0 if kd_ratio is None else kd_ratio,
            num_tokens,
            teacher_inputs,
            reduction,
        )

    def extra_repr(self) -> str:
        return f"num_output_chunks={self.num_output_chunks}, {super().extra_repr()}"


class ForwardKLWithChunkedOutputLoss(ChunkedKDLoss):
    """KL(teacher || student) per non-ignored token; drop-in for torchtune's class.

    Same constructor and forward as ``torchtune.modules.loss.ForwardKLWithChunkedOutputLoss``
    and the same gradients; the value is the true KL, torchtune's minus the mean teacher
    entropy. Keyword options as in :class:`ChunkedKDLoss`.
    """

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, **options: Any):
        super().__init__("forward_kl", None, num_output_chunks, ignore_index, **options)


class ReverseKLWithChunkedOutputLoss(ChunkedKDLoss):
    """KL(student || teacher) per non-ignored token; drop-in for torchtune's class.

    torchtune's reverse KL returns the same value; ours also returns 0 (not NaN) for an
    all-ignored batch and no NaN gradient where the teacher masks a column.
    """

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, **options: Any):
        super().__init__("reverse_kl", None, num_output_chunks, ignore_index, **options)


class SymmetricKLWithChunkedOutputLoss(ChunkedKDLoss):
    """``sym_kd_ratio * KL(p || q) + (1 - sym_kd_ratio) * KL(q || p)``; drop-in for torchtune's.

    Positional order follows torchtune: ``(num_output_chunks, sym_kd_ratio, ignore_index)``.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        sym_kd_ratio: float = 0.5,
        ignore_index: int = -100,
        **options: Any,
    ) -> None:
        params = {"ratio": sym_kd_ratio}
        super().__init__("symmetric_kl", params, num_output_chunks, ignore_index, **options)
        self.sym_kd_ratio = sym_kd_ratio


class JSDWithChunkedOutputLoss(ChunkedKDLoss):
    """Generalised JSD(beta) (:func:`kdtune.losses.divergences.jsd`); 0: forward, 1: reverse KL."""

    def __init__(self, num_output_chunks=8, ignore_index=-100, *, beta=0.5, **options: Any):
        super().__init__("jsd", {"beta": beta}, num_output_chunks, ignore_index, **options)


class SkewForwardKLWithChunkedOutputLoss(ChunkedKDLoss):
    """Skew forward KL ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM)."""

    def __init__(self, num_output_chunks=8, ignore_index=-100, *, alpha=0.1, **options: Any):
        params = {"alpha": alpha}
        super().__init__("skew_forward_kl", params, num_output_chunks, ignore_index, **options)


class SkewReverseKLWithChunkedOutputLoss(ChunkedKDLoss):
    """Skew reverse KL ``KL(q || alpha q + (1 - alpha) p)`` (DistiLLM)."""

    def __init__(self, num_output_chunks=8, ignore_index=-100, *, alpha=0.1, **options: Any):
        params = {"alpha": alpha}
        super().__init__("skew_reverse_kl", params, num_output_chunks, ignore_index, **options)


class TVDWithChunkedOutputLoss(ChunkedKDLoss):
    """Total variation distance ``0.5 * sum_v |p_v - q_v|`` per non-ignored token."""

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, **options: Any):
        super().__init__("total_variation", None, num_output_chunks, ignore_index, **options)


class CEWithChunkedOutputLoss(ChunkedKDLoss):
    """Cross-entropy over chunked logits; drop-in for torchtune's class of the same name.

    Same constructor and ``forward(logits, labels)`` as torchtune's, plus ``reduction`` and
    ``num_tokens`` with the contract of :class:`ChunkedKDLoss`; an all-ignored batch gives 0
    (torchtune's gives NaN).
    """

    def __init__(
        self, num_output_chunks: int = 8, ignore_index: int = -100, *, reduction: str = "mean"
    ) -> None:
        super().__init__(None, None, num_output_chunks, ignore_index, reduction=reduction)

    def forward(  # type: ignore[override]
        self, logits: Logits, labels: Tensor, num_tokens: Tensor | int | None = None
    ) -> Tensor:
        """``logits``: list of ``[B, S_i, V]`` chunks or ``[B, S, V]``; ``labels``: ``[B, S]``."""
        return self._chunked(logits, None, labels, 0.0, num_tokens).loss

    def extra_repr(self) -> str:
        return (
            f"num_output_chunks={self.num_output_chunks}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}"
        )


class _FlatKDLoss(ChunkedKDLoss):
    """torchtune's non-chunked KD interface: ``forward(student [N, V], teacher [N, V], labels [N])``.

    Logits of any shape ``[..., V]`` with labels ``[...]`` are accepted. ``normalize=True``
    divides by the non-ignored count (0 when there is none), or by ``num_tokens`` when given
    (the contract of every :class:`~kdtune.losses.KDLoss`); ``False`` returns the sum.
    """

    def forward(  # type: ignore[override]
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        normalize: bool = True,
        num_tokens: Tensor | int | None = None,
    ) -> Tensor:
        student = student_logits.reshape(1, -1, student_logits.shape[-1])
        teacher = teacher_logits.reshape(1, -1, teacher_logits.shape[-1])
        reduction = "mean" if normalize else "sum"
        flat_labels = labels.reshape(1, -1)
        return self._chunked(student, teacher, flat_labels, None, num_tokens, reduction).loss


class ForwardKLLoss(_FlatKDLoss):
    """torchtune's ``ForwardKLLoss`` (flattened logits), valued as the true KL(p || q).

    torchtune's value is larger by the mean teacher entropy; gradients agree.
    """

    def __init__(self, ignore_index: int = -100, **options: Any) -> None:
        super().__init__("forward_kl", None, None, ignore_index, **options)


class ReverseKLLoss(_FlatKDLoss):
    """torchtune's ``ReverseKLLoss`` (flattened logits): KL(q || p), the same value."""

    def __init__(self, ignore_index: int = -100, **options: Any) -> None:
        super().__init__("reverse_kl", None, None, ignore_index, **options)


class SymmetricKLLoss(_FlatKDLoss):
    """torchtune's ``SymmetricKLLoss`` (flattened logits), valued with the true forward KL."""

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100, **options: Any):
        params = {"ratio": sym_kd_ratio}
        super().__init__("symmetric_kl", params, None, ignore_index, **options)
        self.sym_kd_ratio = sym_kd_ratio


# ------------------------------------------------------------------------------------------------
# Functional forms


def kd_loss(
    student_logits: Logits,
    teacher_logits: Teacher,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    divergence_params: dict[str, float] | None = None,
    num_tokens: Tensor | int | None = None,
    **options: Any,
) -> Tensor:
    """The chunked KD loss as a function; ``options`` as :class:`ChunkedKDLoss`'s keywords
    (``ignore_index``, ``temperature``, ``temperature_squared``, ``reduction``,
    ``vocab_columns``, ``topk_mode``). Any number of chunks is accepted."""
    loss = ChunkedKDLoss(divergence, divergence_params, None, **options)
    return loss(student_logits, teacher_logits, labels, num_tokens)


def ce_loss(
    logits: Logits, labels: Tensor, *, num_tokens: Tensor | int | None = None, **options: Any
) -> Tensor:
    """Cross-entropy over chunked logits; ``options``: ``ignore_index``, ``reduction``."""
    return CEWithChunkedOutputLoss(None, **options)(logits, labels, num_tokens)  # type: ignore[arg-type]


def _named_kd_loss(name: str, divergence: str, parameter: str | None = None):
    def loss(student_logits: Logits, teacher_logits: Teacher, labels: Tensor, **options: Any):
        params = {parameter: options.pop(parameter)} if parameter in options else None
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            divergence=divergence,
            divergence_params=params,
            **options,
        )

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = f":func:`kd_loss` with ``divergence={divergence!r}``" + (
        f" and its ``{parameter}`` keyword." if parameter else "."
    )
    return loss


forward_kl_loss = _named_kd_loss("forward_kl_loss", "forward_kl")
reverse_kl_loss = _named_kd_loss("reverse_kl_loss", "reverse_kl")
symmetric_kl_loss = _named_kd_loss("symmetric_kl_loss", "symmetric_kl", "ratio")
jsd_loss = _named_kd_loss("jsd_loss", "jsd", "beta")
skew_forward_kl_loss = _named_kd_loss("skew_forward_kl_loss", "skew_forward_kl", "alpha")
skew_reverse_kl_loss = _named_kd_loss("skew_reverse_kl_loss", "skew_reverse_kl", "alpha")
tvd_loss = _named_kd_loss("tvd_loss", "total_variation")
