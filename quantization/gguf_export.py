"""Export a Llama-family Hugging Face folder (a checkpoint's ``model/``) to one GGUF file.

``kdtune export CHECKPOINT_OR_MODEL_DIR --format gguf --quant f16|q8_0|q4_0 [--out FILE]``

The file is laid out as llama.cpp's own ``convert_hf_to_gguf.py`` lays out a Llama, so llama.cpp
and ollama load it as they load SmolLM2's published GGUF:

* metadata: ``general.architecture = llama``, ``llama.*`` hyper-parameters (context, embedding
  and feed-forward lengths, block count, head counts, RoPE base and dimension, RMS eps, vocab
  size; ``attention.key_length``/``value_length`` when ``head_dim != hidden / heads``),
  ``general.file_type`` and the quantisation version;
* tensors with llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``,
  ``output`` for an untied head), the q/k rows permuted from HF's half-split RoPE layout to
  llama.cpp's adjacent-pair layout (the same order torchtune's own weights use);
* the tokenizer (``tokenizer.ggml.model = gpt2``: tokens, token types, merges, the pre-tokenizer
  name, BOS/EOS/UNK/PAD ids, ``add_bos_token``) and ``tokenizer.chat_template``.

Tensor types (``--quant``): 1-D tensors (RMSNorm weights) stay F32, as in llama.cpp. Every 2-D
projection gets the ``--quant`` type. The token embedding (which is also the output projection
of a tied model) gets ``--embedding-quant``; by default the ``--quant`` type, except Q8_0 for
``q4_0``: llama.cpp's ``llama-quantize`` keeps the (tied) output matrix at higher precision
(Q6_K, or Q8_0 when the width is not a multiple of 256 as in SmolLM2's own Q4 file; the
``gguf`` package cannot write Q6_K, so kdtune uses Q8_0). ``--embedding-quant q4_0`` is
``llama-quantize --pure``: the smallest file.

Quantised values are :mod:`kdtune.quantization.gguf_fake_quant`'s, bit for bit, so a student
trained with those fake quantisers is exactly what llama.cpp runs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from kdtune.models.hf_llama import check_llama_family, rope_parameters

QUANTS = ("f16", "q8_0", "q4_0")
"""``--quant`` choices."""

FORMATS = ("gguf", "torchao")
"""``--format`` choices (``torchao``: :mod:`kdtune.quantization.torchao_export`)."""

MODEL_DIRNAME = "model"
"""A checkpoint's HF folder (``kdtune.training.checkpoint.layout.MODEL_DIRNAME``, one floor up;
tests/test_gguf_export.py checks they agree)."""

GGUF_DIRNAME = "gguf"
"""Where a checkpoint's GGUF goes by default: ``<checkpoint>/gguf/``, beside ``model/``."""

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")


class ExportError(ValueError):
    """Bad export input (a one-line message naming the file or option and the fix)."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size_bytes: int
    tensor_types: dict[str, str]
    """GGUF tensor name -> its type name (``F32``, ``F16``, ``Q8_0``, ``Q4_0``)."""


# ---------------------------------------------------------------------------------------------
# Inputs


def model_folder(source: str | Path) -> Path:
    """The HF model folder of ``source``: a checkpoint folder's ``model/``, or ``source``."""
    source = Path(source)
    if (source / MODEL_DIRNAME / "config.json").is_file():
        return source / MODEL_DIRNAME
    if (source / "config.json").is_file():
        return source
    raise ExportError(
        f"{source}: no config.json here nor in {source / 'model'}; pass a checkpoint folder "
        "(checkpoints/step_N) or a Hugging Face model folder"
    )


def default_output(source: str | Path, quant: str) -> Path:
    """``<checkpoint>/gguf/model-<quant>.gguf`` for a checkpoint, ``<folder>-<quant>.gguf``
    beside a bare model folder."""
    source = Path(source)
    if (source / MODEL_DIRNAME / "config.json").is_file():
        return source / GGUF_DIRNAME / f"model-{quant}.gguf"
    return source.parent / f"{source.resolve().name}-{quant}.gguf"


