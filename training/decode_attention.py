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

Projections that are plain ``nn.Linear`` layers are also fused for the block (one matmul where
there were several, which at decoding's few rows per step costs little more than one of them):
q/k/v in each attention module and gate/up in each ``FeedForward``, from concatenated copies of
their weights made on entry, while the copies stay within :data:`FUSED_COPY_BUDGET_BYTES`.
LoRA layers, fake quantisers and FSDP-sharded weights (DTensors) keep their own modules.

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
from torchtune.modules import FeedForward, MultiHeadAttention

FUSED_COPY_BUDGET_BYTES = 512 * 2**20
"""Most bytes of fused weight copies made for one decoding block: q/k/v of every layer first,
then gate/up if they fit too (SmolLM2-135M: 33 + 106 MiB in bf16; a 1B Llama fuses q/k/v
only)."""


def _is_plain_linear(layer: nn.Module | None) -> bool:
    """An ``nn.Linear`` itself (not LoRA, a fake quantiser or another subclass) holding an
    ordinary tensor (not an FSDP-sharded DTensor)."""
    return type(layer) is nn.Linear and type(layer.weight) in (Tensor, nn.Parameter)


def _concatenated(layers: list[nn.Linear]) -> tuple[Tensor, Tensor | None, list[int]]:
    """The layers' weights ``[sum(out), in]`` and biases ``[sum(out)]`` (None when none has one)
    stacked along the output dimension, and each layer's output width."""
    weight = torch.cat([layer.weight.detach() for layer in layers])
    biases = [layer.bias for layer in layers]
    if all(b is None for b in biases):
        bias = None
    else:
        bias = torch.cat(
            [
                b.detach() if b is not None else layer.weight.new_zeros(layer.out_features)
                for b, layer in zip(biases, layers, strict=True)
            ]
        )
    return weight, bias, [layer.out_features for layer in layers]


class _FusedLinears:
    """Several linear layers applied to one input as one matmul: ``x [..., in]`` -> a tuple of
    ``[..., out_i]`` views."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        self.weight, self.bias, self.widths = _concatenated(layers)

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.widths, dim=-1)


def _fused_size(layers: list[nn.Module]) -> int:
    """Bytes a fused copy of ``layers`` would take (0: they cannot be fused)."""
    if not all(_is_plain_linear(layer) for layer in layers):
        return 0
    return sum(
        layer.weight.nbytes + (layer.bias.nbytes if layer.bias is not None else 0)
        for layer in layers
    )


class _FusedFeedForward:
    """The replacement ``forward`` of a ``FeedForward`` with gate and up projections fused."""

    def __init__(self, feed_forward: FeedForward) -> None:
        self.feed_forward = feed_forward
        self.gate_up = _FusedLinears([feed_forward.w1, feed_forward.w3])

    def __call__(self, x: Tensor) -> Tensor:
        """``x`` ``[..., D]`` -> ``[..., D_out]``, as ``FeedForward.forward``."""
        gate, up = self.gate_up(x)
        return self.feed_forward.w2(self.feed_forward.activation(gate) * up)


class _FilledCacheAttention:
    """The replacement ``forward`` of one attention module, with its cache."""

    def __init__(
        self, attention: MultiHeadAttention, keys: Tensor, values: Tensor, fuse_qkv: bool
    ) -> None:
        self.attention = attention
        self.keys = keys  # [B, n_kv, T, h_d]
        self.values = values
        self.filled = 0
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        self.qkv = _FusedLinears(projections) if fuse_qkv else None

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
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(b, s, attn.num_heads, attn.head_dim)
        k = k.view(b, s, attn.num_kv_heads, attn.head_dim)
        v = v.view(b, s, attn.num_kv_heads, attn.head_dim)
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
    ``max_positions`` positions, and plain linear projections are fused within
    :data:`FUSED_COPY_BUDGET_BYTES` (module docstring); on exit the modules are as they were.

    Raises:
        ValueError: ``model`` has no ``MultiHeadAttention``, or one already has torchtune's KV
            cache set up (the two would disagree about what is filled).
    """
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no torchtune MultiHeadAttention to decode")
    if any(a.kv_cache is not None for a in attentions):
        raise ValueError("the model has torchtune KV caches set up; delete them first")
    feed_forwards = [m for m in model.modules() if isinstance(m, FeedForward) and m.w3 is not None]
    qkv_sizes = [_fused_size([a.q_proj, a.k_proj, a.v_proj]) for a in attentions]
    gate_up_sizes = [_fused_size([f.w1, f.w3]) for f in feed_forwards]
    fuse_qkv = sum(qkv_sizes) <= FUSED_COPY_BUDGET_BYTES
    fuse_gate_up = sum(qkv_sizes) * fuse_qkv + sum(gate_up_sizes) <= FUSED_COPY_BUDGET_BYTES
    device = next(model.parameters()).device
    try:
        for attn, size in zip(attentions, qkv_sizes, strict=True):
            shape = (batch_size, attn.num_kv_heads, max_positions, attn.head_dim)
            keys = torch.zeros(shape, dtype=dtype, device=device)
            values = torch.zeros(shape, dtype=dtype, device=device)
            attn.forward = _FilledCacheAttention(attn, keys, values, fuse_qkv and size > 0)
        for feed_forward, size in zip(feed_forwards, gate_up_sizes, strict=True):
            if fuse_gate_up and size > 0:
                feed_forward.forward = _FusedFeedForward(feed_forward)
        yield
    finally:
        for module in [*attentions, *feed_forwards]:
            module.__dict__.pop("forward", None)
