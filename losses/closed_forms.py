"""Closed-form divergences and their gradients: the fast path of the chunk objective.

Each function here is the closed form of one reference divergence of
:mod:`kdtune.losses.divergences` and is registered beside it there (``Divergence.closed_form``).
It takes one chunk of finite fp32 (fp64) log-probabilities and probabilities of the tempered
student (``log_q``, ``q``) and teacher (``log_p``, ``p``), each ``[n, V]``, and returns
``(value [n], G_s [n, V] | None, G_t [n, V] | None)``: the per-token divergence and its
gradient with respect to the tempered student (``want_s``) and teacher (``want_t``) logits,
formed in the same pass with in-place updates. ``log_q``/``log_p`` are scratch (overwritten);
``q``/``p`` are never written.

- forward KL ``KL(p || q)``: ``G_s = q - p``, ``G_t = p (log p - log q - KL)``.
- reverse KL ``KL(q || p)``: ``G_s = q (log q - log p - KL)``, ``G_t = p - q``.
- symmetric KL ``r KL(p || q) + (1 - r) KL(q || p)``: the weighted sum of the two.
- JSD(beta) with ``m = beta p + (1 - beta) q``: ``G_s = (1 - beta) q (log q - log m - KL(q || m))``
  and ``G_t = beta p (log p - log m - KL(p || m))``.
- skew KL ``KL(a || alpha a + (1 - alpha) b)`` with ``w = (1 - alpha) b / m``:
  ``G_a = a (log a - log m - KL + w - <a, w>)``, ``G_b = b <a, w> - a w``.
- total variation ``0.5 sum |p - q|`` with ``g = sign(q - p)``: ``G_s = 0.5 q (g - <q, g>)``,
  ``G_t = 0.5 p (<p, g> - g)``.

``log m`` is formed as ``log a - softplus(...)`` from the log-probabilities, never as the log of a
sum of probabilities, so it stays finite where both probabilities underflow. The closed forms
assume finite logits; a divergence without one is differentiated by autograd of its reference
(:func:`kdtune.losses._math.divergence_by_autograd`), and tests/test_divergence_registry.py
checks every closed form against that fallback.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ClosedFormResult = tuple[Tensor, Tensor | None, Tensor | None]


def rowdot(a: Tensor, b: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``sum_v a[n, v] * b[n, v]`` per row, ``[n, V]`` x2 -> ``[n]``, without a new ``[n, V]``
    temporary: the products go to ``scratch`` (overwritten; 3x faster than the batched
    matrix-vector product used without one)."""
    if scratch is None:
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return torch.mul(a, b, out=scratch).sum(-1)


def col(x: Tensor) -> Tensor:
    """``[n]`` -> ``[n, 1]``, to scale the rows of an ``[n, V]`` tensor."""
    return x.unsqueeze(-1)


def _softplus(x: Tensor, out: Tensor) -> Tensor:
    """``F.softplus(x)`` (same kernel and values) written into ``out`` (``x`` itself allowed):
    a new ``[n, V]`` buffer here would be one more than the chunk budget counts
    (``TEMPORARIES_PER_ROW``). ``torch._C._nn.softplus`` is the out= form behind ``F.softplus``."""
    return torch._C._nn.softplus(x, 1.0, 20.0, out=out)


# ------------------------------------------------------------------------------------------------
# Building blocks on (log_a, a, log_b, b); each may overwrite log_a/log_b, never a/b.


def _kl(log_a: Tensor, a: Tensor, log_b: Tensor, b: Tensor, want_a: bool, want_b: bool):
    """``KL(a || b)``: ``(value, G_a, G_b)``."""
    diff = log_a.sub_(log_b)
    value = rowdot(a, diff, scratch=log_b)
    grad_b = torch.sub(b, a, out=log_b) if want_b else None
    grad_a = diff.sub_(col(value)).mul_(a) if want_a else None
    return value, grad_a, grad_b


def _skew(log_a, a, log_b, b, alpha: float, want_a: bool, want_b: bool):
    """``KL(a || alpha a + (1 - alpha) b)`` for ``0 < alpha < 1``: ``(value, G_a, G_b)``."""
    log_alpha, log_rest = math.log(alpha), math.log1p(-alpha)
    x = log_b.sub_(log_a).add_(log_rest - log_alpha)
    log_a_over_m = _softplus(x, out=log_a).add_(log_alpha).neg_()  # log a - log m
    value = rowdot(a, log_a_over_m)
    w = x.add_(log_alpha).add_(log_a_over_m).exp_()  # (1 - alpha) b / m, in [0, 1]
    a_w = rowdot(a, w)
    grad_a = log_a_over_m.add_(w).sub_(col(value + a_w)).mul_(a) if want_a else None
    grad_b = w.mul_(a).neg_().addcmul_(b, col(a_w)) if want_b else None
    return value, grad_a, grad_b


def _zeros(q: Tensor, p: Tensor, want_s: bool, want_t: bool) -> ClosedFormResult:
    return (
        torch.zeros_like(q[:, 0]),
        torch.zeros_like(q) if want_s else None,
        torch.zeros_like(p) if want_t else None,
    )


