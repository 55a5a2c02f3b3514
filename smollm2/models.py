"""torchtune builders for SmolLM2 (Llama architecture, tied embeddings, plain RoPE base 100,000).

SmolLM2-135M: 30 layers, dim 576, 9 query heads, 3 KV heads (head dim 64), MLP 1536, vocabulary
49,152. torchtune's ``llama3_2`` component builder fits it: with ``scale_factor=1`` its Llama-3
RoPE scaling leaves every frequency unchanged, i.e. plain RoPE.
"""

from __future__ import annotations

from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import TransformerDecoder

from kdtune.models.hf_llama import llama_from_hf_config

SMOLLM2_135M = {
    "vocab_size": 49_152,
    "num_layers": 30,
    "num_heads": 9,
    "num_kv_heads": 3,
    "embed_dim": 576,
    "intermediate_dim": 1536,
    "norm_eps": 1e-5,
    "rope_base": 100_000,
}
"""SmolLM2-135M's shape (the GGUF's ``llama.*`` metadata)."""


def smollm2_135m(num_layers: int = 30, max_seq_len: int = 8192) -> TransformerDecoder:
    """SmolLM2-135M, or a layer-pruned student of it with ``num_layers`` layers."""
    return smollm2(**{**SMOLLM2_135M, "num_layers": num_layers}, max_seq_len=max_seq_len)


def smollm2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    norm_eps: float = 1e-5,
    rope_base: float = 100_000,
    max_seq_len: int = 8192,
) -> TransformerDecoder:
    """Any SmolLM2-shaped decoder (tied input/output embeddings, plain RoPE)."""
    return llama3_2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=0.0,
        norm_eps=norm_eps,
        rope_base=rope_base,
        scale_factor=1,
        tie_word_embeddings=True,
    )


def smollm2_from_hf_config(config: dict) -> TransformerDecoder:
    """The decoder a Hugging Face ``config.json`` (as a dict) describes: any Llama-family shape,
    also width-pruned ones (:func:`kdtune.models.llama_from_hf_config`)."""
    return llama_from_hf_config(config)
