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


def _round_half_away(x: Tensor) -> Tensor:
    """Round to nearest, ties away from zero, as ``gguf.quants.np_roundf`` computes it.

    ``floor(|x| + 0.5)`` would differ: for ``|x| = 0.5 - 2**-25`` the fp32 sum rounds up to 1.
    """
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _check_blocks(weight: Tensor, name: str) -> None:
    if weight.dim() < 1 or weight.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"{name}: GGUF block quantisation needs an input width divisible by {BLOCK_SIZE}, got "
            f"shape {tuple(weight.shape)}; keep this layer unquantised or change its width"
        )


def q8_0_values(weight: Tensor) -> Tensor:
    """``Q8_0`` dequantised values of ``weight`` ``[..., in]`` (``in % 32 == 0``), fp32, same shape."""
    x = weight.detach().to(torch.float32).reshape(-1, BLOCK_SIZE)
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_half_away(x * inv_d)
    return (q * d.to(torch.float16).to(torch.float32)).reshape(weight.shape)


def q4_0_values(weight: Tensor) -> Tensor:
    """``Q4_0`` dequantised values of ``weight`` ``[..., in]`` (``in % 32 == 0``), fp32, same shape."""
    x = weight.detach().to(torch.float32).reshape(-1, BLOCK_SIZE)
    signed_max = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))  # argmax: first on ties
    d = signed_max / -8
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(x * inv_d + 8.5).clamp(max=15) - 8  # x * inv_d >= -8: never below 0 before -8
    return (q * d.to(torch.float16).to(torch.float32)).reshape(weight.shape)


_VALUES = {GGUFQuantType.Q8_0: q8_0_values, GGUFQuantType.Q4_0: q4_0_values}


class _StraightThrough(torch.autograd.Function):
    """Forward: the block-quantised values (fp32). Backward: the gradient as is, in the weight's
    dtype (written as a Function, not ``w + (fq - w).detach()``, whose fp32 sum is not always
    exactly ``fq``)."""

    @staticmethod
    def forward(ctx, weight: Tensor, qtype: GGUFQuantType) -> Tensor:
        ctx.dtype = weight.dtype
        return _VALUES[qtype](weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.to(ctx.dtype), None


def gguf_fake_quantize(weight: Tensor, qtype: GGUFQuantType | str, name: str = "weight") -> Tensor:
    """``weight`` ``[..., in]`` as llama.cpp computes with it in ``qtype``: fp32, same shape,
    straight-through gradient.

    Args:
        weight: any float dtype; blocks of 32 run along the last dimension.
        qtype: ``"q8_0"`` or ``"q4_0"``.
        name: the layer, for the error message.

    Raises:
        ValueError: the last dimension is not a multiple of 32 (names ``name``), or an unknown
            ``qtype``.
    """
    qtype = parse_quant_type(qtype)
    _check_blocks(weight, name)
    return _StraightThrough.apply(weight, qtype)


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
