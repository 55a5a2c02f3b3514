"""Importance of layers, KV groups, MLP channels and hidden channels, from activations.

One forward pass over the calibration batches, with hooks (Minitron, Sreenivas et al. 2024):

* **depth**: block influence of layer ``i`` = ``1 - cos(x_in, x_out)`` per token (its input and
  output residual streams), averaged over every token;
* **heads**: per query head, the L2 norm over ``head_dim`` of its attention output (the input of
  ``o_proj``); a KV group's score is the sum over its query heads;
* **MLP**: per channel, ``|act(gate(x)) * up(x)|`` (the input of ``down_proj``);
* **hidden**: per channel, ``|RMSNorm output|`` of every norm (each layer's two and the final
  one), summed over the norms.

Width scores aggregate one way (Minitron's choice): the L2 norm over a sample's positions, then
the mean over samples. Depth uses the mean over all tokens. Calibration windows are full
(no padding), so every position counts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune import config as tt_config


class _StopForward(Exception):
    """Raised by the final norm's hook: the forward pass has given every score."""


@dataclass
class Scores:
    """Importance per axis (fp64, on CPU)."""

    layers: Tensor
    """``[L]`` block influence, 1 - mean cos(in, out)."""
    heads: Tensor
    """``[L, H]`` per query head."""
    groups: Tensor
    """``[L, K]`` per KV group (sum of its query heads)."""
    mlp: Tensor
    """``[L, M]`` per MLP channel."""
    hidden: Tensor
    """``[D]`` per hidden channel, summed over the ``2L + 1`` norms."""
    tokens: int

    def as_dict(self) -> dict[str, list]:
        return {
            "layers": self.layers.tolist(),
            "groups": self.groups.tolist(),
            "heads": self.heads.tolist(),
            "mlp": self.mlp.tolist(),
            "hidden": self.hidden.tolist(),
            "tokens": self.tokens,
        }


def channel_score(x: Tensor) -> Tensor:
    """``[B, S, C]`` activations -> ``[C]``: L2 over positions, summed over the ``B`` samples
    (fp64; the caller divides by the total sample count for the mean)."""
    return x.double().norm(dim=1).sum(0)


@torch.no_grad()
def score_model(model: nn.Module, batches: list[Tensor], num_kv_heads: int) -> Scores:
    """Run ``model`` (a torchtune ``TransformerDecoder``) on ``batches`` (each ``[B, S]`` token
    ids) with hooks, and return the importance of every prunable unit."""
    layers = model.layers
    n_layers = len(layers)
    first_attn = layers[0].attn
    heads, head_dim = first_attn.num_heads, first_attn.head_dim
    sums: dict[str, list] = {
        "cos": [0.0] * n_layers,
        "heads": [0] * n_layers,
        "mlp": [0] * n_layers,
    }
    hidden = [0]
    counts = {"tokens": 0, "samples": 0}
    handles = []

    def on_layer(index: int):
        def hook(module, args, output):
            x_in, x_out = args[0].double(), output.double()
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            sums["cos"][index] += cos.sum().item()

        return hook

    def on_o_proj(index: int):
        def hook(module, args):
            x = args[0]
            per_head = x.double().unflatten(-1, (heads, head_dim)).norm(dim=-1)  # [B, S, H]
            sums["heads"][index] = sums["heads"][index] + channel_score(per_head)

        return hook

    def on_down_proj(index: int):
        def hook(module, args):
            sums["mlp"][index] = sums["mlp"][index] + channel_score(args[0].abs())

        return hook

    def on_norm(module, args, output):
        hidden[0] = hidden[0] + channel_score(output.abs())

    def on_final_norm(module, args, output):
        on_norm(module, args, output)
        raise _StopForward  # the logits are not needed: skip the vocabulary projection

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_layer(index)))
        handles.append(layer.attn.output_proj.register_forward_pre_hook(on_o_proj(index)))
        handles.append(layer.mlp.w2.register_forward_pre_hook(on_down_proj(index)))
        handles.append(layer.sa_norm.register_forward_hook(on_norm))
        handles.append(layer.mlp_norm.register_forward_hook(on_norm))
    handles.append(model.norm.register_forward_hook(on_final_norm))
    try:
        for tokens in batches:
            with contextlib.suppress(_StopForward):
                model(tokens)
            counts["tokens"] += tokens.numel()
            counts["samples"] += tokens.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    samples, tokens = counts["samples"], counts["tokens"]
    head_scores = torch.stack(sums["heads"]) / samples
    return Scores(
        layers=1 - torch.tensor(sums["cos"], dtype=torch.float64) / tokens,
        heads=head_scores,
        groups=head_scores.unflatten(1, (num_kv_heads, heads // num_kv_heads)).sum(-1),
        mlp=torch.stack(sums["mlp"]) / samples,
        hidden=hidden[0] / samples,
        tokens=tokens,
    )


def calibration_batches(
    cfg: DictConfig, samples: int, seq_len: int, seed: int, batch_size: int = 8
) -> list[Tensor]:
    """``samples`` windows of ``seq_len`` tokens from the config's ``dataset`` node.

    The dataset (built with the config's ``tokenizer``) is read in a seeded random order; its
    samples' ``tokens`` are concatenated and cut into windows, so short records still fill
    full windows. Returns ``[b, seq_len]`` batches of up to ``batch_size`` windows.
    """
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    dataset = tt_config.instantiate(cfg.dataset, tokenizer)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    needed = samples * seq_len
    stream: list[int] = []
    for index in order.tolist():
        stream.extend(dataset[index]["tokens"])
        if len(stream) >= needed:
            break
    windows = len(stream) // seq_len
    if windows < samples:
        raise ValueError(
            f"--samples {samples} x --seq-len {seq_len}: the dataset holds only {len(stream)} "
            f"tokens ({windows} windows); lower --samples or --seq-len"
        )
    tokens = torch.tensor(stream[:needed]).view(samples, seq_len)
    return list(tokens.split(batch_size))


def keep_top(scores: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` largest scores, in increasing index order."""
    return sorted(torch.topk(scores, count).indices.tolist())
