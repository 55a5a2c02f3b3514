"""``kdtune export --format gguf``: the file, read back by an independent reader (Hugging Face
transformers' GGUF loader, ``from_pretrained(..., gguf_file=...)``), is the student kdtune trained.

* logits: transformers' model from the GGUF == kdtune's own forward (the torchtune decoder of the
  HF folder) with the same fake quantisation applied to its weights (fp32, atol 1e-4; f16: the
  weights rounded to fp16);
* tokenizer: transformers' tokenizer from the GGUF encodes text and chats exactly as kdtune's
  SmolLM2 tokenizer on the HF folder does (tiny real-format tokenizer, and the real SmolLM2 one
  when ``./kdtune_real/teacher`` exists);
* errors: a non-Llama folder, an unknown ``--quant``, a width Q8_0/Q4_0 cannot store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import save_file
from test_smollm2 import REAL_TEACHER, needs_real, write_tiny_gguf
from torchtune.data import Message

from kdtune.cli.main import main as kdtune_main
from kdtune.models.hf_llama import load_hf_folder
from kdtune.quantization import gguf_export
from kdtune.quantization.gguf_export import ExportError, export_gguf, hf_vocab, write_gguf
from kdtune.quantization.gguf_fake_quant import gguf_fake_quantize
from kdtune.smollm2.convert import convert_gguf
from kdtune.smollm2.tokenizer import SmolLM2Tokenizer
from kdtune.training.checkpoint.layout import MODEL_DIRNAME

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CHATS = [
    [{"role": "user", "content": "what is the tea on 12 tables?"}],
    [
        {"role": "system", "content": "Be short."},
        {"role": "user", "content": "Is  this\tthe one?\n\nYes: 3.14, ünïcode, 🦙"},
        {"role": "assistant", "content": "then he is at the tea"},
    ],
]
TEXTS = [
    "the tea is on  the table",
    "  leading spaces\nand\n\nnew lines",
    "1234 + 56 = 1290",
    "é🦙",
]


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SmolLM2-format folder (byte-level BPE tokenizer.json, ChatML template), made the
    way ``kdtune smollm2`` makes the real one (tests/test_smollm2.py's writer + convert_gguf)."""
    root = tmp_path_factory.mktemp("gguf_export")
    return convert_gguf(write_tiny_gguf(root / "tiny.Q4_1.gguf"), root / "teacher")


