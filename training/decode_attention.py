"""Attention for KV-cache decoding that reads only the filled part of the cache, without
copying keys and values per head.

torchtune's ``MultiHeadAttention`` with its ``KVCache`` attends over the whole cache at every
decode step (``decoder_max_seq_len`` positions, the unfilled ones masked out), and for grouped
query attention it first expands the cache's ``n_kv`` key/value heads to ``n_h`` with a copy.
On CPU, decoding SmolLM2-135M at batch 4, that copy alone took about a tenth of a step
(``benchmarks/bench_generate.py``). :func:`filled_cache_attention` swaps each attention
module's ``forward`` for the same computation that keeps its own cache ``[B, n_kv, T, h_d]``,
appends each call's keys and values at the next free positions, and calls
``scaled_dot_product_attention`` on positions ``[0, filled)`` only, with ``enable_gqa`` instead
of the copy. Projections, rotary embeddings, q/k norms and the output projection are the
module's own (LoRA layers included), so the result is torchtune's attention up to the
summation order of the attention kernel.

The caller owns the positions: each call's tokens are cache positions ``filled ..
filled + s - 1`` in order, ``mask`` is ``[B, s, T]`` over all ``T`` cache positions (bool,
True: attend; or additive, 0 / -inf, as :func:`kdtune.training.generation.generate` passes it),
and ``input_pos`` ``[B, s]`` gives the rotary positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.modules import MultiHeadAttention


class _FilledCacheAttention:
    """The replacement ``forward`` of one attention module, with its cache."""

    def __init__(self, attention: MultiHeadAttention, keys: Tensor, values: Tensor) -> None:
        self.attention = attention
        self.keys = keys  # [B, n_kv, T, h_d]
        self.values = values
        self.filled = 0

    def __call__(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """``x`` ``[B, s, D]`` (self-attention: ``y`` is ``x`` or None), ``mask`` ``[B, s, T]``,
        ``input_pos`` ``[B, s]`` -> ``[B, s, D]``."""
        if mask is None:
            raise ValueError("filled-cache decoding needs the [B, s, T] mask of each call")
        attn = self.attention
        b, s, _ = x.shape
        q = attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim)
        k = attn.k_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim)
        if attn.pos_embeddings is not None:
            q = attn.pos_embeddings(q, input_pos=input_pos)
            k = attn.pos_embeddings(k, input_pos=input_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if attn.q_norm is not None:
            q = attn.q_norm(q)
        if attn.k_norm is not None:
            k = attn.k_norm(k)
        start, end = self.filled, self.filled + s
        if end > self.keys.shape[2]:
            raise ValueError(f"the decode cache holds {self.keys.shape[2]} positions, not {end}")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.filled = end
        output = F.scaled_dot_product_attention(
            q,
            self.keys[:, :, :end],
            self.values[:, :, :end],
            attn_mask=mask[:, None, :, :end],
            enable_gqa=attn.num_heads != attn.num_kv_heads,
        )
        return attn.output_proj(output.transpose(1, 2).reshape(b, s, -1))


@contextmanager
def filled_cache_attention(
    model: nn.Module, batch_size: int, max_positions: int, dtype: torch.dtype
) -> Iterator[None]:
    """Within the block, every ``MultiHeadAttention`` of ``model`` decodes with its own cache of
    ``max_positions`` positions (module docstring); on exit the modules are as they were.

    Raises:
        ValueError: ``model`` has no ``MultiHeadAttention``, or one already has torchtune's KV
            cache set up (the two would disagree about what is filled).
    """
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no torchtune MultiHeadAttention to decode")
    if any(a.kv_cache is not None for a in attentions):
        raise ValueError("the model has torchtune KV caches set up; delete them first")
    device = next(model.parameters()).device
    try:
        for attn in attentions:
            shape = (batch_size, attn.num_kv_heads, max_positions, attn.head_dim)
            keys = torch.zeros(shape, dtype=dtype, device=device)
            values = torch.zeros(shape, dtype=dtype, device=device)
            attn.forward = _FilledCacheAttention(attn, keys, values)
        yield
    finally:
        for attn in attentions:
            attn.__dict__.pop("forward", None)
