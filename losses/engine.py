"""The loss engine: one autograd Function and one per-chunk objective for every KD loss.

A call is a list of chunks of token rows. Each chunk's student logits come from a *student
source* (a chunk of logits given by the model, torchtune's chunked contract, or hidden states x
the output weight, the fused path) and its teacher from a *teacher source* (dense logits,
hidden states x weight, or a sparse :class:`~kdtune.losses._math.TopKTeacher`). For every chunk
:func:`~kdtune.losses._math.chunk_objective` forms the KD and CE values and the gradient with
respect to the student logits in one fp32 pass (closed form); the student source turns that
gradient into the gradients of its own inputs right away (the chunk's logit gradient in the
logits' dtype, or hidden-state/weight/bias gradients). Only those gradients are kept for
backward, which multiplies them by the incoming scalar.

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

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdtune.losses._math import (
    TOPK_DIVERGENCES,
    TOPK_MODES,
    ChunkMath,
    TopKTeacher,
    Workspace,
    chunk_objective,
)
from kdtune.losses._options import check_common_options, check_kd_options, check_num_tokens
from kdtune.losses.divergences import resolved_params

DEFAULT_CHUNK_MEMORY_MB = 1024
"""Default budget for one chunk's vocabulary-sized fp32 temporaries (see :func:`rows_per_chunk`)."""
TEMPORARIES_PER_ROW = 8
"""fp32 ``[rows, V]`` buffers alive at once in the worst case: student and teacher logits, their
log-probabilities and probabilities, the gradient and its input-dtype copy (see the test that
counts them, tests/test_engine.py)."""


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
) -> int:
    """Rows per chunk: ``chunk_size`` when given, else at most ``ceil(total / num_chunks)`` and
    at most what keeps ``TEMPORARIES_PER_ROW`` fp32 ``[rows, vocab]`` buffers within
    ``memory_mb`` (261 rows at V = 128,256 and the default 1 GiB), so peak memory does not grow
    with the sequence length."""
    if chunk_size is not None:
        return chunk_size
    budget = max(1, (memory_mb * 2**20) // (TEMPORARIES_PER_ROW * 4 * vocab))
    if num_chunks is not None:
        budget = min(budget, max(1, math.ceil(total_rows / num_chunks)))
    return budget


# ------------------------------------------------------------------------------------------------
# Sources


class LogitChunks:
    """Logits given as chunks (``[B, S_i, V]`` or ``[n_i, V]``); optional gradients per chunk.

    ``columns``: only the first ``columns`` vocabulary entries are handed out (the gradient of
    the rest is zero).
    """

    def __init__(self, chunks: Sequence[Tensor], columns: int | None = None) -> None:
        self.chunks = list(chunks)
        self.flat = [chunk.reshape(-1, chunk.shape[-1]) for chunk in self.chunks]
        self.columns = columns
        self.inputs: tuple[Tensor, ...] = tuple(self.chunks)
        self._grads: list[Tensor | None] = [None] * len(self.chunks)

    def start(self, needs: Sequence[bool]) -> None:
        self._grads = [None] * len(self.chunks)

    def logits(self, i: int, ws: Workspace | None = None) -> Tensor:
        flat = self.flat[i]
        return flat if self.columns in (None, flat.shape[-1]) else flat[:, : self.columns]

    def add_grad(self, i: int, grad: Tensor, ws: Workspace | None = None) -> None:
        chunk = self.chunks[i]
        if grad.shape[-1] != chunk.shape[-1]:
            grad = torch.nn.functional.pad(grad, (0, chunk.shape[-1] - grad.shape[-1]))
        self._grads[i] = grad.to(chunk.dtype).view(chunk.shape)

    def held(self, i: int) -> tuple[Tensor | None, ...]:
        """Tensors of chunk ``i`` this source keeps (they may share a workspace buffer)."""
        return (self._grads[i],)

    def grads(self) -> tuple[Tensor | None, ...]:
        return tuple(self._grads)


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


def _cpu_has_bf16_matmul(weight: Tensor) -> bool:
    """A bf16 weight on a CPU whose oneDNN has bf16 matrix instructions (AVX512-BF16, AMX)."""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


@contextlib.contextmanager
def _onednn_bf16_matmul() -> Iterator[None]:
    """In this block oneDNN may run fp32 matmuls on bf16 matrix units: operands rounded to bf16
    (exact for operands that hold bf16 values), products summed in fp32."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _matmul(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """``hidden @ weight.T (+ bias)`` in the input dtype, into ``out`` when given."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def project(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, ws: Workspace | None = None
) -> Tensor:
    """``hidden [n, D] @ weight[V, D].T + bias`` as fp32 (fp64) ``[n, V]`` logits.

    16-bit inputs: a matmul with fp32 output where the backend has it (CUDA), else a matmul in
    the input dtype then an upcast, which is what a bf16 model head computes. ``ws``: the
    buffers come from this workspace.
    """
    shape = (hidden.shape[0], weight.shape[0])
    take = (lambda dtype: ws.take(shape, dtype, hidden.device)) if ws is not None else None
    if hidden.dtype in (torch.float32, torch.float64):
        return _matmul(hidden, weight, bias, take(hidden.dtype) if take else None)
    if _supports_fp32_out_dtype(hidden):
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        return logits if bias is None else logits.add_(bias)
    low = _matmul(hidden, weight, bias, take(hidden.dtype) if take else None)
    if take is None:
        return low.float()
    logits = take(torch.float32).copy_(low)
    ws.give(low)
    return logits


