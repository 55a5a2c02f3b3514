"""The loss variants the benchmarks compare, each as one forward + backward "step".

Every variant starts from the same inputs: the student's final-norm hidden states
``[1, S, D]`` (requires grad), its output weight ``[V, D]`` (trainable or frozen), the teacher's
hidden states and weight, and labels. Each builds its logits (or not) its own way:

- ``full``: full logits, ``F.linear(h, W).float()`` as torchtune's ``unembed`` does, and the
  plain reference loss of ``tests/test_fused.py`` (the tests' reference; imported by path so
  the two stay in sync).
- ``torchtune_chunked``: torchtune's chunked head (``model.set_num_output_chunks(8)``:
  ``[output(c) for c in h.chunk(8, dim=1)]``) with ``ForwardKLWithChunkedOutputLoss(8)`` and
  ``CEWithChunkedOutputLoss(8)``, mixed as torchtune's KD recipe does.
- ``kdtune_chunked``: the same student chunks, the teacher's chunks as kdtune's recipe forms them
  (2-D matmuls, ``kdtune.training.lm_head.chunked_logits``), and kdtune's forward KL, KD and CE
  of each chunk from one engine call (``kd_and_ce``, as the recipe's chunked step does).
- ``kdtune_fused``: :class:`kdtune.losses.fused.FusedLinearKDLoss` on the hidden states, with
  its default chunking (rows from the memory budget) unless ``--chunk-size`` is given.
- ``kdtune_fused_lowp``: the same with ``weight_grad_accumulation="input_dtype"`` (a bf16
  weight's gradient summed in bf16 over the chunks, as Liger and the floor do; same as
  ``kdtune_fused`` for fp32).
- ``kdtune_topk``: the fused loss with a cached sparse teacher (``TopKTeacher``, k = 128, built
  once before timing): no teacher matmul in the step, k student columns gathered per chunk.
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0,
  weight_soft_loss=1)`` (forward KL, no CE term), eager PyTorch (``compiled=False``).
- ``floor``: only the matmuls the fused loss must do, in the input dtype, chunk by chunk: the
  student and teacher logits, the hidden-state gradient and (trainable weight) the weight
  gradient. Nothing else; a lower bound on time for any exact method.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

VARIANTS = (
    "full",
    "torchtune_chunked",
    "kdtune_chunked",
    "kdtune_fused",
    "kdtune_fused_lowp",
    "kdtune_topk",
    "liger",
    "floor",
)
KD_RATIO = 0.5
TORCHTUNE_CHUNKS = 8
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inputs:
    student_hidden: Tensor  # [1, S, D], requires grad
    student_weight: Tensor  # [V, D], requires grad when trainable
    teacher_hidden: Tensor  # [1, S, Dt]
    teacher_weight: Tensor  # [V, Dt]
    labels: Tensor  # [1, S]

    def clear_grads(self) -> None:
        self.student_hidden.grad = None
        self.student_weight.grad = None


def make_inputs(
    seq: int,
    vocab: int,
    hidden: int,
    teacher_hidden: int,
    dtype: torch.dtype,
    trainable: bool,
    device: str = "cpu",
) -> Inputs:
    """Seeded inputs at typical magnitudes (unit hidden states, 0.02-scaled weights)."""
    g = torch.Generator(device=device).manual_seed(0)  # drawn where they live: no copies

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    labels = torch.randint(0, vocab, (1, seq), generator=g, device=device)
    labels[:, : seq // 10] = -100  # a prompt-like ignored prefix
    return Inputs(
        student_hidden=randn(1, seq, hidden).requires_grad_(),
        student_weight=randn(vocab, hidden, scale=0.02).requires_grad_(trainable),
        teacher_hidden=randn(1, seq, teacher_hidden),
        teacher_weight=randn(vocab, teacher_hidden, scale=0.02),
        labels=labels,
    )


def load_test_reference() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """``reference_losses`` of tests/test_fused.py, loaded by path (tests are no package)."""
    path = REPO / "tests" / "test_fused.py"
    spec = importlib.util.spec_from_file_location("_kdtune_test_fused_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_losses


def _chunked_head(hidden: Tensor, weight: Tensor) -> list[Tensor]:
    """torchtune's ``TransformerDecoder.chunked_output``: logits in the model dtype."""
    return [F.linear(chunk, weight) for chunk in hidden.chunk(TORCHTUNE_CHUNKS, dim=1)]


