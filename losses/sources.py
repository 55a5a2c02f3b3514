"""Student and teacher sources: where each chunk's logits come from and where its gradient goes.

A source hands the engine (:mod:`kdtune.losses.engine`) the logits of chunk ``i`` and takes back
that chunk's fp32 logit gradient, which it turns right away into the gradients of its own
inputs, so only input-sized gradients outlive the chunk:

- :class:`LogitChunks`: logits given as chunks (torchtune's chunked contract); the gradient is
  kept per chunk in the logits' dtype.
- :class:`Projection`: ``hidden @ weight.T + bias`` formed per chunk (the fused path); the
  gradient becomes the hidden-state gradient, a fp32-accumulated weight gradient
  (:class:`WeightGradAccumulator`) and the bias gradient.
- :class:`TopKPieces`: a sparse :class:`~kdtune.losses._math.TopKTeacher`, split like the
  student (a constant).

Every source has ``inputs`` (the tensors autograd sees), ``start(needs)``, ``logits(i, ws)``,
``held(i)`` (buffers it keeps past the chunk) and, when it can take gradients,
``add_grad(i, grad, ws)`` and ``grads()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from kdtune.losses._math import TopKTeacher, Workspace


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