class WeightGradAccumulator:
    """``sum over chunks of grad_logits.T @ hidden_chunk``, shape ``[V, D]``.

    ``in_input_dtype=False`` (default): the sum is kept in fp32 (fp64) and rounded to the
    weight's dtype once at the end. For a 16-bit weight the products are those of the logit
    gradient rounded to the weight's dtype (the same rounding the hidden-state gradient's
    matmul gets) with the hidden states, exact in fp32, on every device: a tensor-core matmul
    with fp32 output on CUDA (added in row blocks); on CPU an fp32 matmul on the rounded values,
    run on the bf16 matrix units where oneDNN has them (the rounding to bf16 is then exact). The
    accumulator costs twice the final gradient.
    ``in_input_dtype=True``: each chunk's bf16 matmul adds into a bf16 accumulator (what
    Liger-Kernel and autograd over torchtune's chunked output head do): the sum is rounded once
    per chunk (see benchmarks/README.md for the measured cost in precision).
    """

    ROW_BLOCK = 8192

    def __init__(self, weight: Tensor, in_input_dtype: bool = False) -> None:
        self.lowp = in_input_dtype and weight.dtype in (torch.bfloat16, torch.float16)
        dtype = weight.dtype if self.lowp else torch.promote_types(weight.dtype, torch.float32)
        # An fp32 sum of a 16-bit weight is kept in row blocks, each freed as soon as it is
        # rounded (see result): the rounding then adds one block, not the whole gradient.
        vocab, dim = weight.shape
        self.rows = self.ROW_BLOCK if dtype != weight.dtype else vocab
        self.blocks: list[Tensor | None] = [
            torch.zeros(min(self.rows, vocab - start), dim, dtype=dtype, device=weight.device)
            for start in range(0, vocab, self.rows)
        ]
        self._lowp_out_fp32 = _supports_fp32_out_dtype(weight)
        self._cpu_bf16_math = _cpu_has_bf16_matmul(weight)

    def add(self, grad_logits: Tensor, grad_logits_lowp: Tensor, hidden: Tensor) -> None:
        """``grad_logits`` fp32 ``[n, V]`` (overwritten), its input-dtype copy, ``hidden [n, D]``."""
        dtype = self.blocks[0].dtype
        if self.lowp:
            grad_t, math = grad_logits_lowp.t(), contextlib.nullcontext()
        elif hidden.dtype == dtype:
            grad_t, math = grad_logits.t(), contextlib.nullcontext()
        elif self._lowp_out_fp32:
            grad_t = grad_logits_lowp.t()
            for block, total in zip(grad_t.split(self.rows), self.blocks, strict=True):
                total.add_(torch.mm(block, hidden, out_dtype=torch.float32))
            return
        else:
            grad_t = grad_logits.copy_(grad_logits_lowp).t()  # the 16-bit values, held in fp32
            hidden = hidden.to(dtype)
            math = _onednn_bf16_matmul() if self._cpu_bf16_math else contextlib.nullcontext()
        with math:
            for block, total in zip(grad_t.split(self.rows), self.blocks, strict=True):
                total.addmm_(block, hidden)

    def result(self, dtype: torch.dtype) -> Tensor:
        """The sum in ``dtype``; the accumulator is consumed (each block freed once rounded)."""
        if len(self.blocks) == 1:
            return self.blocks.pop().to(dtype)
        first = self.blocks[0]
        vocab = sum(block.shape[0] for block in self.blocks)
        out = torch.empty(vocab, first.shape[1], dtype=dtype, device=first.device)
        for i, rows in enumerate(out.split(self.rows)):
            rows.copy_(self.blocks[i])
            self.blocks[i] = None
        return out