def _chunked_head_2d(hidden: Tensor, weight: Tensor) -> list[Tensor]:
    """The same chunks as kdtune's recipe forms the teacher's (``lm_head.chunked_logits``): each
    chunk projected as a 2-D ``[B * S_i, D]`` matrix (on CPU a no-grad bf16 3-D ``F.linear`` runs
    as a batched matmul about 30x slower)."""
    return [
        F.linear(chunk.reshape(-1, chunk.shape[-1]), weight).view(*chunk.shape[:-1], -1)
        for chunk in hidden.chunk(TORCHTUNE_CHUNKS, dim=1)
    ]


def full_step(inputs: Inputs, rows: int) -> Callable[[], Tensor]:
    reference_losses = load_test_reference()

    def step() -> Tensor:
        student = F.linear(inputs.student_hidden, inputs.student_weight).float()
        with torch.no_grad():
            teacher = F.linear(inputs.teacher_hidden, inputs.teacher_weight).float()
        loss, _, _ = reference_losses(student, teacher, inputs.labels, kd_ratio=KD_RATIO)
        loss.backward()
        return loss.detach()

    return step


def _chunked_head_step(
    inputs: Inputs, ce_fn: torch.nn.Module, kd_fn: torch.nn.Module
) -> Callable[[], Tensor]:
    """One forward+backward of the chunked head with a chunked CE and KD loss pair."""

    def step() -> Tensor:
        student = _chunked_head(inputs.student_hidden, inputs.student_weight)
        with torch.no_grad():
            teacher = _chunked_head(inputs.teacher_hidden, inputs.teacher_weight)
        loss = (1 - KD_RATIO) * ce_fn(student, inputs.labels) + KD_RATIO * kd_fn(
            student, teacher, inputs.labels
        )
        loss.backward()
        return loss.detach()

    return step


def torchtune_chunked_step(inputs: Inputs, rows: int) -> Callable[[], Tensor]:
    from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss

    return _chunked_head_step(
        inputs,
        CEWithChunkedOutputLoss(TORCHTUNE_CHUNKS),
        ForwardKLWithChunkedOutputLoss(TORCHTUNE_CHUNKS),
    )


def kdtune_chunked_step(inputs: Inputs, rows: int) -> Callable[[], Tensor]:
    """The same chunked head; KD and CE of every chunk from one engine call (``kd_and_ce``)."""
    from kdtune.losses.chunked import ForwardKLWithChunkedOutputLoss

    loss_fn = ForwardKLWithChunkedOutputLoss(TORCHTUNE_CHUNKS)

    def step() -> Tensor:
        student = _chunked_head(inputs.student_hidden, inputs.student_weight)
        with torch.no_grad():  # the teacher's chunks as kdtune's recipe forms them
            teacher = _chunked_head_2d(inputs.teacher_hidden, inputs.teacher_weight)
        loss = loss_fn.kd_and_ce(student, teacher, inputs.labels, kd_ratio=KD_RATIO).loss
        loss.backward()
        return loss.detach()

    return step


def _fused_step(
    inputs: Inputs, rows: int, accumulation: str = "fp32", **teacher: object
) -> Callable[[], Tensor]:
    """``FusedLinearKDLoss`` (forward KL + CE), default chunking unless ``rows``."""
    from kdtune.losses.fused import FusedLinearKDLoss

    loss_fn = FusedLinearKDLoss(
        "forward_kl", chunk_size=rows or None, weight_grad_accumulation=accumulation
    )

    def step() -> Tensor:
        out = loss_fn(
            inputs.student_hidden,
            inputs.student_weight,
            inputs.labels,
            kd_ratio=KD_RATIO,
            **teacher,
        )
        out.loss.backward()
        return out.loss.detach()

    return step


