"""kdtune's GGUF fake quantisers equal the ``gguf`` package's own quantise -> dequantise, exactly.

The reference is ``gguf.quants.dequantize(gguf.quants.quantize(w, T), T)`` (the ``gguf`` package's
numpy port of llama.cpp's ``ggml-quants.c``, bit-exact with it), an independent implementation;
the comparison is ``torch.equal``, not a tolerance.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kdtune.quantization.gguf_fake_quant import (
    BLOCK_SIZE,
    GGUFFakeQuantizer,
    _signed_absmax,
    _signed_absmax_by_argmax,
    gguf_fake_quantize,
    parse_quant_type,
)

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def reference(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """The gguf package's quantise -> dequantise of ``weight`` (read as fp32), fp32 ``[out, in]``."""
    array = weight.detach().to(torch.float32).numpy()
    blocks = gguf.quants.quantize(array, QTYPES[qtype])
    return torch.from_numpy(gguf.quants.dequantize(blocks, QTYPES[qtype]).reshape(array.shape))


def adversarial_weights() -> dict[str, torch.Tensor]:
    """``[rows, 64]`` fp32 matrices whose blocks hit the rounding rules' edge cases."""
    g = torch.Generator().manual_seed(0)
    cols = 2 * BLOCK_SIZE
    # Q8_0: 127 makes d == 1, so every other x / d is an exact tie k + 0.5 (odd and even k)
    half_steps = torch.cat([torch.tensor([127.0]), torch.arange(-15, 16) + 0.5]).repeat(2)
    # d == 1 (extreme -8): x / d + 8.5 lands on integers and on .5 steps; the second block's
    # extreme is +8, so d == -1 and the same values map the other way
    q4_ties = torch.cat([torch.tensor([-8.0]), torch.arange(-7.5, 8.0, 0.5)[:31]])
    q4_ties = torch.cat([q4_ties, -q4_ties])
    opposite_extremes = torch.rand(cols, generator=g) - 0.5
    opposite_extremes[3], opposite_extremes[10] = 2.0, -2.0  # |max| tie: the first (+2) wins
    opposite_extremes[BLOCK_SIZE + 1], opposite_extremes[BLOCK_SIZE + 7] = -3.0, 3.0
    just_below_half = torch.full((cols,), 0.5 - 2**-25)
    just_below_half[0] = 127.0
    return {
        "random": torch.randn(37, cols, generator=g),
        "zeros": torch.zeros(3, cols),
        "zero_block_beside_nonzero": torch.cat([torch.zeros(BLOCK_SIZE), torch.ones(BLOCK_SIZE)])[
            None
        ],
        "all_equal_positive": torch.full((2, cols), 0.7),
        "all_equal_negative": torch.full((2, cols), -0.7),
        "half_steps": half_steps[None],
        "q4_ties": q4_ties[None],
        "opposite_extremes": opposite_extremes[None],
        "just_below_half": just_below_half[None],
        "huge": torch.randn(4, cols, generator=g) * 1e5,  # Q4_0 scale max|x| / 8 < 65504
        "tiny_fp16_subnormal_scale": torch.randn(4, cols, generator=g) * 1e-6,
        "tiny_fp16_underflow": torch.randn(4, cols, generator=g) * 1e-10,
        "mixed_magnitudes": torch.randn(4, cols, generator=g) * torch.logspace(-8, 5, cols),
        "one_outlier": torch.cat(
            [torch.full((BLOCK_SIZE - 1,), 1e-3), torch.tensor([50.0])]
        ).repeat(2)[None],
    }


@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("case", sorted(adversarial_weights()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_equals_gguf_quants(qtype, case, dtype):
    weight = adversarial_weights()[case]
    if dtype == torch.float16 and weight.abs().max() > 6e4:
        pytest.skip("not representable in fp16")
    weight = weight.to(dtype)
    ours = gguf_fake_quantize(weight, qtype)
    assert ours.dtype == torch.float32 and ours.shape == weight.shape
    assert torch.equal(ours, reference(weight, qtype)), (case, qtype, dtype)


@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (5, 4, 64), (576, 192)])
def test_fake_quant_equals_gguf_quants_on_shapes(qtype, shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    ours = gguf_fake_quantize(weight, qtype)
    expected = reference(weight.reshape(-1, shape[-1]), qtype).reshape(shape)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_fp16_scale_overflow_matches_llama_cpp(qtype):
    """A block whose scale overflows fp16 dequantises to inf/nan in both (no silent clamp)."""
    weight = torch.full((1, BLOCK_SIZE), 1e9)
    weight[0, 1] = 0.0
    ours, expected = gguf_fake_quantize(weight, qtype), reference(weight, qtype)
    assert not torch.isfinite(expected).all()
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)


