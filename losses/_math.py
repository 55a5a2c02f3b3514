"""One chunk's KD and CE values and their gradients (the engine's inner loop).

Everything here works on one chunk of ``n`` token rows and takes no autograd graph from the
caller: the value and the gradient with respect to the student's (and, when asked, the
teacher's) logits are formed in the same pass, in fp32 (fp64 for fp64 input), with in-place
updates on the chunk's own buffers. ``s``, ``t``: student and teacher logits divided by the
temperature; ``q = softmax(s)``, ``p = softmax(t)``.

The KD term of a dense chunk takes one of two routes, chosen from the divergence's entry in
:data:`kdtune.losses.divergences.DIVERGENCES`:

- its closed form (:mod:`kdtune.losses.closed_forms`), the fast path of every built-in;
- :func:`divergence_by_autograd`: ``torch.autograd.grad`` of its reference function on this
  chunk alone, for a divergence registered without a closed form, and for any chunk holding a
  ``-inf`` logit (checked once per chunk by the engine; the closed forms assume finite logits,
  the references carry the documented ``-inf`` rules).

Either way only the chunk's ``[n, V]`` logit gradient leaves this module, so memory stays
chunked. Sparse (top-k) teachers use :func:`topk_divergence`. The CE term is at temperature 1:
``logsumexp(z) - z[label]``, gradient ``softmax(z) - onehot``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.losses.closed_forms import col as _col
from kdtune.losses.closed_forms import forward_kl as _forward_kl_closed_form
from kdtune.losses.closed_forms import forward_kl_and_ce
from kdtune.losses.divergences import divergence_spec, get_divergence

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


def has_closed_form(divergence: str | None) -> bool:
    """Whether divergence ``divergence`` takes the closed-form fast path (``None``: CE only)."""
    return divergence is None or divergence_spec(divergence).closed_form is not None


def supports_topk(divergence: str | None) -> bool:
    """Whether divergence ``divergence`` may be used with a :class:`TopKTeacher`."""
    return divergence is None or divergence_spec(divergence).topk


def _exp(x: Tensor, ws: Workspace | None) -> Tensor:
    return x.exp() if ws is None else torch.exp(x, out=ws.like(x))


def divergence_by_autograd(name, params, s, t, want_s, want_t):
    """The reference divergence ``name`` and its gradients by autograd, on one chunk.

    The fallback of a divergence without a closed form, and the route of a chunk holding a
    ``-inf`` logit (the references carry the ``-inf`` rules of :mod:`kdtune.losses.divergences`).
    ``s``, ``t``: tempered ``[n, V]`` logits (any float dtype, never written to; upcast to the
    compute dtype). Returns ``(value [n], G_s [n, V] | None, G_t [n, V] | None)``; the graph
    lives only inside this call.
    """
    divergence = get_divergence(name, **params)
    with torch.enable_grad():
        s = s.detach().to(_compute_dtype(s)).requires_grad_(want_s)
        t = t.detach().to(_compute_dtype(t)).requires_grad_(want_t)
        value = divergence(s, t)
        leaves = [x for x in (s, t) if x.requires_grad]
        # materialize_grads: a reference that ignores one input (skew KL at alpha = 1) gives
        # a zero gradient there, not an error.
        grads = (
            list(torch.autograd.grad(value.sum(), leaves, materialize_grads=True)) if leaves else []
        )
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
        masked: the chunk holds a ``-inf`` logit (dense teacher): use the reference rules
            (:func:`divergence_by_autograd`), as for a divergence without a closed form.
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
    elif math_.divergence is not None and (masked or not has_closed_form(math_.divergence)):
        kd, grad_kd, grad_t = divergence_by_autograd(
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
        closed_form = divergence_spec(math_.divergence).closed_form
        if shared and want_s and not want_t and closed_form is _forward_kl_closed_form:
            kd, grad = forward_kl_and_ce(log_p, p, log_q, q, kd_weight, ce_weight)
            grad.scatter_add_(-1, safe_labels.unsqueeze(-1), -_col(ce_weight.to(grad.dtype)))
            return kd, ce, grad, None
        kd, grad_kd, grad_t = closed_form(log_q, q, log_p, p, want_s, want_t, **params)
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
