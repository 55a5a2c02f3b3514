"""The LoRA/DoRA merge of kdtune.training.adapters against plain references written here."""

from __future__ import annotations

import pytest
import torch

from kdtune.training.adapters import merged_state_dict

RANK, ALPHA = 4, 8.0


def lora_state(dtype: torch.dtype, *, dora: bool, bias: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    state = {
        "layers.0.attn.q_proj.weight": randn(24, 40),
        "layers.0.attn.q_proj.lora_a.weight": randn(RANK, 40),
        "layers.0.attn.q_proj.lora_b.weight": randn(24, RANK) * 0.1,
        "tok_embeddings.weight": randn(10, 40),
    }
    if dora:
        state["layers.0.attn.q_proj.magnitude"] = randn(24).abs() + 1
    if bias:
        state["layers.0.attn.q_proj.bias"] = randn(24)
    return state


def reference_merge(state: dict[str, torch.Tensor], dora: bool) -> dict[str, torch.Tensor]:
    """W + (alpha / rank) B A (DoRA: scaled to the magnitude's row norms, bias too) in fp64,
    rounded once to the weight's dtype."""
    module = "layers.0.attn.q_proj"
    weight = state[f"{module}.weight"].double()
    delta = (
        (ALPHA / RANK)
        * state[f"{module}.lora_b.weight"].double()
        @ state[f"{module}.lora_a.weight"].double()
    )
    merged = weight + delta
    out = {k: v for k, v in state.items() if not k.startswith(f"{module}.")}
    scale = torch.ones(merged.shape[0], dtype=torch.float64)
    if dora:
        scale = state[f"{module}.magnitude"].double() / torch.linalg.norm(merged, dim=1)
    out[f"{module}.weight"] = (merged * scale[:, None]).to(state[f"{module}.weight"].dtype)
    if f"{module}.bias" in state:
        bias = state[f"{module}.bias"]
        out[f"{module}.bias"] = (bias.double() * (scale if dora else 1)).to(bias.dtype)
    return out


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_fp32_rounded_once(dtype, dora, bias):
    state = lora_state(dtype, dora=dora, bias=bias)
    before = {k: v.clone() for k, v in state.items()}
    merged = merged_state_dict(state, RANK, ALPHA)
    expected = reference_merge(state, dora)
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key].dtype == value.dtype, key
        if dtype == torch.bfloat16:
            # fp32 math rounded once to bf16 equals the fp64 reference rounded once, except
            # where fp32 and fp64 straddle a bf16 rounding boundary (one ulp, rare)
            ulps = (merged[key].float() - value.float()).abs() / value.float().abs().clamp_min(1e-3)
            assert (ulps > 2**-7).sum() == 0, key
            assert (merged[key] != value).float().mean() < 0.02, key
        else:
            torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(state[k], before[k]) for k in before)  # input left unchanged


def test_bf16_merge_beats_merging_in_bf16():
    state = lora_state(torch.bfloat16, dora=False, bias=False)
    key = "layers.0.attn.q_proj.weight"
    exact = reference_merge(state, dora=False)[key].double()
    ours = merged_state_dict(state, RANK, ALPHA)[key].double()
    in_bf16 = state[key] + (ALPHA / RANK) * (
        state["layers.0.attn.q_proj.lora_b.weight"] @ state["layers.0.attn.q_proj.lora_a.weight"]
    )
    assert (ours - exact).abs().max() < (in_bf16.double() - exact).abs().max()
