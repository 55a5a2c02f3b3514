"""One chunk's loss value and its gradients, computed eagerly in fp32.

The chunked and fused losses call this inside their autograd ``forward``: the chunk's logits
are upcast, the loss and its gradients are formed, and only the gradients leave (cast back by
the caller). Nothing vocabulary-sized is kept for a later backward, which is where torchtune's
chunked loss spends its memory (every chunk's fp32 softmax intermediates live until backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ChunkLoss = Callable[[Tensor, Tensor], Tensor]
"""``(student_logits_fp32 [N, V], teacher_logits_fp32 [N, V]) -> scalar sum over the chunk``."""


def upcast(logits: Tensor) -> Tensor:
    """A detached copy of ``logits`` in fp32, or fp64 when they already are (never a downcast)."""
    return logits.detach().to(torch.promote_types(logits.dtype, torch.float32))


def chunk_value_and_grads(
    chunk_loss: ChunkLoss,
    student_logits: Tensor,
    teacher_logits: Tensor,
    teacher_needs_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Evaluate ``chunk_loss`` on fp32 copies of one chunk and return its gradients.

    Args:
        chunk_loss: maps fp32 ``[N, V]`` student and teacher logits to a scalar sum.
        student_logits: ``[N, V]`` in any float dtype (upcast here, one chunk at a time, to fp32;
            fp64 stays fp64 so that ``torch.autograd.gradcheck`` can check the losses).
        teacher_logits: ``[N, V]`` in any float dtype.
        teacher_needs_grad: also return the gradient with respect to the teacher logits.

    Returns:
        ``(value, grad_student, grad_teacher)``: the fp32 (fp64 for fp64 input) scalar value
        (detached), the ``[N, V]`` gradient with respect to the student logits in that dtype,
        and the teacher's gradient (same dtype, ``[N, V]``) or ``None``.
    """
    with torch.enable_grad():
        student = upcast(student_logits).requires_grad_(True)
        teacher = upcast(teacher_logits).requires_grad_(teacher_needs_grad)
        value = chunk_loss(student, teacher)
        inputs = (student, teacher) if teacher_needs_grad else (student,)
        grads = torch.autograd.grad(value, inputs)
    grad_teacher = grads[1] if teacher_needs_grad else None
    return value.detach(), grads[0], grad_teacher
