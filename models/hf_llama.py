"""Any Llama-family decoder (Llama 2/3.x, SmolLM2, Qwen2) built from an HF ``config.json``.

A YAML config points its ``model`` at the folder instead of hard-coding dimensions::

    model:
      _component_: kdtune.models.llama_from_hf_folder
      folder: ${assets_dir}/students/width_half

``head_dim`` is read from the config (``hidden_size // num_attention_heads`` when absent), so a
width-pruned model whose hidden size is not ``heads * head_dim`` (432 hidden, 6 heads of 64)
builds too. torchtune's ``llama3_2`` / ``qwen2`` builders derive ``head_dim = embed_dim //
num_heads`` and cannot build it; hence this builder. ``hidden_size`` must still be a multiple of
the head count (torchtune's attention and transformers 5 both check it). Supported: ``model_type`` ``llama`` (plain RoPE or Llama-3.1
``rope_type: llama3`` scaling, tied or untied head, no attention/MLP biases) and ``qwen2`` (q/k/v
biases, plain RoPE in Qwen's half-split layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torchtune.models.convert_weights import hf_to_tune
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""``config.json`` ``model_type`` -> the ``architectures`` entry kdtune builds."""


def check_llama_family(config: dict[str, Any], where: str = "config.json") -> None:
    """Raise ``ValueError`` (one line naming the key and the fix) unless kdtune builds this."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type not in LLAMA_FAMILY or (
        architectures and LLAMA_FAMILY[model_type] not in architectures
    ):
        raise ValueError(
            f"{where}: model_type {model_type!r} / architectures {architectures} is not a "
            f"Llama-family causal LM; kdtune builds {sorted(LLAMA_FAMILY.values())}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {config['hidden_act']!r}; kdtune builds silu MLPs")
    if config.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias true is not supported (Llama-family MLPs have none)")
    if model_type == "llama" and config.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias true is not supported for model_type llama")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "llama3") or (
        model_type == "qwen2" and rope.get("rope_type", "default") != "default"
    ):
        raise ValueError(
            f"{where}: RoPE scaling {rope} is not supported (plain RoPE, or Llama-3.1's "
            "rope_type llama3 for model_type llama)"
        )
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    if kv_heads is not None and heads % kv_heads:
        raise ValueError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
            f"{kv_heads}"
        )
    if config["hidden_size"] % heads:
        raise ValueError(
            f"{where}: hidden_size {config['hidden_size']} is not divisible by "
            f"num_attention_heads {heads} (torchtune and transformers require it)"
        )


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes ``rope_parameters``; older versions ``rope_theta``/``rope_scaling``."""
    parameters = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "type" in parameters and "rope_type" not in parameters:
        parameters["rope_type"] = parameters.pop("type")
    parameters.setdefault("rope_theta", config.get("rope_theta", 10_000.0))
    return parameters


def head_dim_of(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama_from_hf_config(
    config: dict[str, Any], max_seq_len: int | None = None
) -> TransformerDecoder:
    """The torchtune decoder an HF ``config.json`` (as a dict) describes (random weights)."""
    check_llama_family(config)
    qwen = config["model_type"] == "qwen2"
    dim = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = head_dim_of(config)
    mlp_dim = config["intermediate_size"]
    eps = config["rms_norm_eps"]
    max_seq_len = max_seq_len or config.get("max_position_embeddings", 4096)
    rope = rope_parameters(config)
    if qwen:
        pos = Qwen2RotaryPositionalEmbeddings(head_dim, max_seq_len, base=rope["rope_theta"])
    elif rope.get("rope_type", "default") == "llama3":
        pos = Llama3ScaledRoPE(
            head_dim,
            max_seq_len,
            base=rope["rope_theta"],
            scale_factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            old_context_len=rope["original_max_position_embeddings"],
        )
    else:
        pos = RotaryPositionalEmbeddings(head_dim, max_seq_len, base=rope["rope_theta"])
    layers = nn.ModuleList()
    for _ in range(config["num_hidden_layers"]):
        attn = MultiHeadAttention(
            embed_dim=dim,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(dim, heads * head_dim, bias=qwen),
            k_proj=nn.Linear(dim, kv_heads * head_dim, bias=qwen),
            v_proj=nn.Linear(dim, kv_heads * head_dim, bias=qwen),
            output_proj=nn.Linear(heads * head_dim, dim, bias=False),
            pos_embeddings=pos,
            max_seq_len=max_seq_len,
            attn_dropout=0.0,
        )
        mlp = FeedForward(
            gate_proj=nn.Linear(dim, mlp_dim, bias=False),
            down_proj=nn.Linear(mlp_dim, dim, bias=False),
            up_proj=nn.Linear(dim, mlp_dim, bias=False),
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn, mlp=mlp, sa_norm=RMSNorm(dim, eps), mlp_norm=RMSNorm(dim, eps)
            )
        )
    embeddings = nn.Embedding(config["vocab_size"], dim)
    tied = config.get("tie_word_embeddings", not qwen)
    output = TiedLinear(embeddings) if tied else nn.Linear(dim, config["vocab_size"], bias=False)
    return TransformerDecoder(
        tok_embeddings=embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=heads,
        head_dim=head_dim,
        norm=RMSNorm(dim, eps=eps),
        output=output,
    )


def llama_from_hf_folder(folder: str | Path, max_seq_len: int | None = None) -> TransformerDecoder:
    """The decoder ``folder/config.json`` describes (the recipe's checkpointer loads weights)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"model.folder: {path} does not exist; pass an HF model folder")
    return llama_from_hf_config(json.loads(path.read_text()), max_seq_len)


def read_hf_state_dict(folder: Path) -> dict[str, Tensor]:
    """Every ``*.safetensors`` tensor of ``folder``, HF names, stored dtype."""
    state: dict[str, Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def hf_to_torchtune(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """HF-named weights -> the names/layouts of :func:`llama_from_hf_config`'s model."""
    shape = {
        "num_heads": config["num_attention_heads"],
        "num_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "dim": config["hidden_size"],
        "head_dim": head_dim_of(config),
    }
    tied = config.get("tie_word_embeddings", config["model_type"] != "qwen2")
    if config["model_type"] == "qwen2":
        return qwen2_hf_to_tune(state, **shape, tie_word_embeddings=tied)
    converted = hf_to_tune({k: v for k, v in state.items() if k != "lm_head.weight"}, **shape)
    if not tied:
        converted["output.weight"] = state["lm_head.weight"]
    return converted


def load_hf_folder(
    folder: str | Path, dtype: torch.dtype = torch.float32, max_seq_len: int | None = None
) -> TransformerDecoder:
    """``folder``'s decoder with its weights, in ``dtype``, eval mode."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = llama_from_hf_config(config, max_seq_len)
    weights = hf_to_torchtune(read_hf_state_dict(folder), config)
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
    return model.to(dtype).eval()