def make_student(
    folder: Path, tokenizer_from: Path, *, tied: bool = True, head_dim: int | None = None
) -> Path:
    """A random Llama student (HF names and layout) with the tiny SmolLM2 tokenizer."""
    config = json.loads((tokenizer_from / "config.json").read_text())
    config["tie_word_embeddings"] = tied
    if head_dim is not None:
        config["head_dim"] = head_dim
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or hidden // heads
    g = torch.Generator().manual_seed(7 + (head_dim or 0) + 2 * tied)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    weights = {"model.embed_tokens.weight": rand(config["vocab_size"], hidden, scale=1.0)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        weights |= {
            f"{prefix}.input_layernorm.weight": 1 + rand(hidden, scale=0.1),
            f"{prefix}.post_attention_layernorm.weight": 1 + rand(hidden, scale=0.1),
            f"{prefix}.self_attn.q_proj.weight": rand(heads * hd, hidden),
            f"{prefix}.self_attn.k_proj.weight": rand(kv_heads * hd, hidden),
            f"{prefix}.self_attn.v_proj.weight": rand(kv_heads * hd, hidden),
            f"{prefix}.self_attn.o_proj.weight": rand(hidden, heads * hd),
            f"{prefix}.mlp.gate_proj.weight": rand(ffn, hidden),
            f"{prefix}.mlp.up_proj.weight": rand(ffn, hidden),
            f"{prefix}.mlp.down_proj.weight": rand(hidden, ffn),
        }
    weights["model.norm.weight"] = 1 + rand(hidden, scale=0.1)
    if not tied:
        weights["lm_head.weight"] = rand(config["vocab_size"], hidden)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def fake_quantised_kdtune_logits(
    folder: Path, tokens: list[int], quant: str, embedding_quant: str
) -> torch.Tensor:
    """kdtune's forward ``[S, V]`` (torchtune decoder of the HF folder, fp32) with every 2-D
    weight replaced by what the GGUF stores: fake-quantised, or rounded to fp16."""
    model = load_hf_folder(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2:
                continue
            qtype = embedding_quant if name in ("tok_embeddings.weight", "output.weight") else quant
            if qtype == "f16":
                param.copy_(param.half().float())
            else:
                param.copy_(gguf_fake_quantize(param, qtype, name))
        return model(torch.tensor([tokens]))[0]


def transformers_gguf_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def gguf_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize(
    ("quant", "embedding_quant", "tied", "head_dim"),
    [
        ("f16", None, True, None),
        ("q8_0", None, True, None),
        ("q4_0", None, True, None),
        ("q4_0", "q4_0", False, 32),  # untied head; head_dim != hidden / heads (width-pruned)
        ("q8_0", "f16", False, None),
    ],
)
def test_transformers_reads_back_the_fake_quantised_student(
    tiny_smollm2, tmp_path, quant, embedding_quant, tied, head_dim
):
    folder = make_student(tmp_path / "student", tiny_smollm2, tied=tied, head_dim=head_dim)
    result = export_gguf(
        folder, tmp_path / "out" / "s.gguf", quant=quant, embedding_quant=embedding_quant
    )
    expected_embedding = embedding_quant or ("q8_0" if quant == "q4_0" else quant)

    types = gguf_types(result.path)
    assert types == result.tensor_types
    assert ("output.weight" in types) == (not tied)
    for name, type_name in types.items():
        if name.endswith("norm.weight"):
            assert type_name == "F32", name
        elif name in ("token_embd.weight", "output.weight"):
            assert type_name == expected_embedding.upper(), name
        else:
            assert type_name == quant.upper(), name

    tokens = [1, 5, 77, 200, 3, 264, 9, 150, 42, 2, 100, 31]
    ours = fake_quantised_kdtune_logits(folder, tokens, quant, expected_embedding)
    theirs = transformers_gguf_logits(result.path, tokens)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    # the quantisation is visible: the unquantised forward is farther away than the tolerance
    plain = load_hf_folder(folder)(torch.tensor([tokens]))[0].detach()
    assert (plain - theirs).abs().max() > 1e-3


def test_metadata_is_llama_cpps(tiny_smollm2, tmp_path):
    folder = make_student(tmp_path / "student", tiny_smollm2)
    config = json.loads((folder / "config.json").read_text())
    path = export_gguf(folder, tmp_path / "s.gguf", quant="q4_0").path
    fields = {name: field.contents() for name, field in gguf.GGUFReader(str(path)).fields.items()}
    expected = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
        "llama.vocab_size": config["vocab_size"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",  # the folder's tokenizer.json: ByteLevel with its regex
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert fields["tokenizer.ggml.merges"] == [
        m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]
    ]
    token_types = fields["tokenizer.ggml.token_type"]
    assert token_types[:3] == [gguf.TokenType.CONTROL] * 3  # <|endoftext|>, <|im_start|>, ...
    assert set(token_types[3:]) == {gguf.TokenType.NORMAL}
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    assert fields["tokenizer.chat_template"] == template


def _assert_tokenizer_round_trip(folder: Path, gguf_path: Path) -> None:
    from transformers import AutoTokenizer

    ours = SmolLM2Tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, False, False)
    for chat in CHATS:
        expected, _ = ours.tokenize_messages([Message(m["role"], m["content"]) for m in chat])
        ids = theirs.apply_chat_template(chat, tokenize=True, return_dict=False)
        assert list(ids) == expected
        prompt, _ = ours.tokenize_messages(
            [Message(m["role"], m["content"]) for m in chat[:1]] + [Message("assistant", "")],
            add_end_tokens=False,
        )
        ids = theirs.apply_chat_template(
            chat[:1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert list(ids) == prompt
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
    )


def test_tokenizer_read_back_encodes_chats_as_kdtune(tiny_smollm2, tmp_path):
    folder = make_student(tmp_path / "student", tiny_smollm2)
    path = export_gguf(folder, tmp_path / "s.gguf", quant="q8_0").path
    _assert_tokenizer_round_trip(folder, path)


@needs_real
def test_real_smollm2_tokenizer_read_back_encodes_chats_as_kdtune(tmp_path):
    """The real 49k-token vocabulary (a vocabulary-only GGUF: the same metadata, no tensors)."""
    config = json.loads((REAL_TEACHER / "config.json").read_text())
    path = tmp_path / "vocab.gguf"
    vocab = hf_vocab(REAL_TEACHER, config["vocab_size"])
    write_gguf(path, config, vocab, {}, {}, quant="f16", name="vocab")
    _assert_tokenizer_round_trip(REAL_TEACHER, path)


def test_cli_exports_a_checkpoint_beside_its_model_folder(tiny_smollm2, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoints" / "step_4"
    make_student(checkpoint / MODEL_DIRNAME, tiny_smollm2)
    assert gguf_export.MODEL_DIRNAME == MODEL_DIRNAME
    assert kdtune_main(["export", str(checkpoint), "--format", "gguf", "--quant", "q4_0"]) == 0
    written = checkpoint / "gguf" / "model-q4_0.gguf"
    assert written.is_file() and f"Wrote {written}" in capsys.readouterr().out
    assert not list(written.parent.glob("*.partial"))


def test_non_llama_folder_is_one_line_error(tiny_smollm2, tmp_path, capsys):
    folder = make_student(tmp_path / "student", tiny_smollm2)
    config = json.loads((folder / "config.json").read_text())
    qwen2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config | qwen2))
    with pytest.raises(ExportError, match=r"model_type 'qwen2'.*model_type llama only"):
        export_gguf(folder, tmp_path / "x.gguf")
    (folder / "config.json").write_text(
        json.dumps(config | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    assert kdtune_main(["export", str(folder), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a Llama-family causal LM" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ExportError, match=r"no config\.json here nor in"):
        export_gguf(tmp_path / "nowhere")


def test_unknown_quant_is_an_error(tiny_smollm2, tmp_path, capsys):
    folder = make_student(tmp_path / "student", tiny_smollm2)
    with pytest.raises(SystemExit) as exit_info:
        kdtune_main(["export", str(folder), "--quant", "q5_k"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'q5_k'" in capsys.readouterr().err
    with pytest.raises(ExportError, match=r"--quant 'q5_k' is unknown; choose one of f16, q8_0"):
        export_gguf(folder, quant="q5_k")
    with pytest.raises(ExportError, match=r"--embedding-quant 'int8' is unknown"):
        export_gguf(folder, quant="q8_0", embedding_quant="int8")


def test_width_not_divisible_by_32_names_the_tensor(tiny_smollm2, tmp_path):
    folder = make_student(tmp_path / "student", tiny_smollm2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 80}))
    weights = gguf_export.read_weights(folder)
    for i in range(config["num_hidden_layers"]):
        for part in ("gate_proj", "up_proj"):
            weights[f"model.layers.{i}.mlp.{part}.weight"] = torch.zeros(80, 64)
        weights[f"model.layers.{i}.mlp.down_proj.weight"] = torch.zeros(64, 80)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(
        ExportError, match=r"blk\.0\.ffn_down\.weight: shape \(64, 80\).*--quant f16"
    ):
        export_gguf(folder, tmp_path / "x.gguf", quant="q4_0")
    export_gguf(folder, tmp_path / "x.gguf", quant="f16")  # f16 stores any width


def test_folder_without_tokenizer_json(tiny_smollm2, tmp_path):
    folder = make_student(tmp_path / "student", tiny_smollm2)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"no tokenizer\.json"):
        export_gguf(folder, tmp_path / "x.gguf")