def check_request(quant: str, embedding_quant: str | None, fmt: str = "gguf") -> None:
    """Raise :class:`ExportError` for an unknown ``--format``/``--quant``/``--embedding-quant``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    for option, value in (("--quant", quant), ("--embedding-quant", embedding_quant)):
        if value is not None and value not in QUANTS:
            raise ExportError(f"{option} {value!r} is unknown; choose one of {', '.join(QUANTS)}")


def read_llama_config(folder: Path) -> dict[str, Any]:
    """``config.json``, checked to be a plain Llama that llama.cpp's ``llama`` runs."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    try:
        check_llama_family(config, str(config_path))
    except ValueError as error:
        raise ExportError(str(error)) from None
    if config.get("model_type") != "llama":
        raise ExportError(
            f"{config_path}: model_type {config.get('model_type')!r}; the GGUF export writes "
            "llama.cpp's 'llama' architecture (model_type llama only)"
        )
    if rope_parameters(config).get("rope_type", "default") != "default":
        raise ExportError(
            f"{config_path}: RoPE scaling {rope_parameters(config)} is not exported (llama.cpp "
            "needs a rope_freqs tensor for it); plain RoPE only"
        )
    return config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no *.safetensors weights")
    return files


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors, as stored (HF names)."""
    weights = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                weights[key] = handle.get_tensor(key)
    return weights


# ---------------------------------------------------------------------------------------------
# Tensors


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k row order (each head's RoPE pairs split in halves) -> llama.cpp's (adjacent
    pairs): per head, rows ``[0..h/2) + [h/2..h)`` interleaved. ``weight`` ``[heads*h, in]``."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name of an HF Llama tensor; None for one it does not store (rotary freqs)."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    match = _LAYER.match(hf_name)
    if match and match[2] in _LAYER_TENSORS:
        return f"blk.{match[1]}.{_LAYER_TENSORS[match[2]]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise ExportError(f"tensor {hf_name!r} has no llama.cpp name: not a plain Llama checkpoint")


def gguf_tensors(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """llama.cpp name -> fp32 array ``[out, in]`` (or ``[n]``), q/k permuted, tied head dropped."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    kv_heads = kv_heads or heads
    # absent key: tied unless the file has a head (kdtune's builder defaults to tied for llama)
    tied = config.get("tie_word_embeddings", "lm_head.weight" not in weights)
    tensors = {}
    for hf_name, tensor in weights.items():
        name = gguf_tensor_name(hf_name)
        if name is None or (name == "output.weight" and tied):
            continue
        array = tensor.to(torch.float32).numpy()
        if name.endswith("attn_q.weight"):
            array = llama_cpp_permute(array, heads)
        elif name.endswith("attn_k.weight"):
            array = llama_cpp_permute(array, kv_heads)
        tensors[name] = np.ascontiguousarray(array)
    expected = {"token_embd.weight", "output_norm.weight", *([] if tied else ["output.weight"])}
    missing = sorted(expected - tensors.keys())
    if missing:
        raise ExportError(f"the checkpoint has no {missing} (HF names {list(_GLOBAL_TENSORS)})")
    return tensors


def tensor_type(name: str, array: np.ndarray, quant: str, embedding_quant: str) -> str:
    """The GGUF type name of one tensor (see the module docstring)."""
    if array.ndim == 1:
        return "F32"
    chosen = embedding_quant if name in _EMBEDDING_TENSORS else quant
    return chosen.upper()


