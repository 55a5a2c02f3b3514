"""Slice an HF state dict to the kept layers, KV groups, MLP channels and hidden channels.

Works on Hugging Face names (``model.layers.N.self_attn.q_proj.weight``, ...), where query
head ``h`` is rows ``h*head_dim:(h+1)*head_dim`` of ``q_proj`` and uses KV head
``h // group`` (transformers' GQA layout; torchtune's RoPE permutation stays inside a head).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
"""Tokenizer and chat-template files copied as they are."""


@dataclass(frozen=True)
class Keep:
    """Kept indices of the source model (every list increasing)."""

    layers: list[int]
    groups: dict[int, list[int]]
    """Source layer -> kept KV groups."""
    mlp: dict[int, list[int]]
    """Source layer -> kept MLP channels."""
    hidden: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "kv_groups": {str(k): v for k, v in self.groups.items()},
            "mlp_channels": {str(k): v for k, v in self.mlp.items()},
            "hidden_channels": self.hidden,
        }


def head_rows(groups: list[int], group: int, head_dim: int) -> Tensor:
    """Rows of ``q_proj`` (``group`` query heads per KV group) or, with ``group=1``, of
    ``k_proj``/``v_proj``, for the KV groups ``groups``."""
    heads = [g * group + j for g in groups for j in range(group)]
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)])


def prune_state_dict(
    state: dict[str, Tensor], keep: Keep, group: int, head_dim: int
) -> dict[str, Tensor]:
    """The HF state dict of the pruned model (layers renumbered ``0..len(keep.layers)-1``)."""
    hidden = torch.tensor(keep.hidden)
    new_index = {old: new for new, old in enumerate(keep.layers)}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = LAYER_KEY.match(name)
        if match is None:
            # embed_tokens / lm_head [V, D], final norm [D]
            out[name] = tensor.index_select(tensor.dim() - 1, hidden)
            continue
        old, rest = int(match.group(1)), match.group(2)
        if old not in new_index:
            continue
        q_rows = head_rows(keep.groups[old], group, head_dim)
        kv_rows = head_rows(keep.groups[old], 1, head_dim)
        channels = torch.tensor(keep.mlp[old])
        if rest.endswith("layernorm.weight"):
            tensor = tensor[hidden]
        elif "q_proj" in rest:
            tensor = tensor[q_rows][:, hidden] if tensor.dim() == 2 else tensor[q_rows]
        elif "k_proj" in rest or "v_proj" in rest:
            tensor = tensor[kv_rows][:, hidden] if tensor.dim() == 2 else tensor[kv_rows]
        elif "o_proj" in rest:
            tensor = tensor[hidden][:, q_rows]
        elif "gate_proj" in rest or "up_proj" in rest:
            tensor = tensor[channels][:, hidden]
        elif "down_proj" in rest:
            tensor = tensor[hidden][:, channels]
        elif "rotary_emb" in rest:
            continue
        else:
            raise ValueError(f"unknown weight {name}: kdtune prunes Llama-family weights only")
        out[f"model.layers.{new_index[old]}.{rest}"] = tensor.contiguous()
    return {k: v.contiguous() for k, v in out.items()}


def folder_hash(src: Path) -> str:
    """SHA-256 over ``config.json`` and the safetensors files (sorted by name)."""
    digest = hashlib.sha256()
    for path in [src / "config.json", *sorted(src.glob("*.safetensors"))]:
        digest.update(path.name.encode())
        with path.open("rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def write_folder(
    src: Path,
    dst: Path,
    state: dict[str, Tensor],
    config: dict[str, Any],
    record: dict[str, Any],
) -> None:
    """Write ``dst`` (new, empty): weights, config, tokenizer files and ``prune.json``.

    Written into ``dst.tmp-prune`` first and renamed, so a crash leaves no half folder at ``dst``.
    """
    tmp = dst.with_name(dst.name + ".tmp-prune")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    (tmp / "prune.json").write_text(json.dumps(record, indent=1) + "\n")
    if dst.exists():
        dst.rmdir()  # checked empty before anything was loaded
    tmp.rename(dst)