def test_the_rounding_edge_cases_are_exercised():
    """The adversarial set really reaches the tie branches (else the cases prove nothing)."""
    w = adversarial_weights()
    ref = reference(w["half_steps"], "q8_0")  # d == 1 there: ties round away from zero
    ties = w["half_steps"][0, 1:BLOCK_SIZE]
    assert torch.equal(ref[0, 1:BLOCK_SIZE], (ties + ties.sign() * 0.5).trunc())
    assert torch.equal(reference(w["just_below_half"], "q8_0")[0, 1:BLOCK_SIZE], torch.zeros(31))
    # torch.round (ties to even) would differ on these: the test would catch it
    assert not torch.equal(ties.round(), ref[0, 1:BLOCK_SIZE])


@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_straight_through(qtype, dtype):
    weight = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    upstream = torch.randn(4, 64)
    (gguf_fake_quantize(weight, qtype) * upstream).sum().backward()
    assert weight.grad.dtype == dtype
    assert torch.equal(weight.grad, upstream.to(dtype))


def test_fake_quantised_linear_trains_through_the_quantiser():
    """A parametrised linear layer: the forward uses the quantised weight, the step moves the
    latent one."""
    layer = torch.nn.Linear(64, 8, bias=False)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", GGUFFakeQuantizer("q4_0"))
    latent = layer.parametrizations.weight.original
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), x @ reference(latent, "q4_0").T)
    before = latent.detach().clone()
    layer(x).square().sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    with torch.no_grad():
        latent -= 0.1 * latent.grad
    assert not torch.equal(before, latent)
    layer.parametrizations.weight[0].enabled = False
    assert torch.equal(layer.weight, latent)


@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_width_not_divisible_by_32_names_the_layer(qtype):
    with pytest.raises(ValueError, match=r"layers\.3\.attn\.q_proj.*divisible by 32.*\(8, 48\)"):
        gguf_fake_quantize(torch.zeros(8, 48), qtype, name="layers.3.attn.q_proj")


def test_unknown_quant_type():
    with pytest.raises(
        ValueError, match="unknown GGUF quant type 'q5_k'; choose one of q8_0, q4_0"
    ):
        parse_quant_type("q5_k")
    assert parse_quant_type("Q8_0").value == "q8_0"


def test_reference_is_the_block_format():
    """Sanity of the oracle itself: 32-weight blocks, fp16 scale + int8 (34 bytes) / 4-bit
    nibbles (18 bytes)."""
    w = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert gguf.quants.quantize(w, QTYPES["q8_0"]).shape == (2, 2 * 34)
    assert gguf.quants.quantize(w, QTYPES["q4_0"]).shape == (2, 2 * 18)


@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_many_signed_ties_and_a_bf16_result(qtype):
    """Small integers: most blocks hold both +m and -m, so the first-of-the-tie rule decides
    the Q4_0 scale's sign in most blocks; the bf16 result is the fp32 values rounded once."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randint(-8, 9, (256, 64), generator=g).to(torch.bfloat16)
    blocks = weight.float().reshape(-1, BLOCK_SIZE)
    ties = (blocks.amax(-1) == -blocks.amin(-1)).float().mean()
    assert ties > 0.5
    expected = reference(weight, qtype)
    assert torch.equal(gguf_fake_quantize(weight, qtype), expected)
    as_bf16 = gguf_fake_quantize(weight, qtype, dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, expected.to(torch.bfloat16))


@pytest.mark.parametrize("case", sorted(adversarial_weights()))
def test_the_cpu_and_the_accelerator_extreme_agree(case):
    """The CPU path (amax/amin, argmax on ties) and the accelerators' (one argmax) pick the same
    signed extreme of every block (ties included), so CUDA quantises as the tested CPU path."""
    blocks = adversarial_weights()[case].reshape(-1, BLOCK_SIZE)
    ties = torch.randint(-8, 9, (64, BLOCK_SIZE), generator=torch.Generator().manual_seed(2))
    for x in (blocks, ties.float()):
        assert torch.equal(_signed_absmax(x), _signed_absmax_by_argmax(x))