# ------------------------------------------------------------------------------------------------
# The closed forms, one per reference divergence: (log_q, q, log_p, p, want_s, want_t, **params)


def forward_kl(log_q, q, log_p, p, want_s: bool, want_t: bool) -> ClosedFormResult:
    """``KL(p || q)``."""
    value, grad_t, grad_s = _kl(log_p, p, log_q, q, want_t, want_s)
    return value, grad_s, grad_t


def reverse_kl(log_q, q, log_p, p, want_s: bool, want_t: bool) -> ClosedFormResult:
    """``KL(q || p)``."""
    return _kl(log_q, q, log_p, p, want_s, want_t)


def symmetric_kl(log_q, q, log_p, p, want_s, want_t, ratio: float = 0.5) -> ClosedFormResult:
    """``ratio KL(p || q) + (1 - ratio) KL(q || p)``."""
    diff = log_p.sub_(log_q)
    forward, reverse = rowdot(p, diff), -rowdot(q, diff)
    value = ratio * forward + (1.0 - ratio) * reverse
    grad_t = None
    if want_t:
        grad_t = torch.sub(diff, col(forward)).mul_(p).mul_(ratio)
        grad_t.add_(p, alpha=1.0 - ratio).sub_(q, alpha=1.0 - ratio)
    grad_s = None
    if want_s:
        grad_s = torch.add(diff, col(reverse), out=log_q).mul_(q).mul_(ratio - 1.0)
        grad_s.add_(q, alpha=ratio).sub_(p, alpha=ratio)
    return value, grad_s, grad_t


def jsd(log_q, q, log_p, p, want_s, want_t, beta: float = 0.5) -> ClosedFormResult:
    """``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``; the end points
    ``beta = 0`` and ``1`` are forward and reverse KL."""
    if beta == 0.0:
        return forward_kl(log_q, q, log_p, p, want_s, want_t)
    if beta == 1.0:
        return reverse_kl(log_q, q, log_p, p, want_s, want_t)
    log_beta, log_rest = math.log(beta), math.log1p(-beta)
    diff = log_p.sub_(log_q)  # log p - log q
    shifted = torch.add(diff, log_beta - log_rest, out=log_q)
    q_over_m = _softplus(shifted, out=shifted).add_(log_rest).neg_()  # log q - log m
    p_over_m = diff.add_(q_over_m)  # log p - log m
    kl_q, kl_p = rowdot(q, q_over_m), rowdot(p, p_over_m)
    value = beta * kl_p + (1.0 - beta) * kl_q
    grad_s = q_over_m.sub_(col(kl_q)).mul_(q).mul_(1.0 - beta) if want_s else None
    grad_t = p_over_m.sub_(col(kl_p)).mul_(p).mul_(beta) if want_t else None
    return value, grad_s, grad_t


def skew_forward_kl(log_q, q, log_p, p, want_s, want_t, alpha: float = 0.1) -> ClosedFormResult:
    """``KL(p || alpha p + (1 - alpha) q)``."""
    if alpha == 1.0:
        return _zeros(q, p, want_s, want_t)
    if alpha == 0.0:
        return forward_kl(log_q, q, log_p, p, want_s, want_t)
    value, grad_t, grad_s = _skew(log_p, p, log_q, q, alpha, want_t, want_s)
    return value, grad_s, grad_t


def skew_reverse_kl(log_q, q, log_p, p, want_s, want_t, alpha: float = 0.1) -> ClosedFormResult:
    """``KL(q || alpha q + (1 - alpha) p)``."""
    if alpha == 1.0:
        return _zeros(q, p, want_s, want_t)
    if alpha == 0.0:
        return reverse_kl(log_q, q, log_p, p, want_s, want_t)
    return _skew(log_q, q, log_p, p, alpha, want_s, want_t)


def total_variation(log_q, q, log_p, p, want_s: bool, want_t: bool) -> ClosedFormResult:
    """``0.5 sum_v |p_v - q_v|``."""
    sign = torch.sub(q, p, out=log_q)
    value = 0.5 * torch.linalg.vector_norm(sign, ord=1, dim=-1)
    sign.sign_()
    grad_t = torch.sub(col(rowdot(p, sign)), sign).mul_(p).mul_(0.5) if want_t else None
    grad_s = sign.sub_(col(rowdot(q, sign))).mul_(q).mul_(0.5) if want_s else None
    return value, grad_s, grad_t


def forward_kl_and_ce(log_p, p, log_q, q, kd_weight: Tensor, ce_weight: Tensor):
    """The default objective's fast path (forward KL and CE sharing ``q``): ``(KL(p || q) [n],
    kd_weight (q - p) + ce_weight q)`` in two passes for the gradient, written into ``q``
    (the caller subtracts the one-hot); ``log_p``/``log_q`` are overwritten."""
    diff = log_p.sub_(log_q)
    value = rowdot(p, diff, scratch=log_q)
    grad = q.mul_(col(kd_weight + ce_weight)).addcmul_(p, col(kd_weight), value=-1.0)
    return value, grad
