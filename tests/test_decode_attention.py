"""Filled-cache decoding attention against torchtune's own KV-cache decoding.

The reference is torchtune's path: ``setup_caches`` + ``MultiHeadAttention`` with its
``KVCache`` (whole-cache attention, grouped heads expanded by a copy). The same prompt is
prefilled and then decoded token by token through both; logits (up to about 20 in size) must
agree to 1e-4 in fp32 and one bf16 step in bf16 (the attention kernels sum in different orders),
with plain projections fused (the default for small models), not fused (no budget) and for a
LoRA model (its layers are never fused).
"""

from __future__ import annotations

import pytest
import torch
from torchtune.generation import get_causal_mask_from_padding_mask
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.modules import FeedForward, MultiHeadAttention
from torchtune.modules.common_utils import local_kv_cache

from kdtune.training import decode_attention
from kdtune.training.decode_attention import filled_cache_attention

VOCAB = 61


def tiny(num_kv_heads: int, dtype: torch.dtype, lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads, embed_dim=32
    )
    if lora:
        model = lora_llama3(
            lora_attn_modules=["q_proj", "v_proj"],
            apply_lora_to_mlp=True,
            lora_rank=4,
            lora_alpha=8,
            max_seq_len=64,
            **shape,
        )
    else:
        model = llama3(max_seq_len=64, **shape)
    for parameter in model.parameters():  # larger weights: logits that depend on the context
        parameter.data.mul_(3.0).add_(0.1 * torch.randn_like(parameter))  # LoRA B is zeros
    return model.to(dtype).eval()


def fused_modules(model) -> tuple[int, int]:
    """How many attention modules decode with q/k/v fused, and feed-forwards with gate/up."""
    qkv = sum(
        getattr(m.__dict__.get("forward"), "qkv", None) is not None
        for m in model.modules()
        if isinstance(m, MultiHeadAttention)
    )
    gate_up = sum("forward" in m.__dict__ for m in model.modules() if isinstance(m, FeedForward))
    return qkv, gate_up


def decode(model, prompt: torch.Tensor, new: int, cache) -> list[torch.Tensor]:
    """Prefill ``prompt`` ``[B, P]`` (left padding = token 0), then feed back the argmax token
    ``new`` times; the logits of every call's last position."""
    batch, width = prompt.shape
    total = width + new
    is_token = torch.nn.functional.pad(prompt != 0, (0, new), value=True)
    masks = get_causal_mask_from_padding_mask(is_token, target_seq_len=total)
    positions = (is_token.cumsum(-1) - 1).clamp(min=0)
    outputs = []
    with torch.no_grad(), cache(model, batch, total):
        logits = model(prompt, input_pos=positions[:, :width], mask=masks[:, :width])[:, -1]
        outputs.append(logits)
        for step in range(new):
            at = width + step
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, input_pos=positions[:, at : at + 1], mask=masks[:, at : at + 1])
            logits = logits[:, -1]
            outputs.append(logits)
    return outputs


def torchtune_cache(model, batch, total):
    dtype = next(model.parameters()).dtype
    return local_kv_cache(
        model, batch_size=batch, device=torch.device("cpu"), dtype=dtype, decoder_max_seq_len=total
    )


def kdtune_cache(model, batch, total):
    return filled_cache_attention(model, batch, total, next(model.parameters()).dtype)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["fused", "unfused", "lora"])
def test_decoding_equals_torchtunes_kv_cache(num_kv_heads, dtype, variant, monkeypatch):
    model = tiny(num_kv_heads, dtype, lora=variant == "lora")
    if variant == "unfused":
        monkeypatch.setattr(decode_attention, "FUSED_COPY_BUDGET_BYTES", 0)
    with kdtune_cache(model, 1, 8):
        expected_fused = {"fused": (2, 2), "unfused": (0, 0), "lora": (0, 0)}[variant]
        assert fused_modules(model) == expected_fused
    prompt = torch.tensor([[0, 0, 5, 9, 13], [7, 8, 9, 10, 11], [0, 0, 0, 0, 3]])
    expected = decode(model, prompt, 9, torchtune_cache)
    got = decode(model, prompt, 9, kdtune_cache)
    tolerance = 1e-4 if dtype == torch.float32 else 0.125  # logits up to ~20: 1 bf16 step
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tolerance, msg=f"step {step}")
    # the tolerance would catch a cache that lost a position: drop one prompt token of row 1
    lost = decode(
        model, prompt[:, [0, 1, 2, 3, 4]].index_fill(1, torch.tensor([0]), 0), 9, kdtune_cache
    )
    assert (lost[0][1].float() - expected[0][1].float()).abs().max() > 10 * tolerance


def test_modules_are_restored_and_misuse_is_refused():
    model = tiny(2, torch.float32)
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    with filled_cache_attention(model, 1, 8, torch.float32):
        assert all("forward" in a.__dict__ for a in attentions)
        with pytest.raises(ValueError, match="needs the"):
            model(torch.tensor([[1, 2]]))  # no mask
        with pytest.raises(ValueError, match="holds 8 positions"):
            model(torch.ones(1, 9, dtype=torch.long), mask=torch.ones(1, 9, 9, dtype=torch.bool))
    assert not any("forward" in a.__dict__ for a in attentions)
    refused = pytest.raises(ValueError, match="KV caches set up")
    with torchtune_cache(model, 1, 8), refused, filled_cache_attention(model, 1, 8, torch.float32):
        pass
    refused = pytest.raises(ValueError, match="no torchtune MultiHeadAttention")
    with refused, filled_cache_attention(torch.nn.Linear(2, 2), 1, 8, torch.float32):
        pass


def test_fusion_keeps_within_the_budget_and_modules_are_restored(monkeypatch):
    model = tiny(2, torch.float32)
    attention = next(m for m in model.modules() if isinstance(m, MultiHeadAttention))
    qkv_bytes = sum(p.weight.nbytes for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    for budget, expected in [(2 * qkv_bytes, (2, 0)), (2 * qkv_bytes - 1, (0, 0))]:
        monkeypatch.setattr(decode_attention, "FUSED_COPY_BUDGET_BYTES", budget)
        with kdtune_cache(model, 1, 8):
            assert fused_modules(model) == expected
    with kdtune_cache(model, 1, 8):
        pass
    assert fused_modules(model) == (0, 0)
    assert not any("forward" in m.__dict__ for m in model.modules())
