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

Adding a divergence: write its per-token function in this style and register it; the chunked
and fused losses (and the recipe's ``kd_loss.divergence``) then accept its name, and the engine
differentiates it by autograd one chunk at a time. A closed form (:mod:`kdtune.losses.closed_forms`)
is an optional fast path, tested against that fallback::

    def squared_hellinger(student_logits, teacher_logits):  # [N, V], [N, V] -> [N]
        log_q = F.log_softmax(student_logits, -1)
        log_p = F.log_softmax(teacher_logits, -1)
        return 1.0 - torch.exp(0.5 * (log_q + log_p)).sum(-1)

    register_divergence("squared_hellinger", squared_hellinger)
    loss = ChunkedKDLoss("squared_hellinger")
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.losses import closed_forms

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


# ------------------------------------------------------------------------------------------------
# The registry: a divergence is its reference function, plus an optional closed form


@dataclass(frozen=True)
class Divergence:
    """One entry of :data:`DIVERGENCES`.

    Attributes:
        reference: the per-token divergence, ``(student [N, V], teacher [N, V], **params) ->
            [N]`` on fp32 (fp64) logits already divided by the temperature, written in plain
            torch (see the module docstring for the ``-inf`` rules the built-ins follow). Its
            keyword parameters with defaults (after the two logit tensors) are the divergence's
            parameters (``divergence_params``).
        closed_form: optional fast path (:mod:`kdtune.losses.closed_forms`): ``(log_q, q, log_p,
            p, want_s, want_t, **params) -> (value [n], G_s | None, G_t | None)``. Without one,
            the engine differentiates ``reference`` by autograd, one chunk at a time.
        topk: the divergence may be used with a sparse :class:`~kdtune.losses.TopKTeacher`
            (it is then evaluated on the (k+1)-bucket or renormalised log-probabilities, so it
            must accept ``-inf`` log-probabilities).
        param_range: inclusive bounds every parameter is checked against when a loss is built.
    """

    reference: Callable[..., Tensor]
    closed_form: Callable[..., tuple[Tensor, Tensor | None, Tensor | None]] | None = None
    topk: bool = False
    param_range: tuple[float, float] = (0.0, 1.0)

    @property
    def params(self) -> dict[str, float]:
        """The parameters of :attr:`reference` and their defaults."""
        listed = list(inspect.signature(self.reference).parameters.values())[2:]
        return {p.name: p.default for p in listed if p.default is not inspect.Parameter.empty}


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(forward_kl, closed_forms.forward_kl, topk=True),
    "reverse_kl": Divergence(reverse_kl, closed_forms.reverse_kl, topk=True),
    "symmetric_kl": Divergence(symmetric_kl, closed_forms.symmetric_kl),
    "jsd": Divergence(jsd, closed_forms.jsd, topk=True),
    "skew_forward_kl": Divergence(skew_forward_kl, closed_forms.skew_forward_kl),
    "skew_reverse_kl": Divergence(skew_reverse_kl, closed_forms.skew_reverse_kl),
    "total_variation": Divergence(total_variation, closed_forms.total_variation),
}
"""Every divergence a KD loss accepts by name (``divergence=...``); add one with
:func:`register_divergence`."""


def register_divergence(
    name: str,
    reference: Callable[..., Tensor],
    *,
    closed_form: Callable[..., tuple[Tensor, Tensor | None, Tensor | None]] | None = None,
    topk: bool = False,
    param_range: tuple[float, float] = (0.0, 1.0),
    replace: bool = False,
) -> Divergence:
    """Add divergence ``name`` to :data:`DIVERGENCES`; every KD loss then accepts it by name
    (chunked and fused, the recipe's ``kd_loss.divergence``). ``reference`` alone is enough:
    the engine differentiates it by autograd, one chunk at a time (see :class:`Divergence`).
    Registration is per process: the module that registers must be imported before the loss
    is built. ``replace=True`` overwrites an existing entry."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"A divergence name must be a non-empty string, got {name!r}.")
    if name in DIVERGENCES and not replace:
        raise ValueError(
            f"Divergence {name!r} is already registered; pick another name or pass replace=True."
        )
    for label, fn in (("reference", reference), ("closed_form", closed_form)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{label} of divergence {name!r} must be callable, got {fn!r}.")
    positional = [
        p
        for p in inspect.signature(reference).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) != 2:
        raise ValueError(
            f"reference of divergence {name!r} must take (student_logits, teacher_logits) and "
            f"keyword parameters with defaults; it has {len(positional)} required arguments."
        )
    low, high = param_range
    if not low <= high:
        raise ValueError(
            f"param_range of divergence {name!r} must be (low, high), got {param_range}."
        )
    spec = Divergence(reference, closed_form, topk, (float(low), float(high)))
    DIVERGENCES[name] = spec
    return spec


def divergence_spec(name: str) -> Divergence:
    """The :class:`Divergence` registered as ``name``; ``ValueError`` naming the choices."""
    if name not in DIVERGENCES:
        raise ValueError(
            f"Unknown divergence {name!r}; expected one of {sorted(DIVERGENCES)} (or register "
            f"one with kdtune.losses.register_divergence)."
        )
    return DIVERGENCES[name]


def get_divergence(name: str, **params: float) -> PerTokenDivergence:
    """The per-token reference divergence called ``name`` with its parameters bound.

    Built-in names and parameters: ``forward_kl``, ``reverse_kl``, ``symmetric_kl(ratio)``,
    ``jsd(beta)``, ``skew_forward_kl(alpha)``, ``skew_reverse_kl(alpha)``, ``total_variation``;
    plus any registered with :func:`register_divergence`.
    Raises ``ValueError`` for an unknown name, an unknown parameter or one outside its range.
    """
    spec = divergence_spec(name)
    allowed = spec.params
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(
            f"Divergence {name!r} takes parameters {sorted(allowed) or 'none'}, "
            f"got unexpected {sorted(unknown)}."
        )
    low, high = spec.param_range
    for key, value in params.items():
        if not low <= value <= high:
            raise ValueError(f"{key} must be in [{low:g}, {high:g}], got {value}.")
    return partial(spec.reference, **params) if params else spec.reference


def resolved_params(name: str, params: dict[str, float]) -> dict[str, float]:
    """``params`` of divergence ``name`` with its defaults filled in (validated)."""
    get_divergence(name, **params)
    return {**divergence_spec(name).params, **params}
