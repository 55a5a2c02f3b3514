"""One chunk's KD and CE values and their gradients, in closed form (the engine's inner loop).

Everything here works on one chunk of ``n`` token rows and takes no autograd graph: the value
and the gradient with respect to the student's (and, when asked, the teacher's) logits are
formed in the same pass, in fp32 (fp64 for fp64 input), with in-place updates on the chunk's
own buffers. Notation: ``s``, ``t`` student and teacher logits divided by the temperature;
``q = softmax(s)``, ``p = softmax(t)``; every ``G`` below is the gradient of the per-token
divergence with respect to ``s`` (``G_s``) or ``t`` (``G_t``):

- forward KL ``KL(p || q)``: ``G_s = q - p``, ``G_t = p (log p - log q - KL)``.
- reverse KL ``KL(q || p)``: ``G_s = q (log q - log p - KL)``, ``G_t = p - q``.
- symmetric KL ``r KL(p || q) + (1 - r) KL(q || p)``: the weighted sum of the two.
- JSD(beta) with ``m = beta p + (1 - beta) q``: ``G_s = (1 - beta) q (log q - log m - KL(q || m))``
  and ``G_t = beta p (log p - log m - KL(p || m))``.
- skew KL ``KL(a || alpha a + (1 - alpha) b)`` with ``w = (1 - alpha) b / m``:
  ``G_a = a (log a - log m - KL + w - <a, w>)``, ``G_b = b <a, w> - a w``.
- total variation ``0.5 sum |p - q|`` with ``g = sign(q - p)``: ``G_s = 0.5 q (g - <q, g>)``,
  ``G_t = 0.5 p (<p, g> - g)``.
- cross-entropy at temperature 1: ``logsumexp(z) - z[label]``, gradient ``softmax(z) - onehot``.

``log m`` is formed as ``log a - softplus(...)`` from the log-probabilities, never as the log of a
sum of probabilities, so it stays finite where both probabilities underflow.

The closed forms assume finite logits. A chunk holding a ``-inf`` logit (checked once per chunk
by the engine) goes through :func:`masked_divergence` instead: autograd of the reference
divergences of :mod:`kdtune.losses.divergences`, which carry the documented ``-inf`` rules.
Sparse (top-k) teachers use :func:`topk_divergence`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.losses.divergences import get_divergence

TOPK_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TOPK_MODES = ("bucket", "renormalize")


class TopKTeacher(NamedTuple):
    """A sparse teacher: its ``k`` most likely next tokens at each position (the cache format).

    Attributes:
        token_ids: ``[B, S, k]`` int64 token ids, any order, aligned with the student logits and
            the shifted labels (position ``t`` is the distribution over token ``t + 1``).
        logprobs: ``[B, S, k]`` float32 ``log_softmax(teacher_logits / T)`` at ``token_ids``.
        rest_logmass: ``[B, S]`` float32 ``log(1 - sum(exp(logprobs)))``, the log of the mass
            outside the k ids; ``-inf`` when the k ids hold all of it.

    Values at positions whose label is ``ignore_index`` are arbitrary. ``T`` (the temperature
    the teacher was cached at) must equal the loss's ``temperature``: the loss tempers only the
    student. ``k = V`` gives exactly the dense loss.
    """

    token_ids: Tensor
    logprobs: Tensor
    rest_logmass: Tensor


@dataclass(frozen=True)
class ChunkMath:
    """The per-call constants of the chunk objective (hashable: a compile cache key).

    ``divergence``/``params``: the KD divergence (``None``: no KD term); ``temperature``;
    ``columns``: the leading vocabulary columns the KD term compares; ``with_ce``: also the
    cross-entropy; ``topk_mode``: for a :class:`TopKTeacher`.
    """

    divergence: str | None
    params: tuple[tuple[str, float], ...] = ()
    temperature: float = 1.0
    columns: int | None = None
    with_ce: bool = True
    topk_mode: str = "bucket"


class Workspace:
    """Vocabulary-sized buffers handed from one chunk to the next (and, when ``persistent``,
    from one loss call to the next).

    On CPU a fresh allocation of a chunk's size (tens of MiB) is mapped in page by page on its
    first write, which costs 2-4x the elementwise op that writes it (PyTorch's CPU allocator
    caches nothing). :meth:`take` hands out a free buffer of an earlier chunk when one is
    large enough, else a new one; :meth:`give` returns a transient at once; :meth:`reclaim` (at
    the end of a chunk) frees every lent buffer except those still held. The pool never holds
    more buffers than one chunk has alive at once, so peak memory does not change.
    :meth:`end_call` (at the end of a loss call) drops every buffer, or, when ``persistent``,
    keeps those this call used for the next one (the caller's training loop calls the loss
    with the same shapes every step; CUDA's caching allocator already reuses memory).
    """

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent
        self._free: list[Tensor] = []  # flat buffers
        self._lent: dict[int, Tensor] = {}  # data_ptr -> flat buffer
        self._used: set[int] = set()  # data_ptrs handed out since the last end_call

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``."""
        numel = math.prod(shape)
        fits = [
            (b.numel(), i)
            for i, b in enumerate(self._free)
            if b.dtype == dtype and b.device == device and b.numel() >= numel
        ]
        if fits:
            flat = self._free.pop(min(fits)[1])
        else:
            flat = torch.empty(numel, dtype=dtype, device=device)
        self._lent[flat.data_ptr()] = flat
        self._used.add(flat.data_ptr())
        return flat[:numel].view(shape)

    def like(self, tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return self.take(tensor.shape, dtype or tensor.dtype, tensor.device)

    def give(self, *tensors: Tensor | None) -> None:
        """Return buffers taken from this workspace (others are ignored) for reuse."""
        for tensor in tensors:
            flat = self._lent.pop(tensor.data_ptr(), None) if tensor is not None else None
            if flat is not None:
                self._free.append(flat)

    def reclaim(self, held: Sequence[Tensor | None] = ()) -> None:
        """End of a chunk: every lent buffer is free again except those of ``held`` (which
        leave the workspace for good: their owner keeps them)."""
        for tensor in held:
            if tensor is not None:
                self._lent.pop(tensor.data_ptr(), None)
        self._free.extend(self._lent.values())
        self._lent.clear()

    def end_call(self) -> None:
        """End of a loss call: keep (persistent) the free buffers this call used, else none."""
        self._lent.clear()
        used = self._used if self.persistent else set()
        self._free = [b for b in self._free if b.data_ptr() in used]
        self._used = set()

    def clear(self) -> None:
        """Drop every buffer."""
        self._free.clear()
        self._lent.clear()
        self._used = set()

    @property
    def nbytes(self) -> int:
        """Bytes of the free buffers kept."""
        return sum(b.numel() * b.element_size() for b in self._free)


def rowdot(a: Tensor, b: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``sum_v a[n, v] * b[n, v]`` per row, ``[n, V]`` x2 -> ``[n]``, without a new ``[n, V]``
    temporary: the products go to ``scratch`` (overwritten; 3x faster than the batched
    matrix-vector product used without one)."""
    if scratch is None:
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return torch.mul(a, b, out=scratch).sum(-1)


def _col(x: Tensor) -> Tensor:
    return x.unsqueeze(-1)


# ------------------------------------------------------------------------------------------------
# Closed-form divergences on finite log-probabilities. Each may overwrite ``log_a``/``log_b``
# (scratch), never ``a``/``b``. Returns ``(value [n], G_a | None, G_b | None)``.


def _kl(log_a: Tensor, a: Tensor, log_b: Tensor, b: Tensor, want_a: bool, want_b: bool):
    """``KL(a || b)``."""
    diff = log_a.sub_(log_b)
    value = rowdot(a, diff, scratch=log_b)
    grad_b = torch.sub(b, a, out=log_b) if want_b else None
    grad_a = diff.sub_(_col(value)).mul_(a) if want_a else None
    return value, grad_a, grad_b


def _skew(log_a, a, log_b, b, alpha: float, want_a: bool, want_b: bool):
    """``KL(a || alpha a + (1 - alpha) b)`` for ``0 < alpha < 1``."""
    log_alpha, log_rest = math.log(alpha), math.log1p(-alpha)
    x = log_b.sub_(log_a).add_(log_rest - log_alpha)
    log_a_over_m = F.softplus(x).add_(log_alpha).neg_()  # log a - log m
    value = rowdot(a, log_a_over_m)
    w = x.add_(log_alpha).add_(log_a_over_m).exp_()  # (1 - alpha) b / m, in [0, 1]
    a_w = rowdot(a, w)
    grad_a = log_a_over_m.add_(w).sub_(_col(value + a_w)).mul_(a) if want_a else None
    grad_b = w.mul_(a).neg_().addcmul_(b, _col(a_w)) if want_b else None
    return value, grad_a, grad_b


def _jsd(log_q, q, log_p, p, beta: float, want_s: bool, want_t: bool):
    """``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``, ``0 < beta < 1``."""
    log_beta, log_rest = math.log(beta), math.log1p(-beta)
    diff = log_p.sub_(log_q)  # log p - log q
    q_over_m = F.softplus(torch.add(diff, log_beta - log_rest, out=log_q)).add_(log_rest).neg_()
    p_over_m = diff.add_(q_over_m)  # log p - log m
    kl_q, kl_p = rowdot(q, q_over_m), rowdot(p, p_over_m)
    value = beta * kl_p + (1.0 - beta) * kl_q
    grad_s = q_over_m.sub_(_col(kl_q)).mul_(q).mul_(1.0 - beta) if want_s else None
    grad_t = p_over_m.sub_(_col(kl_p)).mul_(p).mul_(beta) if want_t else None
    return value, grad_s, grad_t


def _symmetric(log_q, q, log_p, p, ratio: float, want_s: bool, want_t: bool):
    """``ratio KL(p || q) + (1 - ratio) KL(q || p)``."""
    diff = log_p.sub_(log_q)
    forward, reverse = rowdot(p, diff), -rowdot(q, diff)
    value = ratio * forward + (1.0 - ratio) * reverse
    grad_t = None
    if want_t:
        grad_t = torch.sub(diff, _col(forward)).mul_(p).mul_(ratio)
        grad_t.add_(p, alpha=1.0 - ratio).sub_(q, alpha=1.0 - ratio)
    grad_s = None
    if want_s:
        grad_s = torch.add(diff, _col(reverse), out=log_q).mul_(q).mul_(ratio - 1.0)
        grad_s.add_(q, alpha=ratio).sub_(p, alpha=ratio)
    return value, grad_s, grad_t


def _tvd(log_q, q, log_p, p, want_s: bool, want_t: bool):
    """``0.5 sum_v |p_v - q_v|``."""
    sign = torch.sub(q, p, out=log_q)
    value = 0.5 * torch.linalg.vector_norm(sign, ord=1, dim=-1)
    sign.sign_()
    grad_t = torch.sub(_col(rowdot(p, sign)), sign).mul_(p).mul_(0.5) if want_t else None
    grad_s = sign.sub_(_col(rowdot(q, sign))).mul_(q).mul_(0.5) if want_s else None
    return value, grad_s, grad_t


def _forward_kl_and_ce(log_p, p, log_q, q, kd_weight, ce_weight):
    """The default objective's fast path (forward KL and CE sharing ``q``): ``(KL(p || q) [n],
    kd_weight (q - p) + ce_weight q)`` in two passes for the gradient, written into ``q``
    (the caller subtracts the one-hot); ``log_p``/``log_q`` are overwritten."""
    diff = log_p.sub_(log_q)
    value = rowdot(p, diff, scratch=log_q)
    grad = q.mul_(_col(kd_weight + ce_weight)).addcmul_(p, _col(kd_weight), value=-1.0)
    return value, grad


def closed_form(name: str, params: dict[str, float], log_q, q, log_p, p, want_s, want_t):
    """``(value [n], G_s, G_t)`` of divergence ``name``; ``log_q``/``log_p`` are overwritten."""
    if name == "symmetric_kl":
        return _symmetric(log_q, q, log_p, p, params.get("ratio", 0.5), want_s, want_t)
    if name == "total_variation":
        return _tvd(log_q, q, log_p, p, want_s, want_t)
    weight = params.get("beta", params.get("alpha", 0.0))
    if name == "jsd" and 0.0 < weight < 1.0:
        return _jsd(log_q, q, log_p, p, weight, want_s, want_t)
    if name in ("skew_forward_kl", "skew_reverse_kl") and weight == 1.0:
        zeros = torch.zeros_like(q[:, 0])
        return (
            zeros,
            torch.zeros_like(q) if want_s else None,
            torch.zeros_like(p) if want_t else None,
        )
    if name == "forward_kl" or (name == "jsd" and weight == 0.0):
        value, grad_t, grad_s = _kl(log_p, p, log_q, q, want_t, want_s)
    elif name == "reverse_kl" or name == "jsd":
        value, grad_s, grad_t = _kl(log_q, q, log_p, p, want_s, want_t)
    elif name == "skew_forward_kl":
        if weight == 0.0:
            value, grad_t, grad_s = _kl(log_p, p, log_q, q, want_t, want_s)
        else:
            value, grad_t, grad_s = _skew(log_p, p, log_q, q, weight, want_t, want_s)
    elif name == "skew_reverse_kl":
        if weight == 0.0:
            value, grad_s, grad_t = _kl(log_q, q, log_p, p, want_s, want_t)
        else:
            value, grad_s, grad_t = _skew(log_q, q, log_p, p, weight, want_s, want_t)
    else:
        raise ValueError(f"no closed form for divergence {name!r}")
    return value, grad_s, grad_t


# ------------------------------------------------------------------------------------------------
# The chunk objective


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _tempered(logits: Tensor, temperature: float, ws: Workspace | None = None) -> Tensor:
    """``logits / T`` in the compute dtype (the chunk itself when ``T == 1``)."""
    if temperature == 1.0:
        return logits
    if ws is None:
        return logits.to(_compute_dtype(logits), copy=True).div_(temperature)
    return ws.like(logits, _compute_dtype(logits)).copy_(logits).div_(temperature)


def _log_softmax(logits: Tensor, dtype: torch.dtype, ws: Workspace | None) -> Tensor:
    """``log_softmax(logits)`` in ``dtype`` over the last dim, in workspace buffers if given
    (the upcast of a 16-bit chunk included); ``logits`` is never written to."""
    if ws is None:
        return F.log_softmax(logits, dim=-1, dtype=dtype)
    upcast = logits if logits.dtype == dtype else ws.like(logits, dtype).copy_(logits)
    out = torch.log_softmax(upcast, dim=-1, out=ws.like(logits, dtype))
    if upcast is not logits:
        ws.give(upcast)
    return out


def _tempered_log_softmax(logits: Tensor, temperature: float, ws: Workspace | None) -> Tensor:
    tempered = _tempered(logits, temperature, ws)
    out = _log_softmax(tempered, _compute_dtype(logits), ws)
    if ws is not None and tempered is not logits:
        ws.give(tempered)
    return out


def _exp(x: Tensor, ws: Workspace | None) -> Tensor:
    return x.exp() if ws is None else torch.exp(x, out=ws.like(x))


def masked_divergence(name, params, s, t, want_s, want_t):
    """The reference divergence (``-inf`` rules of :mod:`kdtune.losses.divergences`) by autograd.

    ``s``, ``t``: tempered ``[n, V]`` logits. Returns ``(value [n], G_s, G_t)``.
    """
    divergence = get_divergence(name, **params)
    with torch.enable_grad():
        s = s.detach().to(_compute_dtype(s)).requires_grad_(want_s)
        t = t.detach().to(_compute_dtype(t)).requires_grad_(want_t)
        value = divergence(s, t)
        leaves = [x for x in (s, t) if x.requires_grad]
        grads = list(torch.autograd.grad(value.sum(), leaves)) if leaves else []
    grad_s = grads.pop(0) if want_s else None
    grad_t = grads.pop(0) if want_t else None
    return value.detach(), grad_s, grad_t


def topk_divergence(name, params, mode, s, teacher: TopKTeacher, keep, want_s):
    """The divergence against a sparse teacher; ``s`` tempered ``[n, V]`` student logits.

    ``bucket``: both distributions over ``k + 1`` buckets (the k ids, then the rest).
    ``renormalize``: both renormalised over the k ids (the student's logits gathered there).
    Returns ``(value [n], G_s [n, V] | None)``, both zero at rows where ``keep`` is False.
    The small ``[n, k + 1]`` divergence is differentiated by autograd and chained to the
    vocabulary in closed form.
    """
    divergence = get_divergence(name, **params)
    ids = teacher.token_ids
    dtype = _compute_dtype(s)
    teacher_lp = teacher.logprobs.to(dtype)
    if mode == "renormalize":
        with torch.enable_grad():
            student_k = s.gather(-1, ids).to(dtype).requires_grad_(want_s)
            value = torch.where(keep, divergence(student_k, teacher_lp), 0.0)
            grad_k = torch.autograd.grad(value.sum(), student_k)[0] if want_s else None
        if grad_k is None:
            return value.detach(), None
        return value.detach(), torch.zeros(s.shape, dtype=dtype, device=s.device).scatter_(
            -1, ids, grad_k
        )
    log_q = F.log_softmax(s, dim=-1, dtype=dtype)
    log_q_k = log_q.gather(-1, ids)
    q = log_q.exp_()  # reuses log_q's buffer
    rest = q.scatter_(-1, ids, 0.0).sum(-1)  # q now holds zeros at the k ids
    teacher_b = torch.cat([teacher_lp, _col(teacher.rest_logmass.to(dtype))], dim=-1)
    with torch.enable_grad():
        student_b = torch.cat([log_q_k, _col(rest.log())], dim=-1).requires_grad_(want_s)
        value = torch.where(keep, divergence(student_b, teacher_b), 0.0)
        grad_b = torch.autograd.grad(value.sum(), student_b)[0] if want_s else None
    if grad_b is None:
        return value.detach(), None
    # d log q_j / ds_v = [v = id_j] - q_v;  d log rest / ds_v = [v not in ids] q_v / rest - q_v.
    grad_b = torch.where(_col(keep), grad_b, 0.0)
    grad_k, grad_rest = grad_b[:, :-1], grad_b[:, -1]
    total = grad_b.sum(-1)
    rest_factor = torch.where(rest > 0, grad_rest / rest, 0.0)
    grad = q.mul_(_col(rest_factor - total))
    grad.scatter_(-1, ids, grad_k - log_q_k.exp() * _col(total))
    return value.detach(), grad


def chunk_objective(
    math_: ChunkMath,
    student: Tensor,
    teacher: Tensor | TopKTeacher | None,
    safe_labels: Tensor,
    keep: Tensor,
    kd_weight: Tensor,
    ce_weight: Tensor,
    want_s: bool,
    want_t: bool,
    masked: bool,
    ws: Workspace | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One chunk: ``(kd [n], ce [n] | None, grad_student [n, V] | None, grad_teacher | None)``.

    Args:
        student: ``[n, V]`` logits (any float dtype; never written to).
        teacher: ``[n, V_t]`` dense logits (never written to), a :class:`TopKTeacher` of
            ``[n, k]``/``[n]`` rows, or ``None`` (CE only).
        safe_labels: ``[n]`` labels with a valid class at ignored rows; ``keep``: bool ``[n]``.
        kd_weight, ce_weight: ``[n]`` weights of each row's KD and CE gradient (0 at ignored
            rows; the KD weight already holds ``1 / T`` of the chain rule).
        want_s, want_t: which gradients to form (none: values only).
        masked: the chunk holds a ``-inf`` logit (dense teacher): use the reference rules.
        ws: optional :class:`Workspace` for the vocabulary-sized buffers of the dense path
            (the caller reclaims them; the returned gradients are among them).

    The KD value is the per-token divergence of the tempered distributions (times nothing: the
    caller applies T², the reduction and ``kd_ratio``); the CE value is at temperature 1.
    The gradient is ``kd_weight * G_kd + ce_weight * (softmax(z) - onehot)``.
    """
    dtype = _compute_dtype(student)
    params = dict(math_.params)
    columns = math_.columns or student.shape[-1]
    student_kd = student if columns == student.shape[-1] else student[:, :columns]
    shared = math_.with_ce and columns == student.shape[-1] and math_.temperature == 1.0
    log_z = _log_softmax(student, dtype, ws) if math_.with_ce else None
    ce = -log_z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) if log_z is not None else None

    kd = grad_kd = grad_t = q = None  # no teacher (CE only): all stay None
    if math_.divergence is not None and isinstance(teacher, TopKTeacher):
        kd, grad_kd = topk_divergence(
            math_.divergence,
            params,
            math_.topk_mode,
            _tempered(student_kd, math_.temperature),
            teacher,
            keep,
            want_s,
        )
    elif math_.divergence is not None and masked:
        kd, grad_kd, grad_t = masked_divergence(
            math_.divergence,
            params,
            _tempered(student_kd, math_.temperature),
            _tempered(teacher, math_.temperature),
            want_s,
            want_t,
        )
    elif math_.divergence is not None:
        log_q = log_z if shared else _tempered_log_softmax(student_kd, math_.temperature, ws)
        q = _exp(log_q, ws)
        log_p = _tempered_log_softmax(teacher, math_.temperature, ws)
        p = _exp(log_p, ws)
        if shared and want_s and not want_t and math_.divergence == "forward_kl":
            kd, grad = _forward_kl_and_ce(log_p, p, log_q, q, kd_weight, ce_weight)
            grad.scatter_add_(-1, safe_labels.unsqueeze(-1), -_col(ce_weight.to(grad.dtype)))
            return kd, ce, grad, None
        kd, grad_kd, grad_t = closed_form(
            math_.divergence, params, log_q, q, log_p, p, want_s, want_t
        )
        if not shared:
            q = None
    if grad_t is not None:
        grad_t.mul_(_col(kd_weight))
    if not want_s:
        return kd, ce, None, grad_t

    # Assemble kd_weight * G_kd + ce_weight * (softmax(z) - onehot) in one [n, V] buffer.
    if grad_kd is not None:
        grad_kd.mul_(_col(kd_weight))
    if math_.with_ce:
        if q is not None:  # shared: G_kd's buffer takes the CE term in place
            grad = grad_kd.addcmul_(q, _col(ce_weight))
        else:
            grad = log_z.exp_().mul_(_col(ce_weight))
            if grad_kd is not None:
                grad[:, :columns].add_(grad_kd)
        grad.scatter_add_(-1, safe_labels.unsqueeze(-1), -_col(ce_weight.to(grad.dtype)))
    elif columns == student.shape[-1]:
        grad = grad_kd
    else:
        grad = torch.zeros(student.shape, dtype=dtype, device=student.device)
        grad[:, :columns] = grad_kd
    return kd, ce, grad, grad_t
