"""SmolLM2 as a real teacher: GGUF conversion, tokenizer, pruning, recipe, perplexity parity.

The tests write a tiny GGUF themselves with the ``gguf`` writer, laid out as llama.cpp's
converter lays out a Llama (q/k rows permuted for its interleaved RoPE; Q4_1 matrices through
``gguf.quantize``, F32 norms and embeddings; a byte-level BPE vocabulary; the ChatML template).
The reference forward below reads that file's tensors, decodes the Q4_1 blocks with its own
decoder, and computes what llama.cpp computes (RoPE on adjacent pairs, no permutation), in fp64.
Tests on the real SmolLM2 run only when ``scripts/setup.sh --real`` has made
``./kdtune_real/teacher`` (or ``$KDTUNE_REAL_DIR/teacher``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from kdtune.smollm2.convert import MANIFEST, convert_gguf, verify_folder
from kdtune.smollm2.evaluate import (
    greedy_answer,
    held_out_batches,
    load_smollm2,
    score,
    teacher_log_probs,
)
from kdtune.smollm2.prune import first_and_last, parse_layers, prune_layers
from kdtune.smollm2.tokenizer import IM_END, IM_START, SmolLM2Tokenizer

REPO = Path(__file__).resolve().parents[1]
REAL_TEACHER = Path(os.environ.get("KDTUNE_REAL_DIR", REPO / "kdtune_real")) / "teacher"
needs_real = pytest.mark.skipif(
    not (REAL_TEACHER / MANIFEST).is_file(),
    reason=f"no converted SmolLM2 at {REAL_TEACHER} (run: bash scripts/setup.sh --real)",
)

TINY = {"layers": 3, "dim": 64, "heads": 4, "kv_heads": 2, "ffn": 96, "rope_base": 100000.0}
TINY["head_dim"] = TINY["dim"] // TINY["heads"]
EPS = 1e-5
SPECIALS = ["<|endoftext|>", IM_START, IM_END]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a", "o n"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (byte-level BPE's base tokens)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


def tiny_vocab() -> list[str]:
    return [*SPECIALS, *_byte_alphabet(), *(m.replace(" ", "") for m in MERGES)]


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf ``permute``), from an HF-order matrix."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 3-layer SmolLM2-shaped Llama GGUF: Q4_1 matrices, F32 norms and embeddings."""
    rng = np.random.default_rng(seed)
    t = TINY
    vocab = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(t["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(t["dim"])
    writer.add_feed_forward_length(t["ffn"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_rope_freq_base(t["rope_base"])
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_vocab_size(len(vocab))
    writer.add_rope_dimension_count(t["head_dim"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.3).astype(np.float32)

    def add_q4_1(name: str, weight: np.ndarray) -> None:
        blocks = gguf.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    writer.add_tensor("token_embd.weight", matrix(len(vocab), t["dim"]))
    kv_dim = t["kv_heads"] * t["head_dim"]
    for i in range(t["layers"]):
        norm = lambda: (1 + 0.1 * rng.standard_normal(t["dim"])).astype(np.float32)  # noqa: E731
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        add_q4_1(
            f"blk.{i}.attn_q.weight", _llama_cpp_permute(matrix(t["dim"], t["dim"]), t["heads"])
        )
        add_q4_1(
            f"blk.{i}.attn_k.weight", _llama_cpp_permute(matrix(kv_dim, t["dim"]), t["kv_heads"])
        )
        add_q4_1(f"blk.{i}.attn_v.weight", matrix(kv_dim, t["dim"]))
        add_q4_1(f"blk.{i}.attn_output.weight", matrix(t["dim"], t["dim"]))
        add_q4_1(f"blk.{i}.ffn_gate.weight", matrix(t["ffn"], t["dim"]))
        add_q4_1(f"blk.{i}.ffn_up.weight", matrix(t["ffn"], t["dim"]))
        add_q4_1(f"blk.{i}.ffn_down.weight", matrix(t["dim"], t["ffn"]))
    writer.add_tensor("output_norm.weight", np.ones(t["dim"], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------------------------
# The reference: llama.cpp's computation on the file's tensors, with our own Q4_1 decoder


def decode_q4_1(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_1 blocks of 32: fp16 scale d, fp16 min m, 16 bytes of nibbles (low nibble: element j,
    high nibble: element j + 16); value = d * q + m."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
    nibbles = blocks[:, 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float64)
    return (d * q + m).reshape(rows, cols)


def read_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists dims innermost first
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            array = decode_q4_1(tensor.data, *shape)
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            array = np.asarray(tensor.data, dtype=np.float64).reshape(shape)
        weights[tensor.name] = torch.from_numpy(array)
    return weights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def _rope_adjacent_pairs(x: torch.Tensor) -> torch.Tensor:
    """``[S, H, D]``: rotate each pair (2i, 2i+1) by position * base^(-2i/D) (llama.cpp)."""
    seq, _, dim = x.shape
    freqs = TINY["rope_base"] ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None]  # [S, D/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def reference_logits(
    w: dict[str, torch.Tensor], tokens: list[int], layers: list[int]
) -> torch.Tensor:
    """fp64 logits ``[S, V]`` of one sequence through ``layers`` of the GGUF model."""
    t = TINY
    seq, hd = len(tokens), t["head_dim"]
    x = w["token_embd.weight"][tokens]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in layers:
        h = _rms_norm(x, w[f"blk.{i}.attn_norm.weight"])
        q = (h @ w[f"blk.{i}.attn_q.weight"].T).view(seq, t["heads"], hd)
        k = (h @ w[f"blk.{i}.attn_k.weight"].T).view(seq, t["kv_heads"], hd)
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).view(seq, t["kv_heads"], hd)
        q, k = _rope_adjacent_pairs(q), _rope_adjacent_pairs(k)
        group = t["heads"] // t["kv_heads"]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq, t["dim"])
        x = x + attn @ w[f"blk.{i}.attn_output.weight"].T
        h = _rms_norm(x, w[f"blk.{i}.ffn_norm.weight"])
        gate, up = h @ w[f"blk.{i}.ffn_gate.weight"].T, h @ w[f"blk.{i}.ffn_up.weight"].T
        x = x + (F.silu(gate) * up) @ w[f"blk.{i}.ffn_down.weight"].T
    return _rms_norm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smollm2_tiny")
    (root / "download").mkdir()
    gguf_path = write_tiny_gguf(root / "download" / "tiny.Q4_1.gguf")
    teacher = convert_gguf(gguf_path, root / "teacher")
    return {"root": root, "gguf": gguf_path, "teacher": teacher}


def tiny_builder_overrides(prefix: str, num_layers: int) -> list[str]:
    t = TINY
    return [
        f"{prefix}._component_=kdtune.smollm2.models.smollm2",
        f"{prefix}.vocab_size={len(tiny_vocab())}",
        f"{prefix}.num_layers={num_layers}",
        f"{prefix}.num_heads={t['heads']}",
        f"{prefix}.num_kv_heads={t['kv_heads']}",
        f"{prefix}.embed_dim={t['dim']}",
        f"{prefix}.intermediate_dim={t['ffn']}",
    ]


def _text_records(n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    words = ["the", "is", "a", "on", "then", "this", "at", "he", "tea"]
    return [{"text": " ".join(rng.choice(words, size=20))} for _ in range(n)]


def _eval_cfg(root: Path):
    cfg = OmegaConf.load(REPO / "configs" / "smollm2" / "135M_prune15_kd.yaml")
    cfg.assets_dir = str(root)
    return cfg


# ----------------------------------------------------------------------------------------------
# Conversion


def test_converted_folder_matches_the_reference_forward(tiny, tmp_path):
    """The HF folder computes llama.cpp's logits of the GGUF (Q4_1 decoded independently),
    read by torchtune's FullModelHFCheckpointer into kdtune's SmolLM2 builder, by kdtune's
    loader, and by transformers."""
    from torchtune.training import FullModelHFCheckpointer
    from transformers import AutoModelForCausalLM

    from kdtune.smollm2.models import smollm2_from_hf_config

    reference = read_reference_weights(tiny["gguf"])
    tokens = [1, 40, 77, 3, 200, 9, 150, 2, 5, 100, 260, 33]
    expected = reference_logits(reference, tokens, list(range(TINY["layers"])))
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(tiny["teacher"]),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(tmp_path),
    )
    config = json.loads((tiny["teacher"] / "config.json").read_text())
    torchtune_model = smollm2_from_hf_config(config)
    torchtune_model.load_state_dict(checkpointer.load_checkpoint()["model"])
    hf = AutoModelForCausalLM.from_pretrained(str(tiny["teacher"]), dtype=torch.float64).eval()
    with torch.no_grad():
        got = load_smollm2(tiny["teacher"]).double()(torch.tensor([tokens]))[0].double()
        via_checkpointer = torchtune_model.double().eval()(torch.tensor([tokens]))[0].double()
        via_transformers = hf(input_ids=torch.tensor([tokens])).logits[0]
    for logits in (got, via_checkpointer, via_transformers):
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    # the q/k permutation matters: without llama.cpp's order the logits are far off
    broken = dict(reference)
    for i in range(TINY["layers"]):
        broken[f"blk.{i}.attn_q.weight"] = torch.from_numpy(
            _llama_cpp_permute(reference[f"blk.{i}.attn_q.weight"].numpy(), TINY["heads"])
        )
    assert (reference_logits(broken, tokens, [0, 1, 2]) - got).abs().max() > 1e-2


def test_converted_folder_has_the_hf_files_and_is_reused(tiny):
    folder = tiny["teacher"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["tie_word_embeddings"] is True
    assert (
        json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    )
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    assert verify_folder(folder)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    convert_gguf(tiny["gguf"], folder)  # verified: not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_damaged_conversion_is_detected_and_redone(tiny, tmp_path):
    folder = convert_gguf(tiny["gguf"], tmp_path / "teacher")
    with (folder / "tokenizer.json").open("a") as handle:
        handle.write(" ")
    assert not verify_folder(folder)
    convert_gguf(tiny["gguf"], folder)
    assert verify_folder(folder)


def test_perplexity_equals_transformers_forward(tiny, tmp_path):
    """Held-out perplexity from kdtune's loading equals transformers' own forward of the same
    folder (transformers is the reference client) within 1e-3 nats."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.json").write_text(json.dumps(_text_records(6, seed=1)))
    (tmp_path / "teacher").symlink_to(tiny["teacher"])
    _assert_ce_equals_transformers(tmp_path, max_records=None, tolerance=1e-3)


def _assert_ce_equals_transformers(root: Path, max_records: int | None, tolerance: float):
    from transformers import AutoModelForCausalLM

    batches = held_out_batches(_eval_cfg(root), batch_size=4, max_records=max_records)
    ours = score(None, batches, teacher_log_probs(load_smollm2(root / "teacher"), batches))
    hf = AutoModelForCausalLM.from_pretrained(str(root / "teacher"), dtype=torch.float32).eval()
    nll = count = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = hf(input_ids=batch["tokens"]).logits
            targets = batch["labels"][:, 1:]
            nll += F.cross_entropy(
                logits[:, :-1].flatten(0, 1),
                targets.flatten(),
                ignore_index=CROSS_ENTROPY_IGNORE_IDX,
                reduction="sum",
            ).item()
            count += int((targets != CROSS_ENTROPY_IGNORE_IDX).sum())
    assert ours.num_tokens == count > 0
    assert abs(ours.ce - nll / count) < tolerance, (ours.ce, nll / count)
    return ours


@needs_real
@pytest.mark.slow
def test_real_perplexity_equals_transformers_forward(tmp_path):
    from kdtune.smollm2.text import write_text_data

    write_text_data(tmp_path / "data", SmolLM2Tokenizer(REAL_TEACHER), 127)
    (tmp_path / "teacher").symlink_to(REAL_TEACHER)
    ours = _assert_ce_equals_transformers(tmp_path, max_records=8, tolerance=1e-3)
    assert ours.perplexity < 40  # a working SmolLM2 on Python's docs (a broken one: > 150)
    answer = greedy_answer(
        load_smollm2(REAL_TEACHER),
        SmolLM2Tokenizer(REAL_TEACHER),
        "What is the capital of France?",
        12,
    )
    assert "Paris" in answer


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _hf_ids(folder: Path, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


CHAT = [
    {"role": "user", "content": "then the tea is on\nthe  table"},
    {"role": "assistant", "content": "he is at the tea ünï"},
]


@pytest.mark.parametrize("real", [False, pytest.param(True, marks=needs_real)])
def test_chat_ids_match_the_chat_template(tiny, real):
    folder = REAL_TEACHER if real else tiny["teacher"]
    tokenizer = SmolLM2Tokenizer(folder)
    for messages in (CHAT, [{"role": "system", "content": "Be brief."}, *CHAT]):
        ids, _ = tokenizer.tokenize_messages([Message(m["role"], m["content"]) for m in messages])
        assert ids == _hf_ids(folder, messages)
    prompt, _ = tokenizer.tokenize_messages(
        [Message("user", CHAT[0]["content"]), Message("assistant", "")], add_end_tokens=False
    )
    assert prompt == _hf_ids(folder, CHAT[:1], generation_prompt=True)
    text = "Byte-level: ünïcode, tabs\tand  spaces\n🙂"
    assert tokenizer.decode(tokenizer.encode(text, add_bos=False, add_eos=False)) == text
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)


def test_prompt_tokens_are_masked_in_torchtune_datasets(tiny, tmp_path):
    from torchtune.datasets import chat_dataset, instruct_dataset

    tokenizer = SmolLM2Tokenizer(tiny["teacher"], max_seq_len=512)
    (tmp_path / "instruct.json").write_text(json.dumps([{"input": "the tea", "output": "is on"}]))
    turns = [{"from": "human", "value": "the tea"}, {"from": "gpt", "value": "is on"}]
    (tmp_path / "chat.json").write_text(json.dumps([{"conversations": turns}]))
    instruct = instruct_dataset(
        tokenizer, source="json", data_files=str(tmp_path / "instruct.json"), split="train"
    )[0]
    chat = chat_dataset(
        tokenizer,
        source="json",
        data_files=str(tmp_path / "chat.json"),
        conversation_column="conversations",
        conversation_style="sharegpt",
        split="train",
    )[0]
    question = {"role": "user", "content": "the tea"}
    full = _hf_ids(tiny["teacher"], [question, {"role": "assistant", "content": "is on"}])
    answer_start = len(_hf_ids(tiny["teacher"], [question], generation_prompt=True))
    for sample in (instruct, chat):
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens == full
        assert all(label == CROSS_ENTROPY_IGNORE_IDX for label in labels[:answer_start])
        assert labels[answer_start:] == tokens[answer_start:]  # answer, <|im_end|>, "\n"
        assert tokens[-2] == tokenizer.eos_id


def test_greedy_answer_is_the_argmax_chain(tiny):
    """The KV-cached greedy answer equals a plain loop of full forwards and argmaxes."""
    model = load_smollm2(tiny["teacher"])
    tokenizer = SmolLM2Tokenizer(tiny["teacher"])
    prompt, _ = tokenizer.tokenize_messages(
        [Message("user", "the tea"), Message("assistant", "")], add_end_tokens=False
    )
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            next_id = int(model(torch.tensor([tokens]))[0, -1].argmax())
            if next_id == tokenizer.eos_id:
                break
            tokens.append(next_id)
    expected = tokenizer.decode(tokens[len(prompt) :]).strip()
    assert greedy_answer(model, tokenizer, "the tea", max_new_tokens=10) == expected
    assert not model.caches_are_setup()


# ----------------------------------------------------------------------------------------------
# Pruning


def test_pruned_folder_computes_the_kept_layers(tiny, tmp_path):
    keep = parse_layers("0,-1", TINY["layers"])
    assert keep == [0, 2]
    pruned = prune_layers(tiny["teacher"], tmp_path / "pruned", keep)
    assert json.loads((pruned / "config.json").read_text())["num_hidden_layers"] == 2
    model = load_smollm2(pruned).double()
    tokens = [1, 40, 77, 3, 200, 9]
    expected = reference_logits(read_reference_weights(tiny["gguf"]), tokens, keep)
    with torch.no_grad():
        torch.testing.assert_close(
            model(torch.tensor([tokens]))[0].double(), expected, rtol=0, atol=1e-4
        )
    assert first_and_last(30, 5, 10) == [0, 1, 2, 3, 4, *range(20, 30)]
    for bad in ([], [2, 0], [0, 0], [3]):
        with pytest.raises(ValueError, match="keep"):
            prune_layers(tiny["teacher"], tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="--keep"):
        parse_layers("0-x", 3)
    with pytest.raises(ValueError, match="reversed"):  # '3-1' kept only layer 0 before
        parse_layers("0,3-1", 4)


def test_smollm2_prune_errors_are_one_line_and_never_touch_the_source(tmp_path, capsys):
    from kdtune.smollm2.cli import main as smollm2_main

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"num_hidden_layers": 4}')
    before = sorted(p.name for p in src.iterdir())
    assert smollm2_main(["prune", str(src), str(tmp_path / "dst"), "--keep", "0,3-1"]) == 2
    assert smollm2_main(["prune", str(src), str(src), "--keep", "0-1"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 2 and all(line.startswith("kdtune: error:") for line in lines), err
    assert "reversed" in lines[0] and "SRC" in lines[1]
    assert sorted(p.name for p in src.iterdir()) == before


# ----------------------------------------------------------------------------------------------
# The recipe, through the shipped configs


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread_and_restored_torch_globals")
@pytest.mark.parametrize("arm", ["kd", "ce"])
def test_shipped_configs_train_the_pruned_tiny_model(tiny, tmp_path, kdtune_run, arm):
    """`kdtune run` with the shipped smollm2 config (tiny shapes by override) trains a pruned
    student from the converted teacher and writes a checkpoint kdtune's loader reads back."""
    root = tmp_path / "real"
    (root / "data").mkdir(parents=True)
    for name, seed in (("train", 2), ("val", 3)):
        (root / "data" / f"{name}.json").write_text(json.dumps(_text_records(16, seed)))
    (root / "teacher").symlink_to(tiny["teacher"])
    prune_layers(tiny["teacher"], root / "students" / "prune15", [0, 2])
    out = tmp_path / "out"
    overrides = [
        f"assets_dir={root}",
        f"output_dir={out}",
        "max_steps_per_epoch=3",
        "dtype=fp32",
        "tokenizer.max_seq_len=32",
        "lr_scheduler.num_warmup_steps=1",
        *tiny_builder_overrides("model", 2),
    ]
    if arm == "kd":
        overrides += tiny_builder_overrides("teacher_model", 3)
    kdtune_run(f"smollm2/135M_prune15_{arm}", overrides)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    val = [line for line in lines if line["kind"] == "val"]
    assert len(train) == 3 and all(math.isfinite(line["loss"]) for line in train)
    assert (val[-1]["kl_to_teacher"] is None) == (arm == "ce")
    trained = load_smollm2(out)
    start = load_smollm2(root / "students" / "prune15")
    changed = [
        not torch.equal(a, b)
        for a, b in zip(trained.state_dict().values(), start.state_dict().values())
    ]
    assert any(changed)


# ----------------------------------------------------------------------------------------------
# The demo's table


def test_demo_table_and_verdict():
    from kdtune.smollm2.demo import results_table, verdict

    def row(model, ppl, kl):
        return {"model": model, "perplexity": ppl, "ce": math.log(ppl), "kl_to_teacher": kl,
                "top1_agreement": 0.5}  # fmt: skip

    fixed = [row("teacher", 10.0, 0.0), row("start", 900.0, 4.0)]
    orders = {
        0: [*fixed, row("ce", 40.0, 1.5), row("kd_cache", 30.0, 1.2)],
        1: [*fixed, row("ce", 42.0, 1.6), row("kd_cache", 44.0, 1.3)],
    }
    table = results_table(orders)
    assert "| CE-only fine-tuning | 41.000 ± 1.414 |" in table
    assert table.splitlines()[2].startswith("| teacher (SmolLM2-135M-Instruct) | 10.000 ± 0.000 |")
    assert verdict(orders) == (
        "KD beats CE-only on held-out perplexity and KL to teacher in 1/2 data order(s)."
    )


def test_a_second_demo_run_starts_each_arm_afresh(tmp_path, monkeypatch):
    """``kdtune demo --real`` run twice: each arm's folder from the first run is replaced, so
    the recipe starts fresh instead of refusing the earlier run's checkpoints."""
    import subprocess

    from kdtune.smollm2 import demo

    stale = tmp_path / "runs" / "order0" / "kd_cache" / "checkpoints" / "step_0000012"
    stale.mkdir(parents=True)

    def fake_run(command, stdout, stderr):
        out = Path(next(a for a in command if a.startswith("output_dir=")).split("=", 1)[1])
        assert not out.exists()  # the earlier run's folder is gone before the recipe starts
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.5}\n')
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    run_dir = demo.train_arm(tmp_path, "kd_cache", 0, 12, [])
    assert run_dir == tmp_path / "runs" / "order0" / "kd_cache"

    def failing_run(command, stdout, stderr):
        stdout.write("Traceback ...\nValueError: something named\n")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(demo.subprocess, "run", failing_run)
    with pytest.raises(
        SystemExit, match=r"(?s)the ce run failed; its log is .*ce\.log.*something named"
    ):
        demo.train_arm(tmp_path, "ce", 0, 12, [])


def _demo_root(teacher: Path, tmp_path: Path, records: int) -> Path:
    """A ``kdtune_real``-shaped folder for the demo: the tiny teacher and text data (the
    marker file tells the demo the records are made)."""
    root = tmp_path / "real"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.json").write_text(json.dumps(_text_records(records, 0)))
    (root / "data" / "val.json").write_text(json.dumps(_text_records(8, 1)))
    (root / "data" / "records_47_tokens").write_text("")
    (root / "teacher").symlink_to(teacher)
    return root


def test_demo_prunes_caches_trains_both_arms_and_scores_them(tiny, tmp_path, monkeypatch):
    """``kdtune demo --real`` end to end on the tiny teacher: ``kdtune prune`` makes the
    student, ``kdtune cache-teacher`` caches the demo's records once, both arms train from the
    pruned start (KD from the cache: no teacher loaded), and every model is scored."""
    from kdtune.smollm2 import demo

    root = _demo_root(tiny["teacher"], tmp_path, records=8)
    monkeypatch.setattr(demo, "setup_teacher", lambda r: r / "teacher")
    monkeypatch.setitem(
        demo.STUDENTS, "depth", ["--layers", "2", "--samples", "4", "--seq-len", "32"]
    )
    overrides = [
        "dtype=fp32",
        "tokenizer.max_seq_len=48",
        "lr_scheduler.num_warmup_steps=1",
        "validation_dataset.data_files=" + str(root / "data" / "val.json"),
    ]
    argv = ["--out", str(root), "--orders", "0", "--steps", "2", "--eval-records", "2"]
    assert demo.demo_main([*argv, "--student", "depth", *overrides]) == 0

    student = root / "students" / "depth_half"
    prune = json.loads((student / "prune.json").read_text())
    assert prune["shape"]["layers"] == 2 and "--layers 2" in prune["command"]
    cache = root / "teacher_cache" / "demo_train_8_s48"  # named after the data and its length
    assert (cache / "manifest.json").is_file()
    for arm in ("ce", "kd_cache"):
        train = [
            json.loads(line)
            for line in (root / "runs" / "order0" / arm / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line
        ]
        assert len(train) == 2
    result = json.loads((root / "results.json").read_text())
    models = [row["model"] for row in result["orders"]["0"]]
    assert models == ["teacher", "start", "ce", "kd_cache"]
    assert "recovery_study.py" in (root / "results.md").read_text()

    # a second demo reuses the pruned folder and the cache; another pruning there is refused
    monkeypatch.setattr(demo.subprocess, "run", None)  # nothing may run again
    assert demo.pruned_student(root, root / "teacher", "depth", overrides) == student
    assert demo.teacher_cache(root, root / "data" / "demo_train_8.json", overrides) == cache
    monkeypatch.setitem(demo.STUDENTS, "depth", ["--layers", "1"])
    with pytest.raises(SystemExit, match=r"depth_half holds another pruning .*--out"):
        demo.pruned_student(root, root / "teacher", "depth", overrides)
