"""Fused output projection + distillation loss: no full logits tensor is ever materialised.

The loss receives the models' final-norm *hidden states* (see :mod:`kdtune.training.lm_head`)
and output weights instead of logits, and the loss engine (:mod:`kdtune.losses.engine`) forms the
logits one chunk of rows at a time:

    for each chunk of rows of the flattened ``[B * S]`` tokens:
        student logits = h_chunk @ W_s.T (+ b)       one projection serves KD and CE
        teacher        = h_t_chunk @ W_t.T, rows of teacher logits, or a TopKTeacher's rows
        value, d(value)/d(student logits)            closed form, fp32, one pass
        grad_h_chunk  = d_logits @ W_s               written into a ``[B * S, Ds]`` buffer
        grad_W       += d_logits.T @ h_chunk         fp32 accumulator, only for a trainable W
        grad_b       += d_logits.sum(0)

After the forward only hidden-sized and weight-sized gradients remain; backward multiplies them
by the incoming scalar. The contract (``kd_ratio``, temperature, reduction, ``num_tokens``,
``vocab_columns``, ``-inf``) is the engine's; the teacher is a constant.

Precision. fp32/fp64 inputs are computed in their own dtype. bf16/fp16: the projections run in
the input dtype with fp32 output where the backend has ``out_dtype`` (CUDA), else rounded to the
input dtype and upcast (what a bf16 model head followed by a chunked loss computes); the loss and
logit gradients are fp32; the weight gradient is accumulated across chunks in fp32 and cast to
the weight's dtype once (its products are those of the logit gradient rounded to the input
dtype, see :class:`kdtune.losses.sources.WeightGradAccumulator`); the hidden-state gradient is a
matmul in the input dtype.

Chunk size. ``chunk_size`` rows when given; otherwise as many rows as fit ``chunk_memory_mb``
(default 1024 MiB) of fp32 vocabulary-sized temporaries (:func:`kdtune.losses.engine.rows_per_chunk`:
261 rows at V = 128,256; fewer for a divergence without a closed form, whose autograd graph
holds more temporaries), and at most ``ceil(B * S / num_chunks)`` when ``num_chunks`` is given
(torchtune's knob). With ``num_chunks`` None (the default) the input is still cut into at least
:data:`DEFAULT_MIN_CHUNKS` chunks: so the default's temporaries stay below what the chunked
losses hold for the same input (the ``[B, S, V]`` logits and their gradient) at any vocabulary
size (measured at SmolLM2's V = 49,152 and 512 bf16 rows: 225 MiB against the chunked path's
264; one chunk held 689). So the default peak memory does not grow with the sequence length
and stays at or below the chunked path's for short inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kdtune.losses._math import TopKTeacher, has_closed_form
from kdtune.losses._options import check_int, compared_vocab
from kdtune.losses.base import KDLoss
from kdtune.losses.engine import (
    AUTOGRAD_TEMPORARIES_PER_ROW,
    DEFAULT_CHUNK_MEMORY_MB,
    TEMPORARIES_PER_ROW,
    KDOutput,
    rows_per_chunk,
)
from kdtune.losses.sources import LogitChunks, Projection, check_topk_teacher, split_topk

WEIGHT_GRAD_ACCUMULATION = ("fp32", "input_dtype")
FusedKDOutput = KDOutput
"""What :class:`FusedLinearKDLoss` returns: ``(loss, kd_loss, ce_loss)``, 0-dim tensors."""


# ------------------------------------------------------------------------------------------------
# Input validation


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


def _teacher_source(
    hidden: Tensor,
    student_vocab: int,
    split: Callable[[Tensor], list[Tensor]],
    rows: int,
    vocab_columns: int | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_topk: TopKTeacher | None,
) -> tuple[Any, int | None]:
    """Validate the teacher inputs; returns the engine's teacher source and compared columns."""
    batch, tokens = hidden.shape[:2]
    given = [teacher_hidden is not None or teacher_weight is not None]
    given += [teacher_logits is not None, teacher_topk is not None]
    if sum(given) != 1:
        raise ValueError(
            "Pass either teacher_hidden and teacher_weight (the teacher's final-norm hidden "
            "states and output-projection weight) or teacher_logits or teacher_topk, exactly "
            "one of them (not both and not neither)."
        )
    if teacher_bias is not None and teacher_hidden is None:
        raise ValueError("teacher_bias only applies with teacher_hidden; drop it.")
    if teacher_topk is not None:
        return split_topk(check_topk_teacher(teacher_topk, batch, tokens), split), vocab_columns
    if teacher_logits is not None:
        logits = _check_tensor("teacher_logits", teacher_logits, 3, "[batch, tokens, vocab]")
        _check_float("teacher_logits", logits)
        if tuple(logits.shape[:2]) != (batch, tokens):
            raise ValueError(
                f"teacher_logits has shape {tuple(logits.shape)} but student_hidden covers "
                f"[{batch}, {tokens}]; both must cover the same tokens."
            )
        columns = compared_vocab(student_vocab, logits.shape[-1], vocab_columns)
        return LogitChunks(split(logits.detach()), columns), columns
    if teacher_hidden is None or teacher_weight is None:
        missing = "teacher_weight" if teacher_hidden is not None else "teacher_hidden"
        raise ValueError(f"{missing} is missing: teacher_hidden and teacher_weight go together.")
    teacher_h = _check_tensor("teacher_hidden", teacher_hidden, 3, "[batch, tokens, hidden]")
    _check_float("teacher_hidden", teacher_h)
    if tuple(teacher_h.shape[:2]) != (batch, tokens):
        raise ValueError(
            f"teacher_hidden has shape {tuple(teacher_h.shape)} but student_hidden covers "
            f"[{batch}, {tokens}]; both must cover the same tokens."
        )
    weight, bias = _check_projection("teacher", teacher_h, teacher_weight, teacher_bias)
    columns = compared_vocab(student_vocab, weight.shape[0], vocab_columns)
    # Only the compared rows of the teacher's projection are ever needed.
    source = Projection(
        teacher_h.detach().reshape(-1, teacher_h.shape[-1]),
        weight.detach()[:columns],
        bias.detach()[:columns] if bias is not None else None,
        rows,
    )
    return source, columns


