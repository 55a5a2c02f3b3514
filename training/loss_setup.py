"""Building the run's loss step from the config: chunked, fused, or CE only.

The losses are instantiated from their config nodes, wrapped to kdtune's contract when they
follow torchtune's (:class:`StepNormalized`), compiled when ``compile: true``, and handed to
the step that applies them (:mod:`kdtune.training.steps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune import config

from kdtune.losses import KDLoss
from kdtune.training.config.nodes import is_fused_loss
from kdtune.training.parallel import compile_backend
from kdtune.training.steps import ChunkedLossStep, FusedLossStep


def _logits_are_finite(loss: nn.Module, node: DictConfig) -> nn.Module:
    """The recipe's logits come from its models' output heads (finite), so kdtune's losses skip
    their per-chunk ``-inf`` check (a host read per chunk) unless the config sets
    ``finite_logits`` itself."""
    if isinstance(loss, KDLoss) and "finite_logits" not in node:
        loss.finite_logits = True
    return loss


def compile_loss(loss: nn.Module | None) -> nn.Module | None:
    """Compile a loss module. kdtune's losses compile their per-chunk math only (their own
    ``compile`` method; the Python chunk loop stays eager); any other loss module (torchtune's)
    is compiled whole with ``torch.compile``."""
    if loss is None:
        return None
    if type(loss).compile is not nn.Module.compile:
        loss.compile(backend=compile_backend())
        return loss
    return torch.compile(loss, backend=compile_backend())


class StepNormalized(nn.Module):
    """A loss in torchtune's contract (the mean over its micro-batch's target tokens) in
    kdtune's (the micro-batch's token sum divided by the step's count ``num_tokens``): its value
    times the micro-batch's target count over ``num_tokens``. The gradient is that of the token
    sum over the step's count, as for kdtune's own losses.

    Forward: the wrapped loss's positional arguments, ``labels`` ``[B, S]`` (shifted) last,
    and ``num_tokens`` (0-dim). An all-ignored micro-batch contributes an exact 0.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.ignore_index = loss.ignore_index
        self.num_output_chunks = loss.num_output_chunks

    def forward(self, *args: Any, num_tokens: Tensor) -> Tensor:
        count = (args[-1] != self.ignore_index).sum()
        mean = self.loss(*args)
        return torch.where(count > 0, mean * count, torch.zeros_like(mean)) / num_tokens


def _step_normalized(loss: nn.Module | None) -> nn.Module | None:
    if loss is None or isinstance(loss, KDLoss):  # kdtune's losses take num_tokens
        return loss
    return StepNormalized(loss)


@dataclass(frozen=True)
class LossSetup:
    """The built loss step and the options the rest of the run reads from the built losses."""

    step: ChunkedLossStep | FusedLossStep
    fused: bool
    ignore_index: int
    num_chunks: int  # sequence chunks of the logits (validation uses the same)


def build_loss_step(cfg: DictConfig, student: nn.Module, teacher: nn.Module | None) -> LossSetup:
    """Instantiate the losses of ``cfg`` (fused: ``kd_loss`` alone; chunked: ``loss`` and
    ``kd_loss``, or CE alone without a teacher) and the step that applies them. For the chunked
    path both models are set to return their logits in the losses' number of chunks."""
    kd_ratio = float(cfg.kd_ratio)
    if is_fused_loss(cfg.kd_loss):
        fused_loss = _logits_are_finite(config.instantiate(cfg.kd_loss), cfg.kd_loss)
        if cfg.compile:
            compile_loss(fused_loss)
        return LossSetup(
            FusedLossStep(fused_loss, kd_ratio),
            fused=True,
            ignore_index=fused_loss.ignore_index,
            num_chunks=fused_loss.num_chunks or 8,  # validation's chunks: torchtune's count
        )
    ce_loss = _step_normalized(_logits_are_finite(config.instantiate(cfg.loss), cfg.loss))
    kd_loss = None
    if cfg.kd_loss is not None:
        kd_loss = _logits_are_finite(config.instantiate(cfg.kd_loss), cfg.kd_loss)
    kd_loss = _step_normalized(kd_loss)
    student.set_num_output_chunks(ce_loss.num_output_chunks)
    if teacher is not None:
        teacher.set_num_output_chunks(ce_loss.num_output_chunks)
    ignore_index, num_chunks = ce_loss.ignore_index, ce_loss.num_output_chunks
    if cfg.compile:
        ce_loss, kd_loss = compile_loss(ce_loss), compile_loss(kd_loss)
    return LossSetup(
        ChunkedLossStep(ce_loss, kd_loss, kd_ratio),
        fused=False,
        ignore_index=ignore_index,
        num_chunks=num_chunks,
    )
