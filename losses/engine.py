"""The loss engine: one autograd Function and one per-chunk objective for every KD loss.

A call is a list of chunks of token rows. Each chunk's student logits come from a *student
source* (a chunk of logits given by the model, torchtune's chunked contract, or hidden states x
the output weight, the fused path) and its teacher from a *teacher source* (dense logits,
hidden states x weight, or a sparse :class:`~kdtune.losses._math.TopKTeacher`); the sources
live in :mod:`kdtune.losses.sources`. For every chunk
:func:`~kdtune.losses._math.chunk_objective` forms the KD and CE values and the gradient with
respect to the student logits in one fp32 pass: in closed form where the divergence has one,
else by autograd of its reference on that chunk alone (a divergence is one entry of
:data:`kdtune.losses.divergences.DIVERGENCES`). The student source turns that gradient into
the gradients of its own inputs right away (the chunk's logit gradient in the logits' dtype,
or hidden-state/weight/bias gradients). Only those gradients are kept for backward, which
multiplies them by the incoming scalar. The module every loss builds on is
:class:`kdtune.losses.base.KDLoss`.

Contract (every entry point):

- ``loss = kd_ratio * kd + (1 - kd_ratio) * ce``; ``kd`` is the divergence of the tempered
  distributions (times T² with ``temperature_squared``), ``ce`` the student's cross-entropy at
  temperature 1, each summed over the tokens whose label is not ``ignore_index``.
  ``reduction="mean"`` divides both by ``num_tokens`` when given (the global count of
  non-ignored tokens across micro-batches and ranks), else by the local count, clamped to >= 1:
  an all-ignored batch gives an exact 0 still on the autograd graph. ``"sum"``: the sums.
- ``vocab_columns=N``: the KD term compares the first N columns of both models (embedding
  padding); the CE term uses the whole student vocabulary.
- ``-inf`` logits: a chunk whose KD values come out non-finite is redone by the rules of
  :mod:`kdtune.losses.divergences` (reference implementation by autograd).
- Double backward is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdtune.losses._math import ChunkMath, TopKTeacher, Workspace, chunk_objective, has_closed_form
from kdtune.losses._options import check_num_tokens
from kdtune.losses.sources import LogitChunks
from kdtune.losses.sources import WeightGradAccumulator as WeightGradAccumulator  # re-exported

DEFAULT_CHUNK_MEMORY_MB = 1024
"""Default budget for one chunk's vocabulary-sized fp32 temporaries (see :func:`rows_per_chunk`)."""
TEMPORARIES_PER_ROW = 8
"""fp32 ``[rows, V]`` buffers alive at once in the worst case: student and teacher logits, their
log-probabilities and probabilities, the gradient and its input-dtype copy (see the test that
counts them, tests/test_engine.py)."""
AUTOGRAD_TEMPORARIES_PER_ROW = 20
"""The same count for a divergence differentiated by autograd of its reference (no closed
form): its graph holds the reference's own temporaries (16 at most for the built-in references,
masks included, counted by tests/test_divergence_registry.py). A reference that keeps more
should be given a smaller ``chunk_memory_mb``."""