class Projection:
    """Logits formed per chunk from ``hidden [N, D]`` (split in ``rows``) and ``weight [V, D]``.

    As a student source it turns each chunk's logit gradient into the hidden-state gradient
    (written into a ``[N, D]`` buffer), the fp32-accumulated weight gradient and the bias
    gradient; as a teacher source it is a constant.
    """

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        rows: int,
        weight_grad_in_input_dtype: bool = False,
    ) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.weight_grad_in_input_dtype = weight_grad_in_input_dtype
        self.pieces = list(hidden.split(rows))
        self.inputs: tuple[Tensor | None, ...] = (hidden, weight, bias)
        self._offsets = [0]
        for piece in self.pieces:
            self._offsets.append(self._offsets[-1] + piece.shape[0])

    def start(self, needs: Sequence[bool]) -> None:
        needs_hidden, needs_weight, needs_bias = (list(needs) + [False] * 3)[:3]
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        self._grad_hidden = torch.empty_like(self.hidden) if needs_hidden else None
        self._grad_weight = (
            WeightGradAccumulator(self.weight, self.weight_grad_in_input_dtype)
            if needs_weight
            else None
        )
        self._grad_bias = (
            torch.zeros(self.weight.shape[0], dtype=dtype, device=self.weight.device)
            if needs_bias and self.bias is not None
            else None
        )

    def logits(self, i: int, ws: Workspace | None = None) -> Tensor:
        return project(self.pieces[i], self.weight, self.bias, ws)

    def held(self, i: int) -> tuple[Tensor | None, ...]:
        return ()  # each chunk's gradient is folded into the buffers of start()

    def add_grad(self, i: int, grad: Tensor, ws: Workspace | None = None) -> None:
        if grad.dtype == self.hidden.dtype:
            lowp = grad
        elif ws is not None:
            lowp = ws.like(grad, self.hidden.dtype).copy_(grad)
        else:
            lowp = grad.to(self.hidden.dtype)
        if self._grad_bias is not None:
            self._grad_bias += grad.sum(dim=0)
        if self._grad_hidden is not None:
            rows = slice(self._offsets[i], self._offsets[i + 1])
            torch.mm(lowp, self.weight, out=self._grad_hidden[rows])
        if self._grad_weight is not None:
            self._grad_weight.add(grad, lowp, self.pieces[i])  # may overwrite grad

    def grads(self) -> tuple[Tensor | None, ...]:
        weight = self._grad_weight.result(self.weight.dtype) if self._grad_weight else None
        bias = self._grad_bias.to(self.weight.dtype) if self._grad_bias is not None else None
        return self._grad_hidden, weight, bias


class TopKPieces:
    """A :class:`TopKTeacher` split into the same chunks as the student (a constant)."""

    inputs: tuple[Tensor, ...] = ()

    def __init__(self, pieces: list[TopKTeacher]) -> None:
        self.pieces = pieces

    def logits(self, i: int, ws: Workspace | None = None) -> TopKTeacher:
        return self.pieces[i]

    def held(self, i: int) -> tuple[Tensor | None, ...]:
        return ()