# ------------------------------------------------------------------------------------------------
# The module and its functional form


DEFAULT_MIN_CHUNKS = 4
"""Chunks the input is cut into at least when ``num_chunks`` is None: 8 fp32 temporaries per row
of a quarter of the rows take no more than the chunked losses' input-dtype logits and gradient
of all of them (see the module docstring)."""


class FusedLinearKDLoss(KDLoss):
    """Fused output projection + KD + CE loss over token chunks (see the module docstring).

    Args:
        divergence, divergence_params: see :class:`kdtune.losses.KDLoss`.
        num_chunks: ``None`` (default): rows per chunk from the memory budget, and at most
            ``ceil(B * S / DEFAULT_MIN_CHUNKS)``; N: at most ``ceil(B * S / N)`` rows per chunk
            (torchtune's knob) within the budget.
        ignore_index, temperature, temperature_squared, reduction, vocab_columns, topk_mode:
            see :class:`kdtune.losses.KDLoss`.
        chunk_size: rows per chunk; when given it overrides ``num_chunks`` and the budget.
        chunk_memory_mb: budget for one chunk's fp32 vocabulary-sized temporaries.
        weight_grad_accumulation: ``"fp32"`` (default): a 16-bit weight's gradient is summed
            over the chunks in fp32 (products of the logit gradient rounded to the weight's
            dtype) and rounded once. ``"input_dtype"``: summed in the weight's dtype, one bf16
            matmul-accumulate per chunk, as Liger-Kernel and autograd over torchtune's chunked
            head do: faster on CPU (half the accumulator's memory traffic), less precise (the
            measured cost is in benchmarks/README.md). No effect on fp32 weights.

    Example::

        loss_fn = FusedLinearKDLoss("forward_kl")
        out = loss_fn(
            forward_hidden(student, tokens), output_projection(student)[0], labels,
            kd_ratio=0.5, teacher_hidden=teacher_h, teacher_weight=output_projection(teacher)[0],
        )
        out.loss.backward()
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        divergence_params: dict[str, float] | None = None,
        num_chunks: int | None = None,
        ignore_index: int = -100,
        *,
        chunk_size: int | None = None,
        chunk_memory_mb: int = DEFAULT_CHUNK_MEMORY_MB,
        weight_grad_accumulation: str = "fp32",
        **options: Any,
    ) -> None:
        if num_chunks is not None:
            check_int("num_chunks", num_chunks, minimum=1)
        if weight_grad_accumulation not in WEIGHT_GRAD_ACCUMULATION:
            raise ValueError(
                f"weight_grad_accumulation must be one of {list(WEIGHT_GRAD_ACCUMULATION)}, "
                f"got {weight_grad_accumulation!r}."
            )
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        check_int("chunk_memory_mb", chunk_memory_mb, minimum=1)
        super().__init__(divergence, divergence_params, ignore_index, **options)
        self.num_chunks = num_chunks
        self.chunk_size = chunk_size
        self.chunk_memory_mb = chunk_memory_mb
        self.weight_grad_accumulation = weight_grad_accumulation

    @classmethod
    def from_chunked(
        cls, chunked_loss: torch.nn.Module, *, chunk_size: int | None = None
    ) -> FusedLinearKDLoss:
        """The fused loss with the divergence and options of a chunked KD loss module.

        Accepts the kdtune chunked family (its ``num_output_chunks`` becomes ``num_chunks``)
        and torchtune's ``ForwardKL``/``ReverseKL``/``SymmetricKLWithChunkedOutputLoss``.
        """
        name, params = _divergence_of(chunked_loss)
        options = {
            key: getattr(chunked_loss, key)
            for key in ("temperature", "temperature_squared", "reduction", "vocab_columns")
            if hasattr(chunked_loss, key)
        }
        return cls(
            name,
            params,
            getattr(chunked_loss, "num_output_chunks", None) or 8,
            getattr(chunked_loss, "ignore_index", -100),
            chunk_size=chunk_size,
            **options,
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
        teacher_topk: TopKTeacher | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_tokens: Tensor | int | None = None,
    ) -> KDOutput:
        """``(loss, kd_loss, ce_loss)``, 0-dim fp32 (fp64 for fp64 inputs).

        Args:
            student_hidden: ``[B, S, Ds]`` final-norm hidden states of the student.
            student_weight: ``[V_s, Ds]`` output-projection weight (same dtype); frozen
                (``requires_grad=False``): no weight gradient is computed.
            labels: ``[B, S]`` integer labels in ``[0, V_s)`` or ``ignore_index``.
            kd_ratio: weight of the KD term in ``loss``, in [0, 1].
            teacher_hidden, teacher_weight, teacher_bias: ``[B, S, Dt]``, ``[V_t, Dt]``,
                ``[V_t]``: the teacher's projection inputs; or instead
            teacher_logits: ``[B, S, V_t]`` precomputed teacher logits; or instead
            teacher_topk: a :class:`TopKTeacher` (``[B, S, k]`` rows): only its k student
                columns per chunk are gathered for the KD term.
            student_bias: optional ``[V_s]`` bias of the student's projection.
            num_tokens: divisor for ``reduction="mean"`` (global non-ignored count).
        """
        _check_kd_ratio(kd_ratio)
        hidden = _check_tensor("student_hidden", student_hidden, 3, "[batch, tokens, hidden]")
        _check_float("student_hidden", hidden)
        weight, bias = _check_projection("student", hidden, student_weight, student_bias)
        batch, tokens = hidden.shape[:2]
        labels = _check_labels(labels, batch, tokens)
        temporaries = (
            TEMPORARIES_PER_ROW
            if has_closed_form(self.divergence_name)
            else AUTOGRAD_TEMPORARIES_PER_ROW
        )
        rows = rows_per_chunk(
            batch * tokens,
            weight.shape[0],
            self.num_chunks if self.num_chunks is not None else DEFAULT_MIN_CHUNKS,
            self.chunk_size,
            self.chunk_memory_mb,
            temporaries,
        )

        def split(x: Tensor) -> list[Tensor]:
            return list(x.reshape(batch * tokens, *x.shape[2:]).split(rows))

        teacher, columns = _teacher_source(
            hidden, weight.shape[0], split, rows, self.vocab_columns,
            teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk,
        )  # fmt: skip
        student = Projection(
            hidden.reshape(batch * tokens, -1),
            weight,
            bias,
            rows,
            weight_grad_in_input_dtype=self.weight_grad_accumulation == "input_dtype",
        )
        math_ = self._chunk_math(
            teacher_topk if teacher_topk is not None else teacher, True, columns
        )
        return self._run(math_, student, teacher, labels, split(labels), kd_ratio, num_tokens)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_chunks={self.num_chunks}, "
            f"chunk_size={self.chunk_size}, chunk_memory_mb={self.chunk_memory_mb}, "
            f"weight_grad_accumulation={self.weight_grad_accumulation!r}"
        )


def fused_linear_kd_loss(
    student_hidden: Tensor, student_weight: Tensor, labels: Tensor, **kwargs: Any
) -> KDOutput:
    """:class:`FusedLinearKDLoss` as a function. ``kwargs`` holds the keywords of
    :meth:`FusedLinearKDLoss.forward` (``kd_ratio``, the teacher's tensors, ``num_tokens``, ...)
    and of its constructor (``divergence``, ``num_chunks``, ``chunk_size``, ...)."""
    tensor_keys = inspect.signature(FusedLinearKDLoss.forward).parameters
    tensors = {key: kwargs.pop(key) for key in list(kwargs) if key in tensor_keys}
    return FusedLinearKDLoss(**kwargs)(student_hidden, student_weight, labels, **tensors)


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
    if isinstance(chunked_loss, KDLoss):
        return chunked_loss.divergence_name, dict(chunked_loss.divergence_params)
    for torchtune_class, describe in _torchtune_divergences():
        if isinstance(chunked_loss, torchtune_class):
            return describe(chunked_loss)
    raise ValueError(
        f"from_chunked needs a kdtune chunked KD loss (with divergence_name) or torchtune's "
        f"ForwardKL/ReverseKL/SymmetricKLWithChunkedOutputLoss, got {type(chunked_loss).__name__}."
    )
