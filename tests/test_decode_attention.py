"""Filled-cache decoding attention against torchtune's own KV-cache decoding.

The reference is torchtune's path: ``setup_caches`` + ``MultiHeadAttention`` with its
``KVCache`` (whole-cache attention, grouped heads expanded by a copy). The same prompt is
prefilled and then decoded token by token through both; logits (up to about 20 in size) must
agree to 1e-4 in fp32 and one bf16 step in bf16 (the attention kernels sum in different orders).
"""

from __future__ import annotations

import pytest
import torch
from torchtune.generation import get_causal_mask_from_padding_mask
from torchtune.models.llama3 import llama3
from torchtune.modules import MultiHeadAttention
from torchtune.modules.common_utils import local_kv_cache

from kdtune.training.decode_attention import filled_cache_attention

VOCAB = 61


def tiny(num_kv_heads: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = llama3(
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=4,
        num_kv_heads=num_kv_heads,
        embed_dim=32,
        max_seq_len=64,
    )
    for parameter in model.parameters():  # larger weights: logits that depend on the context
        parameter.data.mul_(3.0)
    return model.to(dtype).eval()


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
def test_decoding_equals_torchtunes_kv_cache(num_kv_heads, dtype):
    model = tiny(num_kv_heads, dtype)
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