def split_topk(teacher: TopKTeacher, split: Callable[[Tensor], list[Tensor]]) -> TopKPieces:
    """Split every field of ``teacher`` with ``split`` (the split used for the logits)."""
    fields = [split(field) for field in teacher]
    return TopKPieces([TopKTeacher(*parts) for parts in zip(*fields)])


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
        objective = chunk_objective if isinstance(teacher, TopKTeacher) else self.objective
        eager = objective is chunk_objective  # a compiled objective allocates its own buffers
        args = (self.math, student, teacher, safe_labels, keep, kd_weight, ce_weight)
        kd, ce, grad_s, grad_t = objective(
            *args, want_s, want_t, False, **({"ws": ws} if eager and ws is not None else {})
        )
        if (
            isinstance(teacher, Tensor)
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


def check_topk_teacher(teacher: Any, batch: int, tokens: int) -> TopKTeacher:
    """Shapes and dtypes of a :class:`TopKTeacher` covering ``[batch, tokens]``."""
    expected = {
        "token_ids": (batch, tokens, None),
        "logprobs": (batch, tokens, None),
        "rest_logmass": (batch, tokens),
    }
    for name, shape in expected.items():
        value = getattr(teacher, name)
        if not isinstance(value, Tensor) or value.dim() != len(shape):
            raise ValueError(
                f"TopKTeacher.{name} must be a tensor of shape {list(shape)} (None: k), got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}."
            )
        if tuple(value.shape[:2]) != (batch, tokens):
            raise ValueError(
                f"TopKTeacher.{name} has shape {tuple(value.shape)} but the student covers "
                f"[{batch}, {tokens}]; the teacher rows must align with the shifted labels."
            )
    ids, logprobs = teacher.token_ids, teacher.logprobs
    if ids.dtype != torch.int64 or not logprobs.is_floating_point():
        raise ValueError(
            f"TopKTeacher.token_ids must be int64 and logprobs floating point, got "
            f"{ids.dtype} and {logprobs.dtype}."
        )
    if ids.shape != logprobs.shape or ids.shape[-1] < 1:
        raise ValueError(
            f"TopKTeacher.token_ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} "
            f"must have the same shape [batch, tokens, k] with k >= 1."
        )
    return teacher


# ------------------------------------------------------------------------------------------------
# The module every KD loss builds on: options checked once, one engine call per forward


class EngineLoss(torch.nn.Module):
    """Options shared by the chunked and fused losses, checked where the loss is built.

    Args:
        divergence: a name from :data:`kdtune.losses.divergences.DIVERGENCES` (``None``: CE only).
        divergence_params: its parameters (``ratio``, ``beta`` or ``alpha``), each in [0, 1].
        ignore_index: label value of positions that do not contribute.
        temperature: the KD term divides both logit sets by it (> 0). A :class:`TopKTeacher`
            must have been cached at the same temperature (only the student is tempered).
        temperature_squared: multiply the KD term by ``temperature**2`` (Hinton et al.).
        reduction: ``"mean"`` or ``"sum"`` (see the module docstring).
        vocab_columns: ``None``: vocabulary sizes must match; N: the KD term compares the first N.
        topk_mode: with a :class:`TopKTeacher`: ``"bucket"`` compares the (k+1)-bucket
            distributions (the k ids and the rest mass; the student bucketed the same way, from
            its full softmax); ``"renormalize"`` (axolotl, DistillKit) renormalises the teacher
            over its k ids and the student's softmax over the same k ids (its logits gathered
            there; the other columns get no KD gradient).
        finite_logits: ``False`` (default): a dense chunk whose per-token KD values are not
            all finite (a ``-inf`` logit makes the closed forms meet ``0 * inf``) is redone by
            the masked-vocabulary semantics above; the check reads ``[rows]`` values on the
            host once per chunk. ``True``: the caller guarantees finite logits (a model's own
            output head, as in the KD recipe, which sets it), so nothing is read on the host.

    ``compile()`` compiles the per-chunk math only (not the chunk loop). On CPU the module keeps
    its chunk buffers (at most ``TEMPORARIES_PER_ROW`` fp32 ``[rows, V]``, about
    ``chunk_memory_mb`` for the fused loss) from one call to the next, since fresh memory there
    costs a page fault per 4 KiB on first write; ``release_buffers()`` frees them.
    """

    def __init__(
        self,
        divergence: str | None,
        divergence_params: dict[str, float] | None,
        ignore_index: int,
        *,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: str = "mean",
        vocab_columns: int | None = None,
        topk_mode: str = "bucket",
        finite_logits: bool = False,
    ) -> None:
        super().__init__()
        self.divergence_name = divergence
        self.divergence_params: dict[str, float] = dict(divergence_params or {})
        resolved = resolved_params(divergence, self.divergence_params) if divergence else {}
        check_common_options(ignore_index, reduction)
        check_kd_options(temperature, temperature_squared, vocab_columns)
        if topk_mode not in TOPK_MODES:
            raise ValueError(f"topk_mode must be one of {list(TOPK_MODES)}, got {topk_mode!r}.")
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.temperature_squared = temperature_squared
        self.reduction = reduction
        self.vocab_columns = vocab_columns
        self.topk_mode = topk_mode
        self.finite_logits = finite_logits
        self._params = tuple(sorted(resolved.items()))
        self._objective: Callable[..., Any] = chunk_objective
        self._cpu_workspace = Workspace(persistent=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each loss class its full signature (``**options`` spelled out), so that config
        checks and ``--help`` see every option and its default."""
        super().__init_subclass__(**kwargs)
        own = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if own and own[-1].kind is inspect.Parameter.VAR_KEYWORD:
            names = {p.name for p in own}
            shared = inspect.signature(EngineLoss.__init__).parameters.values()
            extra = [p for p in shared if p.kind is p.KEYWORD_ONLY and p.name not in names]
            own = own[:-1] + extra
        cls.__signature__ = inspect.Signature(own)

    def release_buffers(self) -> None:
        """Free the chunk buffers kept between calls on CPU (see :class:`Workspace`)."""
        self._cpu_workspace.clear()

    def compile(self, backend: str = "inductor", **kwargs: Any) -> None:  # type: ignore[override]
        """Compile the per-chunk math (:func:`chunk_objective` on finite dense chunks) only."""
        self._objective = torch.compile(chunk_objective, backend=backend, **kwargs)

    def _chunk_math(self, teacher: Any, with_ce: bool, columns: int | None) -> ChunkMath:
        if isinstance(teacher, TopKTeacher) and self.divergence_name not in TOPK_DIVERGENCES:
            raise ValueError(
                f"{type(self).__name__} with divergence={self.divergence_name!r} does not "
                f"support a TopKTeacher; use one of {list(TOPK_DIVERGENCES)}."
            )
        return ChunkMath(
            divergence=self.divergence_name if teacher is not None else None,
            params=self._params,
            temperature=float(self.temperature),
            columns=columns,
            with_ce=with_ce,
            topk_mode=self.topk_mode,
        )

    def _run(
        self,
        math_: ChunkMath,
        student: Any,
        teacher: Any,
        labels: Tensor,
        label_pieces: list[Tensor],
        kd_ratio: float,
        num_tokens: Tensor | int | None,
        teacher_inputs: tuple[Tensor, ...] = (),
        reduction: str | None = None,
    ) -> KDOutput:
        first = student.inputs[0]
        dtype = torch.promote_types(first.dtype, torch.float32)
        call = EngineCall(
            math=math_,
            student=student,
            teacher=teacher,
            labels=label_pieces,
            ignore_index=self.ignore_index,
            kd_ratio=kd_ratio if math_.divergence is not None else 0.0,
            kd_scale=float(self.temperature) ** 2 if self.temperature_squared else 1.0,
            divisor=divisor(
                labels, self.ignore_index, reduction or self.reduction, num_tokens, dtype
            ),
            objective=self._objective,
            teacher_inputs=teacher_inputs,
            finite_logits=self.finite_logits,
            workspace=self._cpu_workspace if first.device.type == "cpu" else Workspace(),
        )
        return run_engine(call)

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence_name!r}, divergence_params={self.divergence_params}, "
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"temperature_squared={self.temperature_squared}, reduction={self.reduction!r}, "
            f"vocab_columns={self.vocab_columns}, topk_mode={self.topk_mode!r}"
        )
