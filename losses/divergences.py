"""Per-token divergences between a teacher and a student distribution over the vocabulary.

Every function here takes fp32 logits of shape ``[N, V]`` (N tokens, V vocabulary entries),
already divided by the temperature, and returns the divergence of each token, shape ``[N]``.
``p`` is the teacher distribution ``softmax(teacher_logits)``, ``q`` the student's.
Chunking, ignored labels, temperature and normalisation are the caller's business
(:mod:`kdtune.losses.chunked`, :mod:`kdtune.losses.fused`).

Masked vocabulary (``-inf`` logits). Values follow ``0 * log 0 = 0``, so a column where both
models put ``-inf`` contributes exactly 0 to every divergence. Only forward KL and reverse KL can
be infinite: forward KL when the teacher puts mass on a column the student masks, reverse KL
when the student puts mass on a column the teacher masks. Such a column is dropped from the sum
(it contributes 0), as torchtune's KD losses do, so the loss stays finite and its gradient
never holds NaN. Mixture divergences (JSD, skew KL) and total variation are finite everywhere
and need no such rule. ``+inf`` and NaN logits are not supported.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

PerTokenDivergence = Callable[[Tensor, Tensor], Tensor]


def _plogp_over(log_p: Tensor, log_other: Tensor, zero_where: Tensor) -> Tensor:
    """``sum_v p_v * (log p_v - log other_v)`` per row, with the columns in ``zero_where`` giving 0.

    Both logs are replaced by 0 in those columns *before* subtracting, so neither the value nor
    the gradient ever forms ``0 * inf`` (a ``torch.where`` after the fact would still let NaN into
    the gradient). Shapes: ``[N, V]`` in, ``[N]`` out.
    """
    p = log_p.exp()
    diff = log_p.masked_fill(zero_where, 0.0) - log_other.masked_fill(zero_where, 0.0)
    return (p * diff).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float, dead: Tensor) -> Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)`` for ``0 < weight_a < 1``, shape ``[N, V]``.

    Columns in ``dead`` (``-inf`` in both) are computed from 0 instead, since ``logaddexp`` of two
    ``-inf`` has a NaN gradient; every caller zeroes those columns anyway.
    """
    return torch.logaddexp(
        log_a.masked_fill(dead, 0.0) + math.log(weight_a),
        log_b.masked_fill(dead, 0.0) + math.log1p(-weight_a),
    )