def check_block_widths(tensors: dict[str, np.ndarray], types: dict[str, str]) -> None:
    """A Q8_0/Q4_0 tensor needs an input width divisible by 32: one error naming the tensor."""
    from kdtune.quantization.gguf_fake_quant import BLOCK_SIZE

    for name, array in tensors.items():
        if types[name] in ("Q8_0", "Q4_0") and array.shape[-1] % BLOCK_SIZE:
            raise ExportError(
                f"{name}: shape {array.shape} has an input width not divisible by {BLOCK_SIZE}, "
                f"so it cannot be stored as {types[name]}; export with --quant f16"
            )


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _merge_string(merge: str | list[str]) -> str:
    return merge if isinstance(merge, str) else " ".join(merge)


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None, where: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` pre-tokenizer it implements.

    * ``ByteLevel`` with its own (GPT-2) regex -> ``gpt-2``;
    * ``Split`` on the Llama-3 regex, then ``ByteLevel`` without regex -> ``llama-bpe``.

    llama.cpp's converter identifies the pre-tokenizer by hashing the tokenizer's output on a
    probe text against known models; this reads the structure instead, so a kdtune student
    whose tokenizer is one of these needs no entry in llama.cpp's table.
    """
    kind = (pre_tokenizer or {}).get("type")
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        steps = pre_tokenizer["pretokenizers"]
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)
        ):
            return "llama-bpe"
    raise ExportError(
        f"{where}: pre_tokenizer {json.dumps(pre_tokenizer)[:200]} is not one kdtune exports "
        "(byte-level GPT-2 or Llama-3 splitting)"
    )


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    """``bos``/``eos``/``unk``/``pad`` -> id (those the tokenizer has)."""
    add_bos: bool
    chat_template: str | None


def hf_vocab(folder: Path, vocab_size: int) -> GGUFVocab:
    """The byte-level BPE of ``folder/tokenizer.json`` (+ ``tokenizer_config.json``) for GGUF.

    Token types follow llama.cpp's converter: added tokens marked special (or spelled
    ``<|...|>``) are CONTROL, other added tokens USER_DEFINED, ids the tokenizer lacks up to
    the model's ``vocab_size`` are ``[PAD<id>]`` UNUSED, the rest NORMAL.
    """
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder}: no tokenizer.json (the GGUF must carry the tokenizer)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: model type {model.get('type')!r}; only byte-level BPE exports")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"), str(path))
    id_to_token = {index: token for token, index in model["vocab"].items()}
    added = {token["id"]: token for token in data.get("added_tokens", [])}
    id_to_token |= {index: token["content"] for index, token in added.items()}
    if max(id_to_token) >= vocab_size:
        raise ExportError(
            f"{path}: token id {max(id_to_token)} is outside the model's vocab_size {vocab_size}"
        )
    tokens, types = [], []
    for index in range(vocab_size):
        token = id_to_token.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            special = added[index].get("special") or (
                token.startswith("<|") and token.endswith("|>")
            )
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)

    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    token_ids = {token: index for index, token in enumerate(tokens)}
    special_ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        value = tok_config.get(f"{role}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in token_ids:
            special_ids[role] = token_ids[value]
    template = tok_config.get("chat_template")
    template_file = folder / "chat_template.jinja"
    if template is None and template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    return GGUFVocab(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=[_merge_string(m) for m in model.get("merges", [])],
        pre=pre,
        special_ids=special_ids,
        add_bos=bool(tok_config.get("add_bos_token", False)),
        chat_template=template if isinstance(template, str) else None,
    )


# ---------------------------------------------------------------------------------------------
# Writing


_FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def _write_metadata(writer, config: dict[str, Any], name: str, quant: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[quant])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for role, token_id in vocab.special_ids.items():
        adders[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def _encode(array: np.ndarray, type_name: str) -> tuple[np.ndarray, Any]:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    if type_name == "F32":
        return array.astype(np.float32), qtype
    if type_name == "F16":
        return array.astype(np.float16), qtype
    return gguf.quants.quantize(array, qtype), qtype


def export_gguf(
    source: str | Path,
    out: str | Path | None = None,
    *,
    quant: str = "q8_0",
    embedding_quant: str | None = None,
) -> ExportResult:
    """Write ``source``'s model (a checkpoint folder or HF folder) as one GGUF file.

    Args:
        source: ``checkpoints/step_N`` (its ``model/`` is read) or a Llama HF folder
            (``config.json``, ``*.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``).
        out: the file to write; default :func:`default_output`. Written beside and renamed.
        quant: ``f16``, ``q8_0`` or ``q4_0`` (the 2-D projections).
        embedding_quant: the token embedding / untied output; None: see the module docstring.

    Raises:
        ExportError: unknown option, a folder that is not a plain Llama with a byte-level BPE
            tokenizer, or a width a block type cannot store (all before any tensor is written).
    """
    check_request(quant, embedding_quant)
    try:
        import gguf  # noqa: F401  (the dev/real extra)
    except ImportError:
        raise ExportError(
            "the GGUF export needs the gguf package: pip install 'kdtune[real]' (or gguf)"
        ) from None
    folder = model_folder(source)
    config = read_llama_config(folder)
    vocab = hf_vocab(folder, config["vocab_size"])
    if embedding_quant is None:
        embedding_quant = "q8_0" if quant == "q4_0" else quant
    tensors = gguf_tensors(read_weights(folder), config)
    types = {name: tensor_type(name, a, quant, embedding_quant) for name, a in tensors.items()}
    check_block_widths(tensors, types)

    out = Path(out) if out is not None else default_output(source, quant)
    name = config.get("_name_or_path") or config.get("_model_name_or_path") or folder.name
    write_gguf(out, config, vocab, tensors, types, quant=quant, name=str(name))
    return ExportResult(out, out.stat().st_size, types)


def write_gguf(
    out: Path,
    config: dict[str, Any],
    vocab: GGUFVocab,
    tensors: dict[str, np.ndarray],
    types: dict[str, str],
    *,
    quant: str,
    name: str,
) -> None:
    """Write the GGUF (metadata, tokenizer, ``tensors`` in ``types``) to ``out`` atomically
    (``<out>.partial``, then renamed). No tensors: a vocabulary-only file."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    _write_metadata(writer, config, name, quant)
    _write_vocab(writer, vocab)
    for tensor_name in sorted(tensors, key=_llama_cpp_order):
        data, qtype = _encode(tensors[tensor_name], types[tensor_name])
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.chmod(partial, 0o644)
    os.replace(partial, out)


def _llama_cpp_order(name: str) -> tuple[int, int, str]:
    """token_embd, then blocks in order, then output_norm/output (as llama.cpp writes them)."""
    match = re.match(r"^blk\.(\d+)\.", name)
    if match:
        return (1, int(match[1]), name)
    return (0 if name == "token_embd.weight" else 2, 0, name)