class KDOutput(NamedTuple):
    """What the engine returns; every field is a 0-dim fp32 (fp64 for fp64 input) tensor.

    Attributes:
        loss: ``kd_ratio * kd_loss + (1 - kd_ratio) * ce_loss``, differentiable.
        kd_loss: the distillation term alone, detached (0 without a teacher).
        ce_loss: the cross-entropy term alone, detached (0 when not computed).
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor


def rows_per_chunk(
    total_rows: int,
    vocab: int,
    num_chunks: int | None = None,
    chunk_size: int | None = None,
    memory_mb: int = DEFAULT_CHUNK_MEMORY_MB,
    temporaries: int = TEMPORARIES_PER_ROW,
) -> int:
    """Rows per chunk: ``chunk_size`` when given, else at most ``ceil(total / num_chunks)`` and
    at most what keeps ``temporaries`` fp32 ``[rows, vocab]`` buffers within ``memory_mb``
    (261 rows at V = 128,256 and the default 1 GiB with a closed form), so peak memory does not
    grow with the sequence length."""
    if chunk_size is not None:
        return chunk_size
    budget = max(1, (memory_mb * 2**20) // (temporaries * 4 * vocab))
    if num_chunks is not None:
        budget = min(budget, max(1, math.ceil(total_rows / num_chunks)))
    return budget


# ------------------------------------------------------------------------------------------------
# Sources


# ------------------------------------------------------------------------------------------------
# One call


@dataclass
class EngineCall:
    """One loss evaluation: sources, per-chunk labels and the weights of the terms.

    ``kd_ratio``: weight of KD in ``loss`` (1 with ``math.with_ce`` False: KD only; 0 without a
    teacher). ``kd_scale``: T² or 1. ``divisor``: ``1 / count`` for the mean, 1 for the sum.
    """

    math: ChunkMath
    student: Any
    teacher: Any
    labels: list[Tensor]
    ignore_index: int
    kd_ratio: float
    kd_scale: float
    divisor: Tensor | float
    objective: Callable[..., Any] = chunk_objective
    teacher_inputs: tuple[Tensor, ...] = field(default=())
    finite_logits: bool = False  # the caller promises no -inf: skip the per-chunk check
    workspace: Workspace = field(default_factory=Workspace)  # chunk buffers, reused per chunk

    @property
    def inputs(self) -> tuple[Tensor | None, ...]:
        return tuple(self.student.inputs) + tuple(self.teacher_inputs)

    def run(self, needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, tuple]:
        """Loop over the chunks; ``needs`` flags the inputs that want a gradient."""
        count = len(self.student.inputs)
        student_needs, teacher_needs = list(needs[:count]), list(needs[count:])
        self.student.start(student_needs)
        if teacher_needs:
            self.teacher.start(teacher_needs)
        chunked_student = isinstance(self.student, LogitChunks)
        kd_parts: list[Tensor] = []
        ce_parts: list[Tensor] = []
        for i, labels in enumerate(self.labels):
            if labels.numel() == 0:
                continue
            want_s = student_needs[i] if chunked_student else any(student_needs)
            want_t = bool(teacher_needs) and teacher_needs[i]
            kd, ce = self._chunk(i, labels, want_s, want_t)
            if kd is not None:
                kd_parts.append(kd)
            if ce is not None:
                ce_parts.append(ce)
        self.workspace.end_call()
        grads = self.student.grads() + (self.teacher.grads() if teacher_needs else ())
        return (*self._totals(kd_parts, ce_parts), grads)

    def _chunk(self, i: int, labels: Tensor, want_s: bool, want_t: bool):
        # Traced code (torch.compile of a whole loss) gets fresh buffers: no data pointers there.
        ws = None if torch.compiler.is_compiling() else self.workspace
        student = self.student.logits(i, ws)
        teacher = self.teacher.logits(i, ws) if self.teacher is not None else None
        dtype = torch.promote_types(student.dtype, torch.float32)
        keep = labels != self.ignore_index
        safe_labels = torch.where(keep, labels, 0)
        weight = keep.to(dtype) * self.divisor
        kd_weight = weight * (self.kd_ratio * self.kd_scale / self.math.temperature)
        ce_weight = weight * (1.0 - self.kd_ratio)
        # Sparse teachers and divergences without a closed form run autograd inside the
        # objective: always the eager one.
        closed = has_closed_form(self.math.divergence)
        sparse = isinstance(teacher, TopKTeacher)
        objective = chunk_objective if sparse or not closed else self.objective
        eager = objective is chunk_objective  # a compiled objective allocates its own buffers
        args = (self.math, student, teacher, safe_labels, keep, kd_weight, ce_weight)
        kd, ce, grad_s, grad_t = objective(
            *args, want_s, want_t, False, **({"ws": ws} if eager and ws is not None else {})
        )
        if (
            isinstance(teacher, Tensor)
            and closed
            and not self.finite_logits
            and kd is not None
            and not bool(kd.isfinite().all())
        ):
            # A -inf logit makes the closed forms meet 0 * inf: redo the chunk by the reference
            # rules (the logits are intact: the objective never writes to them).
            kd, ce, grad_s, grad_t = chunk_objective(*args, want_s, want_t, True)
        if grad_s is not None:
            self.student.add_grad(i, grad_s, ws)
        if grad_t is not None:
            self.teacher.add_grad(i, grad_t, ws)
        if ws is not None:
            held = self.student.held(i) + (self.teacher.held(i) if self.teacher else ())
            ws.reclaim(held)
        kd_sum = torch.where(keep, kd, 0.0).sum() if kd is not None else None
        ce_sum = torch.where(keep, ce, 0.0).sum() if ce is not None else None
        return kd_sum, ce_sum

    def _totals(self, kd_parts: list[Tensor], ce_parts: list[Tensor]) -> tuple[Tensor, ...]:
        first = self.student.inputs[0]
        dtype = torch.promote_types(first.dtype, torch.float32)
        zero = torch.zeros((), dtype=dtype, device=first.device)
        kd = (torch.stack(kd_parts).sum() if kd_parts else zero) * (self.kd_scale * self.divisor)
        ce = (torch.stack(ce_parts).sum() if ce_parts else zero) * self.divisor
        if not self.math.with_ce:
            return kd, kd, zero
        if self.math.divergence is None:
            return ce, zero, ce
        return self.kd_ratio * kd + (1.0 - self.kd_ratio) * ce, kd, ce


class _EngineFunction(torch.autograd.Function):
    """Runs an :class:`EngineCall`; every gradient is formed in the forward."""

    @staticmethod
    def forward(ctx: Any, call: EngineCall, *inputs: Tensor | None) -> tuple[Tensor, ...]:
        loss, kd, ce, grads = call.run(ctx.needs_input_grad[1:])
        kd, ce = (term.clone() if term is loss else term for term in (kd, ce))
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        # Each gradient is scaled in place by the incoming scalar: no gradient-sized copy and
        # no host read of grad_loss (to skip the usual factor 1). ``.data`` keeps autograd's
        # version counter, so a second backward (retain_graph, gradcheck) can unpack the same
        # buffer; it then rescales a copy by the ratio of the two incoming scalars. A 0-dim
        # fp32 grad_loss keeps a bf16 gradient's dtype.
        first = getattr(ctx, "first_backward", None)  # (grad_loss, buffers scaled by it)
        out: list[Tensor | None] = []
        for grad in ctx.saved_tensors:
            if grad is None:
                out.append(None)
            elif first is not None and grad.data_ptr() in first[1]:
                out.append(grad * (grad_loss / first[0]))
            else:
                out.append(grad.data.mul_(grad_loss))
        if first is None:
            ctx.first_backward = (
                grad_loss.detach().clone(),
                {g.data_ptr() for g in out if g is not None},
            )
        return (None, *out)


def run_engine(call: EngineCall) -> KDOutput:
    """Evaluate ``call``: through autograd when an input needs a gradient, else values only."""
    inputs = call.inputs
    needs = [isinstance(x, Tensor) and x.requires_grad for x in inputs]
    if torch.is_grad_enabled() and any(needs):
        return KDOutput(*_EngineFunction.apply(call, *inputs))
    with torch.no_grad():
        loss, kd, ce, _ = call.run([False] * len(inputs))
    return KDOutput(loss, kd, ce)


def divisor(
    labels: Tensor, ignore_index: int, reduction: str, num_tokens: Tensor | int | None, dtype
) -> Tensor | float:
    """``1 / count`` for ``"mean"`` (count clamped to >= 1), ``1`` for ``"sum"``."""
    check_num_tokens(num_tokens, reduction)
    if reduction == "sum":
        return 1.0
    if isinstance(num_tokens, int):
        return 1.0 / max(num_tokens, 1)
    count = (labels != ignore_index).sum() if num_tokens is None else num_tokens.reshape(())
    return 1.0 / count.to(device=labels.device, dtype=dtype).clamp(min=1)
