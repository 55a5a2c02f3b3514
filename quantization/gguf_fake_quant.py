"""Fake quantisers that are exactly GGUF's ``Q8_0`` and ``Q4_0`` block formats, in torch.

A weight ``[out, in]`` is cut into blocks of 32 consecutive weights along ``in`` (llama.cpp's
``QK8_0`` / ``QK4_0``), each stored as one fp16 scale ``d`` and 32 small integers ``q``; llama.cpp
computes with ``q * d``. :func:`gguf_fake_quantize` returns those ``q * d`` values, reproducing
llama.cpp's reference quantiser (``ggml-quants.c``, and the ``gguf`` package's ``gguf.quants``,
which is bit-exact with it) step by step in fp32:

* ``Q8_0``: ``d = max|x| / 127``; ``q = round_half_away(x * (1/d))`` (0 where ``d == 0``).
* ``Q4_0``: ``m`` = the block's value of largest magnitude, *with its sign* (the first one on a
  tie); ``d = m / -8``; ``q = min(trunc(x * (1/d) + 8.5), 15) - 8``.

In both, ``q`` is computed with the fp32 ``d`` and the stored scale is ``d`` rounded to fp16
(fp16 underflow gives 0; a block whose ``d`` overflows fp16, ``max|x|`` above ~8.3e6 for
``Q8_0``, dequantises to inf/nan in llama.cpp and here alike). The result is fp32 whatever the
input dtype: a ``Q8_0`` value ``q * d`` needs up to 18 significant bits, more than bf16 holds.

Gradients are straight-through (:class:`_StraightThrough`): ``d out / d weight`` is the identity,
as in torchao's and torchtune's QAT fake quantisers.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor, nn

BLOCK_SIZE = 32
"""Weights per block along the input dimension (``QK8_0 == QK4_0 == 32``)."""


class GGUFQuantType(str, enum.Enum):
    """The GGUF block formats kdtune fake-quantises and exports (values: the ``--quant`` names)."""

    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


def _round_half_away(y: Tensor) -> Tensor:
    """Round ``y`` to nearest, ties away from zero, as ``gguf.quants.np_roundf`` computes it
    (``floor(|y|) + floor(2 * (|y| - floor(|y|)))`` with ``y``'s sign). Returns a new tensor;
    ``y`` is left as is.

    ``floor(|y| + 0.5)`` would differ: for ``|y| = 0.5 - 2**-25`` the fp32 sum rounds up to 1.
    """
    magnitude = y.abs()
    floored = magnitude.floor()
    return magnitude.sub_(floored).mul_(2).floor_().add_(floored).copysign_(y)


def _check_blocks(weight: Tensor, name: str) -> None:
    if weight.dim() < 1 or weight.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"{name}: GGUF block quantisation needs an input width divisible by {BLOCK_SIZE}, got "
            f"shape {tuple(weight.shape)}; keep this layer unquantised or change its width"
        )


def _fp32_blocks(weight: Tensor) -> Tensor:
    """``weight`` ``[..., in]`` as a fresh fp32 ``[n, 32]`` tensor (the computations below work
    in place on it)."""
    blocks = weight.detach().reshape(-1, BLOCK_SIZE)
    return blocks.to(torch.float32, copy=True)


def _inverse(d: Tensor) -> Tensor:
    """``1 / d``, 0 where ``d == 0`` (llama.cpp's ``id``)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _fp16_scale(d: Tensor) -> Tensor:
    """The stored scale: ``d`` rounded to fp16, back in fp32."""
    return d.to(torch.float16).to(torch.float32)


def q8_0_values(weight: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``Q8_0`` dequantised values of ``weight`` ``[..., in]`` (``in % 32 == 0``): same shape,
    computed in fp32, returned in ``dtype``."""
    x = _fp32_blocks(weight)
    d = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_()) / 127
    q = _round_half_away(x.mul_(_inverse(d)))
    return q.mul_(_fp16_scale(d)).reshape(weight.shape).to(dtype)


def _signed_absmax_by_argmax(x: Tensor) -> Tensor:
    """:func:`_signed_absmax` by one ``argmax`` of ``|x|`` over every block (its first-maximum
    rule is llama.cpp's loop): one kernel and no host sync, the choice on accelerators."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def _signed_absmax(x: Tensor) -> Tensor:
    """Per block of ``x`` ``[n, 32]``, its value of largest magnitude with its sign, the first
    one when ``+m`` and ``-m`` tie (llama.cpp's loop) ``[n, 1]``.

    On CPU ``amax``/``amin`` decide all blocks but the ties and only those take an ``argmax``:
    one ``argmax`` over every block costs several times both reductions there. Elsewhere
    :func:`_signed_absmax_by_argmax` (finding the ties would cost a host sync per weight)."""
    if x.device.type != "cpu":
        return _signed_absmax_by_argmax(x)
    high, low = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
    signed = torch.where(high >= -low, high, low)
    tied = ((high == -low) & (high > 0)).squeeze(-1).nonzero().squeeze(-1)
    if tied.numel():
        rows = x.index_select(0, tied)
        signed[tied] = rows.gather(-1, rows.abs().argmax(dim=-1, keepdim=True))
    return signed


def q4_0_values(weight: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``Q4_0`` dequantised values of ``weight`` ``[..., in]`` (``in % 32 == 0``): same shape,
    computed in fp32, returned in ``dtype``."""
    x = _fp32_blocks(weight)
    d = _signed_absmax(x) / -8
    # x / d >= -8 (up to rounding), so x / d + 8.5 > 0 and floor is llama.cpp's (int) cast
    q = x.mul_(_inverse(d)).add_(8.5).floor_().clamp_(max=15).sub_(8)
    return q.mul_(_fp16_scale(d)).reshape(weight.shape).to(dtype)


_VALUES = {GGUFQuantType.Q8_0: q8_0_values, GGUFQuantType.Q4_0: q4_0_values}


class _StraightThrough(torch.autograd.Function):
    """Forward: the block-quantised values, in ``dtype``. Backward: the gradient as is, in the
    weight's dtype (written as a Function, not ``w + (fq - w).detach()``, whose fp32 sum is not
    always exactly ``fq``). Casting inside saves a bf16 model two weight-sized copies forward
    and two backward against a cast after an fp32 result."""

    @staticmethod
    def forward(ctx, weight: Tensor, qtype: GGUFQuantType, dtype: torch.dtype) -> Tensor:
        ctx.dtype = weight.dtype
        return _VALUES[qtype](weight, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad.to(ctx.dtype), None, None


def gguf_fake_quantize(
    weight: Tensor,
    qtype: GGUFQuantType | str,
    name: str = "weight",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``weight`` ``[..., in]`` as llama.cpp computes with it in ``qtype``: same shape,
    straight-through gradient.

    Args:
        weight: any float dtype; blocks of 32 run along the last dimension.
        qtype: ``"q8_0"`` or ``"q4_0"``.
        name: the layer, for the error message.
        dtype: of the result: fp32 holds llama.cpp's values exactly; a layer computing in bf16
            asks for bf16 (the fp32 values rounded once).

    Raises:
        ValueError: the last dimension is not a multiple of 32 (names ``name``), or an unknown
            ``qtype``.
    """
    qtype = parse_quant_type(qtype)
    _check_blocks(weight, name)
    return _StraightThrough.apply(weight, qtype, dtype)


def parse_quant_type(qtype: GGUFQuantType | str) -> GGUFQuantType:
    """``"q8_0"``/``"Q8_0"``/``GGUFQuantType.Q8_0`` -> the enum member; one-line error otherwise."""
    try:
        return GGUFQuantType(str(getattr(qtype, "value", qtype)).lower())
    except ValueError:
        choices = ", ".join(t.value for t in GGUFQuantType)
        raise ValueError(f"unknown GGUF quant type {qtype!r}; choose one of {choices}") from None


class GGUFFakeQuantizer(nn.Module):
    """``forward(weight) -> gguf_fake_quantize(weight, qtype)``; a no-op while ``enabled`` is
    False (returns ``weight`` itself), so fake quantisation can start after some steps.

    Usable as a ``torch.nn.utils.parametrize`` parametrisation of a ``weight``.

    Args:
        qtype: ``"q8_0"`` or ``"q4_0"``.
        name: the layer, for the block-size error.
    """

    def __init__(self, qtype: GGUFQuantType | str, name: str = "weight") -> None:
        super().__init__()
        self.qtype = parse_quant_type(qtype)
        self.name = name
        self.enabled = True

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        return gguf_fake_quantize(weight, self.qtype, self.name)

    def extra_repr(self) -> str:
        return f"qtype={self.qtype.value}, enabled={self.enabled}"