def _masks(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean ``[N, V]`` masks of the student's and the teacher's ``-inf`` columns."""
    return torch.isneginf(student_logits), torch.isneginf(teacher_logits)


def _connected_zeros(student_logits: Tensor) -> Tensor:
    """Zeros of shape ``[N]`` that stay on the student's autograd graph (``-inf`` safe)."""
    return 0.0 * student_logits.masked_fill(torch.isneginf(student_logits), 0.0).sum(dim=-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(p || q) per token: ``sum_v p_v (log p_v - log q_v)``. ``[N, V]`` -> ``[N]``.

    The gradient with respect to the student logits is ``q - p`` (finite logits), the same as
    the teacher-student cross-entropy that torchtune's ``ForwardKLLoss`` reports, whose value is
    larger by the teacher's entropy.
    """
    student_masked, teacher_masked = _masks(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    return _plogp_over(log_p, log_q, student_masked | teacher_masked)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(q || p) per token: ``sum_v q_v (log q_v - log p_v)``. ``[N, V]`` -> ``[N]``."""
    student_masked, teacher_masked = _masks(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    return _plogp_over(log_q, log_p, student_masked | teacher_masked)


def symmetric_kl(student_logits: Tensor, teacher_logits: Tensor, ratio: float = 0.5) -> Tensor:
    """``ratio * KL(p || q) + (1 - ratio) * KL(q || p)`` per token (torchtune's ``sym_kd_ratio``).

    ``ratio=1`` is forward KL, ``ratio=0`` reverse KL. ``[N, V]`` -> ``[N]``.
    """
    student_masked, teacher_masked = _masks(student_logits, teacher_logits)
    either = student_masked | teacher_masked
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    return ratio * _plogp_over(log_p, log_q, either) + (1.0 - ratio) * _plogp_over(
        log_q, log_p, either
    )


def _kl_to_mixture(
    log_a: Tensor, log_b: Tensor, weight_a: float, a_masked: Tensor, dead: Tensor
) -> Tensor:
    """KL(a || weight_a * a + (1 - weight_a) * b) per row for ``0 < weight_a < 1``; ``[N]``."""
    return _plogp_over(log_a, _log_mixture(log_a, log_b, weight_a, dead), a_masked)


def jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence per token, ``[N, V]`` -> ``[N]``.

    With ``m = beta * p + (1 - beta) * q``: ``beta * KL(p || m) + (1 - beta) * KL(q || m)``, the
    convention of GKD (Agarwal et al., 2024), TRL and Liger-Kernel. ``beta=0`` is defined as
    forward KL and ``beta=1`` as reverse KL (the same end points as Liger-Kernel's
    ``LigerFusedLinearJSDLoss``); near the ends, ``jsd / beta -> KL(p || q)`` as ``beta -> 0`` and
    ``jsd / (1 - beta) -> KL(q || p)`` as ``beta -> 1``.
    """
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    student_masked, teacher_masked = _masks(student_logits, teacher_logits)
    dead = student_masked & teacher_masked
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    log_m = _log_mixture(log_p, log_q, beta, dead)
    return beta * _plogp_over(log_p, log_m, teacher_masked) + (1.0 - beta) * _plogp_over(
        log_q, log_m, student_masked
    )


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al., 2024): ``KL(p || alpha * p + (1 - alpha) * q)``.

    ``alpha=0`` is forward KL, ``alpha=1`` is 0. ``[N, V]`` -> ``[N]``.
    """
    if alpha == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if alpha == 1.0:
        return _connected_zeros(student_logits)
    student_masked, teacher_masked = _masks(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    return _kl_to_mixture(log_p, log_q, alpha, teacher_masked, student_masked & teacher_masked)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): ``KL(q || alpha * q + (1 - alpha) * p)``.

    ``alpha=0`` is reverse KL, ``alpha=1`` is 0. ``[N, V]`` -> ``[N]``.
    """
    if alpha == 0.0:
        return reverse_kl(student_logits, teacher_logits)
    if alpha == 1.0:
        return _connected_zeros(student_logits)
    student_masked, teacher_masked = _masks(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    return _kl_to_mixture(log_q, log_p, alpha, student_masked, student_masked & teacher_masked)


def total_variation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Total variation distance per token: ``0.5 * sum_v |p_v - q_v|``. ``[N, V]`` -> ``[N]``."""
    q = F.softmax(student_logits, dim=-1)
    p = F.softmax(teacher_logits, dim=-1)
    return 0.5 * (p - q).abs().sum(dim=-1)


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}.")


def get_divergence(name: str, **params: float) -> PerTokenDivergence:
    """The per-token divergence called ``name`` with its parameters bound.

    Names and parameters: ``forward_kl``, ``reverse_kl``, ``symmetric_kl(ratio)``, ``jsd(beta)``,
    ``skew_forward_kl(alpha)``, ``skew_reverse_kl(alpha)``, ``total_variation``.
    Raises ``ValueError`` for an unknown name, an unknown parameter or one outside [0, 1].
    """
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {name!r}; expected one of {sorted(DIVERGENCES)}.")
    fn, allowed = DIVERGENCES[name]
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(
            f"Divergence {name!r} takes parameters {sorted(allowed) or 'none'}, "
            f"got unexpected {sorted(unknown)}."
        )
    for key, value in params.items():
        _check_unit_interval(key, value)
    return partial(fn, **params) if params else fn


DIVERGENCES: dict[str, tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    "forward_kl": (forward_kl, ()),
    "reverse_kl": (reverse_kl, ()),
    "symmetric_kl": (symmetric_kl, ("ratio",)),
    "jsd": (jsd, ("beta",)),
    "skew_forward_kl": (skew_forward_kl, ("alpha",)),
    "skew_reverse_kl": (skew_reverse_kl, ("alpha",)),
    "total_variation": (total_variation, ()),
}


def resolved_params(name: str, params: dict[str, float]) -> dict[str, float]:
    """``params`` of divergence ``name`` with its defaults filled in (validated)."""
    get_divergence(name, **params)
    fn, allowed = DIVERGENCES[name]
    defaults = {
        key: value.default
        for key, value in inspect.signature(fn).parameters.items()
        if key in allowed
    }
    return {**defaults, **params}