def kdtune_fused_step(inputs: Inputs, rows: int) -> Callable[[], Tensor]:
    """``FusedLinearKDLoss`` with its defaults (rows from the memory budget) unless ``rows``."""
    teacher = {"teacher_hidden": inputs.teacher_hidden, "teacher_weight": inputs.teacher_weight}
    return _fused_step(inputs, rows, **teacher)


def kdtune_fused_lowp_step(inputs: Inputs, rows: int) -> Callable[[], Tensor]:
    """As ``kdtune_fused``, the weight gradient summed in the weight's dtype."""
    teacher = {"teacher_hidden": inputs.teacher_hidden, "teacher_weight": inputs.teacher_weight}
    return _fused_step(inputs, rows, "input_dtype", **teacher)


TOPK = 128


def kdtune_topk_step(inputs: Inputs, rows: int) -> Callable[[], Tensor]:
    from kdtune.losses import TopKTeacher

    with torch.no_grad():  # what the cache would hold, built chunk by chunk
        ids, values, rest = [], [], []
        for hidden in inputs.teacher_hidden.split(1024, dim=1):
            log_p = torch.log_softmax(F.linear(hidden, inputs.teacher_weight).float(), -1)
            top, index = log_p.topk(TOPK, dim=-1)
            ids.append(index)
            values.append(top)
            rest.append(torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6)))
    teacher = TopKTeacher(torch.cat(ids, 1), torch.cat(values, 1), torch.cat(rest, 1))
    return _fused_step(inputs, rows, teacher_topk=teacher)


def liger_step(inputs: Inputs, rows: int) -> Callable[[], Tensor]:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False
    )
    dim, teacher_dim = inputs.student_hidden.shape[-1], inputs.teacher_hidden.shape[-1]

    def step() -> Tensor:
        loss = loss_fn(
            inputs.student_hidden.view(-1, dim),
            inputs.student_weight,
            inputs.teacher_hidden.view(-1, teacher_dim),
            inputs.teacher_weight,
            inputs.labels.view(-1),
        )
        loss.backward()
        return loss.detach()

    return step


def floor_step(inputs: Inputs, rows: int) -> Callable[[], Tensor]:
    """The four matmuls of the fused loss, chunk by chunk, in the input dtype (no loss math).

    ``rows`` 0: the fused loss's default rows per chunk for these shapes.
    """
    from kdtune.losses.engine import rows_per_chunk

    seq, vocab = inputs.student_hidden.shape[1], inputs.student_weight.shape[0]
    rows = rows or rows_per_chunk(seq, vocab)
    hidden = inputs.student_hidden.detach().view(-1, inputs.student_hidden.shape[-1])
    teacher_hidden = inputs.teacher_hidden.view(-1, inputs.teacher_hidden.shape[-1])
    weight, teacher_weight = inputs.student_weight.detach(), inputs.teacher_weight
    trainable = inputs.student_weight.requires_grad

    def step() -> Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if trainable else None
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden[start : start + rows]
            logits = chunk @ weight.t()  # stands in for the logit gradient below
            teacher_logits = teacher_hidden[start : start + rows] @ teacher_weight.t()
            torch.mm(logits, weight, out=grad_hidden[start : start + rows])
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), chunk)
            del logits, teacher_logits
        inputs.student_hidden.grad = grad_hidden.view_as(inputs.student_hidden)
        if grad_weight is not None:
            inputs.student_weight.grad = grad_weight
        return grad_hidden[0, 0].float()

    return step


STEPS: dict[str, Callable[[Inputs, int], Callable[[], Tensor]]] = {
    "full": full_step,
    "torchtune_chunked": torchtune_chunked_step,
    "kdtune_chunked": kdtune_chunked_step,
    "kdtune_fused": kdtune_fused_step,
    "kdtune_fused_lowp": kdtune_fused_lowp_step,
    "kdtune_topk": kdtune_topk_step,
    "liger": liger_step,
    "floor": floor_step,
}


def unavailable_reason(variant: str) -> str | None:
    """Why a variant cannot run here (a missing optional package), or None."""
    if variant == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed (pip install 'kdtune[bench]')"
    if variant == "kdtune_chunked" and importlib.util.find_spec("kdtune.losses.chunked") is None:
        return "kdtune.losses.chunked not present"
    return None
