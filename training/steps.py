"""The loss of one micro-batch, for the chunked and the fused paths.

Both compute ``(1 - kd_ratio) * CE + kd_ratio * KD`` where each term is a *sum over the
micro-batch's tokens divided by the optimizer step's token count* (``num_tokens``: every
non-ignored target of every micro-batch of the step, on every rank). Back-propagating each
micro-batch's loss therefore accumulates exactly the gradient of the whole step's mean loss:
no rescaling afterwards, and no second division (torchtune's KD recipes divide by the
micro-batch count inside the loss and by the step count again).

Labels passed in are already shifted (:func:`kdtune.training.data.shift_labels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchtune import config

from kdtune.losses import ChunkedKDLoss, TopKTeacher
from kdtune.training import parallel
from kdtune.training.guard import NonFiniteGuard, step_is_finite
from kdtune.training.lm_head import (
    chunked_logits,
    forward_hidden,
    output_projection,
    release_output_projection,
)


@dataclass
class MicroBatchLoss:
    """One micro-batch's contribution to the step loss.

    ``loss`` is differentiable; ``ce`` and ``kd`` are detached 0-dim tensors (``kd`` is None
    without a teacher). All three are already divided by the step's token count, so summing
    them over the step's micro-batches gives the step's mean losses.
    """

    loss: Tensor
    ce: Tensor
    kd: Tensor | None


class ChunkedLossStep:
    """Both models return their logits as a list of chunks; chunked CE and KD losses.

    With a kdtune chunked KD loss (:class:`~kdtune.losses.ChunkedKDLoss`) both terms of every chunk come from one engine
    call (one upcast and one student log-softmax per chunk, one gradient kept); any other KD
    loss module (e.g. torchtune's) is called beside the CE loss.
    """

    def __init__(self, ce_loss: nn.Module, kd_loss: nn.Module | None, kd_ratio: float) -> None:
        self.ce_loss = ce_loss
        self.kd_loss = kd_loss
        self.kd_ratio = kd_ratio

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module | TopKTeacher | None,
        tokens: Tensor,
        labels: Tensor,
        num_tokens: Tensor,
        **model_kwargs: Any,
    ) -> MicroBatchLoss:
        """``tokens``, ``labels``: ``[B, S]``; ``num_tokens``: 0-dim step token count;
        ``model_kwargs``: passed to both models' forward (a packed batch's mask, input_pos)."""
        # list of [B, S_i, V] chunks, each projected as a 2-D matrix (a frozen head's 3-D
        # chunks would run as a batched matmul over a per-row copy of the weight)
        student_logits = chunked_logits(student, tokens, **model_kwargs)
        if isinstance(teacher, TopKTeacher):  # cached top-k rows (kdtune.teacher_cache)
            teacher_logits = teacher
        elif teacher is not None:
            with torch.no_grad():
                teacher_logits = chunked_logits(teacher, tokens, **model_kwargs)
        if teacher is not None and isinstance(self.kd_loss, ChunkedKDLoss):
            out = self.kd_loss.kd_and_ce(
                student_logits,
                teacher_logits,
                labels,
                kd_ratio=self.kd_ratio,
                num_tokens=num_tokens,
            )
            return MicroBatchLoss(loss=out.loss, ce=out.ce_loss, kd=out.kd_loss)
        if self.kd_ratio == 1.0:
            with torch.no_grad():  # logged only: no backward through a term weighted 0
                ce = self.ce_loss(student_logits, labels, num_tokens=num_tokens)
        else:
            ce = self.ce_loss(student_logits, labels, num_tokens=num_tokens)
        if teacher is None:
            return MicroBatchLoss(loss=ce, ce=ce.detach(), kd=None)
        kd = self.kd_loss(student_logits, teacher_logits, labels, num_tokens=num_tokens)
        loss = (1.0 - self.kd_ratio) * ce + self.kd_ratio * kd
        return MicroBatchLoss(loss=loss, ce=ce.detach(), kd=kd.detach())


class FusedLossStep:
    """Hidden states and output weights go into the fused loss; no logits are materialised."""

    def __init__(self, fused_loss: nn.Module, kd_ratio: float) -> None:
        self.fused_loss = fused_loss
        self.kd_ratio = kd_ratio

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module | TopKTeacher | None,
        tokens: Tensor,
        labels: Tensor,
        num_tokens: Tensor,
        **model_kwargs: Any,
    ) -> MicroBatchLoss:
        """``tokens``, ``labels``: ``[B, S]``; ``num_tokens``: 0-dim step token count;
        ``model_kwargs``: passed to both models' forward (a packed batch's mask, input_pos)."""
        student_hidden = forward_hidden(student, tokens, **model_kwargs)  # [B, S, D_s]
        student_weight, student_bias = output_projection(student)  # [V_s, D_s]
        if isinstance(teacher, TopKTeacher):  # cached top-k rows (kdtune.teacher_cache)
            out = self.fused_loss(
                student_hidden,
                student_weight,
                labels,
                kd_ratio=self.kd_ratio,
                teacher_topk=teacher,
                student_bias=student_bias,
                num_tokens=num_tokens,
            )
            return MicroBatchLoss(loss=out.loss, ce=out.ce_loss.detach(), kd=out.kd_loss.detach())
        with torch.no_grad():
            teacher_hidden = forward_hidden(teacher, tokens, **model_kwargs)  # [B, S, D_t]
            teacher_weight, teacher_bias = output_projection(teacher)  # [V_t, D_t]
        if teacher_bias is not None:
            raise ValueError("the fused loss does not support a teacher output bias")
        out = self.fused_loss(
            student_hidden,
            student_weight,
            labels,
            kd_ratio=self.kd_ratio,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            student_bias=student_bias,
            num_tokens=num_tokens,
        )
        release_output_projection(teacher)  # the teacher has no backward to reshard it (FSDP2)
        return MicroBatchLoss(loss=out.loss, ce=out.ce_loss.detach(), kd=out.kd_loss.detach())


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    *,
    max_norm: float | None,
    guard: NonFiniteGuard,
    loss_sums: Tensor,
    has_targets: bool = True,
) -> tuple[Tensor, float, bool]:
    """Clip (if ``max_norm``), step the optimizer unless the guard skips this step, zero the
    gradients, step the scheduler (also for a skipped step: the schedule follows the step
    count, as a resumed run rebuilds it).

    Args:
        loss_sums: ``[3]``, the step's summed losses over ranks (a rank's NaN is in the sum).
        has_targets: False for a step without a target token on any rank: its update is left
            out (zero gradients would still move the weights through momentum and decay).

    Returns:
        The pre-clip gradient norm (0-dim, on the device; the same on every rank: it covers
        every rank's shards), the learning rate of the step (first parameter group's, before
        the scheduler steps) and whether the update was skipped (no target, or
        ``on_non_finite: skip``, which costs one host read per step).
    """
    lr = optimizer.param_groups[0]["lr"]
    grad_norm = parallel.clip_grad_norm_(
        model, max_norm=float(max_norm) if max_norm is not None else math.inf
    )
    skipped = not has_targets or (
        guard.skips and guard.skip_update(step_is_finite(loss_sums, grad_norm))
    )
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return grad_norm, lr, skipped


def build_lr_scheduler(
    node: Any, optimizer: torch.optim.Optimizer, total_steps: int, global_step: int
) -> Any:
    """The ``lr_scheduler`` node's scheduler (None without one), positioned after
    ``global_step`` steps (a resumed run continues the schedule)."""
    if node is None:
        return None
    return config.instantiate(
        node, optimizer, num_training_steps=total_steps, last_epoch=global_step - 1
    )
