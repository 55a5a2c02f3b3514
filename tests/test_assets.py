"""Tests of the tiny offline assets (kdtune.assets): tokenizer, checkpoints, data, command.

References are independent of the code under test: the special-token layout is written out here
from the canonical Llama-3 ordering, the alpaca prompt is re-typed from the Alpaca format, and the
checkpoints are checked against a naive Hugging Face ``LlamaForCausalLM`` forward written below.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from torchtune.datasets import alpaca_dataset
from torchtune.modules.peft import get_adapter_params
from torchtune.training import FullModelHFCheckpointer

from kdtune.assets import TinyAssets, make_tiny_assets
from kdtune.assets.__main__ import main as assets_main
from kdtune.assets.data import instruction_records
from kdtune.assets.models import lora_tiny_student, tiny_student, tiny_teacher

BOTH_VOCABS = ["tiny_assets", "tiny_assets_llama3"]

# Llama-3 special tokens by their offset from <|begin_of_text|> in Meta's layout (128000 + k).
# 11 is unused by torchtune's text layout; the small vocabulary puts <|image|> there.
SPECIAL_OFFSETS = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|finetune_right_pad_id|>": 4,
    "<|step_id|>": 5,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "<|eom_id|>": 8,
    "<|eot_id|>": 9,
    "<|python_tag|>": 10,
    "<|image|>": 11,
    "<|video|>": 12,
}


def read_bpe_ranks(tokenizer_path: Path) -> dict[bytes, int]:
    """Parse a tiktoken file (``base64(token) rank`` per line) without tiktoken."""
    ranks = {}
    for line in tokenizer_path.read_text(encoding="ascii").splitlines():
        token_b64, rank = line.split()
        ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


def expected_special_ids(assets: TinyAssets) -> dict[str, int]:
    """Special ids from the documented layout: right after the BPE ranks (small vocab) or the
    canonical Llama-3 ids (128000 + offset; ``<|image|>`` = 128256) for the 128,256 vocab."""
    if assets.vocab_size == 128_256:
        ids = {token: 128_000 + offset for token, offset in SPECIAL_OFFSETS.items()}
        ids["<|image|>"] = 128_256
        return ids
    num_bpe_ranks = len(read_bpe_ranks(assets.tokenizer_path))
    return {token: num_bpe_ranks + offset for token, offset in SPECIAL_OFFSETS.items()}


def load_checkpoint(checkpoint_dir: Path, output_dir: Path) -> dict[str, Tensor]:
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3",
        output_dir=str(output_dir),
    )
    return checkpointer.load_checkpoint()["model"]


def file_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def naive_hf_llama_logits(hf_weights: dict[str, Tensor], config: dict, tokens: Tensor) -> Tensor:
    """Reference ``LlamaForCausalLM`` forward on Hugging Face weights and config: tokens [S] ->
    logits [S, V]. HF's RoPE rotates the two halves of each head (``rotate_half``), which is why
    torchtune permutes q/k when converting; matching logits prove the files are valid HF Llama."""
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, eps = config["head_dim"], config["rms_norm_eps"]
    seq_len = tokens.shape[0]

    def rms_norm(x: Tensor, weight: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate_half(x: Tensor) -> Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2).double() / head_dim)
    angles = torch.arange(seq_len).double()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles, angles], dim=-1).cos().float()[:, None, :]  # [S, 1, head_dim]
    sin = torch.cat([angles, angles], dim=-1).sin().float()[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()

    hidden = hf_weights["model.embed_tokens.weight"][tokens]  # [S, D]
    for i in range(config["num_hidden_layers"]):
        w = {k.removeprefix(f"model.layers.{i}."): v for k, v in hf_weights.items()}
        x = rms_norm(hidden, w["input_layernorm.weight"])
        q = (x @ w["self_attn.q_proj.weight"].T).view(seq_len, num_heads, head_dim)
        k = (x @ w["self_attn.k_proj.weight"].T).view(seq_len, num_kv_heads, head_dim)
        v = (x @ w["self_attn.v_proj.weight"].T).view(seq_len, num_kv_heads, head_dim)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq_len, num_heads * head_dim)
        hidden = hidden + attn @ w["self_attn.o_proj.weight"].T
        x = rms_norm(hidden, w["post_attention_layernorm.weight"])
        gate, up = x @ w["mlp.gate_proj.weight"].T, x @ w["mlp.up_proj.weight"].T
        hidden = hidden + (F.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    return rms_norm(hidden, hf_weights["model.norm.weight"]) @ hf_weights["lm_head.weight"].T


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("assets_fixture", BOTH_VOCABS)
def test_checkpoints_load_strictly_into_builders(assets_fixture, request, tmp_path):
    assets: TinyAssets = request.getfixturevalue(assets_fixture)
    num_params = {}
    for role, builder, checkpoint_dir in (
        ("teacher", tiny_teacher, assets.teacher_dir),
        ("student", tiny_student, assets.student_dir),
    ):
        state_dict = load_checkpoint(checkpoint_dir, tmp_path / role)
        model = builder(assets.vocab_size)
        model.load_state_dict(state_dict, strict=True)
        assert all(t.dtype == torch.float32 for t in state_dict.values())

        config = json.loads((checkpoint_dir / "config.json").read_text())
        attention = model.layers[0].attn
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["tie_word_embeddings"] is False
        assert config["torch_dtype"] == "float32"
        assert config["vocab_size"] == assets.vocab_size == model.output.out_features
        assert config["hidden_size"] == model.tok_embeddings.embedding_dim
        assert config["num_hidden_layers"] == len(model.layers)
        assert config["num_attention_heads"] == attention.num_heads
        assert config["num_key_value_heads"] == attention.num_kv_heads
        assert config["head_dim"] == attention.head_dim
        assert config["intermediate_size"] == model.layers[0].mlp.w1.out_features
        assert config["max_position_embeddings"] == model.max_seq_len
        num_params[role] = sum(p.numel() for p in model.parameters())
    assert num_params["teacher"] > num_params["student"]


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_checkpoint_matches_reference_hf_llama_forward(tiny_assets, role, tmp_path):
    checkpoint_dir = tiny_assets.teacher_dir if role == "teacher" else tiny_assets.student_dir
    builder = tiny_teacher if role == "teacher" else tiny_student
    model = builder(tiny_assets.vocab_size)
    model.load_state_dict(load_checkpoint(checkpoint_dir, tmp_path), strict=True)
    tokens = torch.randint(
        0, tiny_assets.vocab_size, (24,), generator=torch.Generator().manual_seed(0)
    )

    with torch.no_grad():
        torchtune_logits = model(tokens[None])[0]
    reference_logits = naive_hf_llama_logits(
        load_file(checkpoint_dir / "model.safetensors"),
        json.loads((checkpoint_dir / "config.json").read_text()),
        tokens,
    )
    torch.testing.assert_close(torchtune_logits, reference_logits, rtol=1e-4, atol=1e-4)
    # Sane logits: unit-ish spread, so softmax is neither uniform nor one-hot.
    assert 0.3 < torchtune_logits.std().item() < 3.0


def test_teacher_is_deeper_and_wider(tiny_assets):
    teacher = json.loads((tiny_assets.teacher_dir / "config.json").read_text())
    student = json.loads((tiny_assets.student_dir / "config.json").read_text())
    assert teacher["num_hidden_layers"] > student["num_hidden_layers"]
    assert teacher["hidden_size"] > student["hidden_size"]
    assert teacher["vocab_size"] == student["vocab_size"]


def test_lora_student_loads_student_checkpoint(tiny_assets, tmp_path):
    model = lora_tiny_student(
        tiny_assets.vocab_size, ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4
    )
    result = model.load_state_dict(load_checkpoint(tiny_assets.student_dir, tmp_path), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys  # the adapters
    assert set(result.missing_keys) == set(get_adapter_params(model))


@pytest.mark.parametrize("bad_vocab_size", [0, -5, 512.0, True])
def test_builders_reject_bad_vocab_size(bad_vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_student(bad_vocab_size)


# ------------------------------------------------------------------------------- tokenizer


def test_bpe_file_layout(tiny_assets):
    ranks = read_bpe_ranks(tiny_assets.tokenizer_path)
    assert sorted(ranks.values()) == list(range(len(ranks)))  # ranks 0..N-1, no gaps or repeats
    assert all(ranks[bytes([b])] == b for b in range(256))  # single bytes are ranks 0..255
    assert len(ranks) > 256 + 100  # merges were learnt
    special_ids = expected_special_ids(tiny_assets)
    assert max(special_ids.values()) < tiny_assets.vocab_size
    assert tiny_assets.vocab_size % 64 == 0


@pytest.mark.parametrize("assets_fixture", BOTH_VOCABS)
def test_tokenizer_special_token_ids(assets_fixture, request):
    assets: TinyAssets = request.getfixturevalue(assets_fixture)
    tokenizer = assets.build_tokenizer()
    expected = expected_special_ids(assets)
    assert tokenizer.bos_id == expected["<|begin_of_text|>"]
    assert tokenizer.eos_id == expected["<|end_of_text|>"]
    assert tokenizer.pad_id == expected["<|finetune_right_pad_id|>"]
    assert tokenizer.step_id == expected["<|step_id|>"]
    assert tokenizer.start_header_id == expected["<|start_header_id|>"]
    assert tokenizer.end_header_id == expected["<|end_header_id|>"]
    assert tokenizer.eot_id == expected["<|eot_id|>"]
    assert tokenizer.eom_id == expected["<|eom_id|>"]
    assert tokenizer.python_tag == expected["<|python_tag|>"]
    assert tokenizer.image_id == expected["<|image|>"]
    assert tokenizer.special_tokens["<|video|>"] == expected["<|video|>"]
    ids = tokenizer.encode("hello", add_bos=True, add_eos=True)
    assert ids[0] == expected["<|begin_of_text|>"]
    assert ids[-1] == expected["<|end_of_text|>"]


@pytest.mark.parametrize(
    "text",
    [
        "Add the two numbers.\n\n12 + 30",
        "  leading and trailing spaces  \n\ttabs\r\n",
        "café naïve über piñata crème",
        "日本語のテキスト, Ελληνικά, русский, emoji 😀🚀",
        "<|eot_id|> is plain text when encoded",
    ],
)
def test_tokenizer_round_trips_text(tiny_assets, text):
    tokenizer = tiny_assets.build_tokenizer()
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.eot_id not in ids  # special-token text is never turned into a special id
    assert all(0 <= i < len(read_bpe_ranks(tiny_assets.tokenizer_path)) for i in ids)


def test_tokenizer_compresses_the_corpus(tiny_assets):
    tokenizer = tiny_assets.build_tokenizer()
    text = "\n".join(r["instruction"] + " " + r["input"] for r in instruction_records("val"))
    num_tokens = len(tokenizer.encode(text, add_bos=False, add_eos=False))
    assert num_tokens < 0.5 * len(text.encode("utf-8"))


@pytest.mark.parametrize("assets_fixture", BOTH_VOCABS)
def test_dataset_ids_fit_model_vocab(assets_fixture, request):
    assets: TinyAssets = request.getfixturevalue(assets_fixture)
    tokenizer = assets.build_tokenizer()
    for data_file in (assets.train_data, assets.val_data):
        dataset = alpaca_dataset(tokenizer, source="json", data_files=str(data_file), split="train")
        max_id = max(max(dataset[i]["tokens"]) for i in range(len(dataset)))
        assert max_id < assets.vocab_size
    # torchtune's <|image|> id (128256) is the one id outside a 128,256-row model; it is only
    # emitted for image content, never from text (checked above). The small layout covers it.
    if assets.vocab_size == 128_256:
        assert tokenizer.image_id == assets.vocab_size
    else:
        assert max(tokenizer.special_tokens.values()) < assets.vocab_size


# ---------------------------------------------------------------------------------- data


def test_data_files_hold_the_documented_records(tiny_assets):
    train = json.loads(tiny_assets.train_data.read_text(encoding="utf-8"))
    val = json.loads(tiny_assets.val_data.read_text(encoding="utf-8"))
    assert train == instruction_records("train")
    assert val == instruction_records("val")
    assert 200 <= len(train) <= 1000 and 30 <= len(val) <= 100
    for record in train + val:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(value, str) for value in record.values())
        assert record["instruction"] and record["output"]
    keys = [(r["instruction"], r["input"]) for r in train + val]
    assert len(set(keys)) == len(keys)  # no duplicates, no train/val leakage
    assert any(r["input"] == "" for r in train)  # exercises alpaca's no-input prompt
    assert any(not r["output"].isascii() for r in train)


def alpaca_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt (Taori et al.), typed out independently of torchtune."""
    head = (
        "Below is an instruction that describes a task{}. "
        "Write a response that appropriately completes the request.\n\n"
    )
    if record["input"]:
        return (
            head.format(", paired with an input that provides further context")
            + f"### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}\n\n"
            "### Response:\n"
        )
    return head.format("") + f"### Instruction:\n{record['instruction']}\n\n### Response:\n"


@pytest.mark.parametrize("train_on_input", [False, True])
def test_alpaca_dataset_masks_prompt_labels(tiny_assets, train_on_input):
    tokenizer = tiny_assets.build_tokenizer()
    dataset = alpaca_dataset(
        tokenizer,
        source="json",
        data_files=str(tiny_assets.val_data),
        split="train",
        train_on_input=train_on_input,
    )
    records = instruction_records("val")
    assert len(dataset) == len(records)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=False, add_eos=False)

    def header(role: str) -> list[int]:
        return [tokenizer.start_header_id, *encode(role), tokenizer.end_header_id, *encode("\n\n")]

    ignore = -100
    for i, record in enumerate(records):
        user = [*header("user"), *encode(alpaca_prompt(record).strip()), tokenizer.eot_id]
        assistant = [*header("assistant"), *encode(record["output"]), tokenizer.eot_id]
        expected_tokens = [tokenizer.bos_id, *user, *assistant, tokenizer.eos_id]
        prompt_labels = user if train_on_input else [ignore] * len(user)
        expected_labels = [ignore, *prompt_labels, *assistant, ignore]  # bos and eos masked

        sample = dataset[i]
        assert sample["tokens"] == expected_tokens
        assert [int(label) for label in sample["labels"]] == expected_labels


# --------------------------------------------------------------------- build, determinism


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tmp_path):
    make_tiny_assets(tmp_path / "a", seed=1)
    make_tiny_assets(tmp_path / "b", seed=1)
    make_tiny_assets(tmp_path / "c", seed=2)
    hashes_a, hashes_b, hashes_c = (file_hashes(tmp_path / name) for name in "abc")
    assert hashes_a == hashes_b
    assert set(hashes_a) == set(hashes_c)
    for name in ("teacher/model.safetensors", "student/model.safetensors"):
        assert hashes_a[name] != hashes_c[name]
    # The seed controls weights only: tokenizer and data are shared by every seed.
    for name in ("tokenizer.model", "data/train.json", "data/val.json", "special_tokens.json"):
        assert hashes_a[name] == hashes_c[name]
    teacher_a = load_file(tmp_path / "a" / "teacher" / "model.safetensors")
    teacher_c = load_file(tmp_path / "c" / "teacher" / "model.safetensors")
    assert not torch.equal(teacher_a["lm_head.weight"], teacher_c["lm_head.weight"])


def test_folder_layout_matches_contract(tiny_assets):
    root = tiny_assets.root
    assert tiny_assets == TinyAssets(
        root=root,
        tokenizer_path=root / "tokenizer.model",
        special_tokens_path=root / "special_tokens.json",
        teacher_dir=root / "teacher",
        student_dir=root / "student",
        train_data=root / "data" / "train.json",
        val_data=root / "data" / "val.json",
        vocab_size=512,
    )
    for checkpoint_dir in (tiny_assets.teacher_dir, tiny_assets.student_dir):
        assert (checkpoint_dir / "config.json").is_file()
        assert (checkpoint_dir / "model.safetensors").is_file()


def test_complete_folder_is_reused_and_incomplete_one_rebuilt(tmp_path):
    first = make_tiny_assets(tmp_path, seed=3)
    weights = first.student_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert make_tiny_assets(tmp_path, seed=3) == first
    assert weights.stat().st_mtime_ns == mtime  # reused, not rewritten

    original = file_hashes(tmp_path)
    weights.unlink()
    make_tiny_assets(tmp_path, seed=3)
    assert file_hashes(tmp_path) == original


def test_folder_made_with_other_arguments_is_refused(tmp_path):
    make_tiny_assets(tmp_path, seed=0)
    with pytest.raises(ValueError, match="seed=0"):
        make_tiny_assets(tmp_path, seed=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"vocab": "big"}, "vocab"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_tiny_assets(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # validated before anything is written


# -------------------------------------------------------------------------------- command


@pytest.mark.slow
def test_command_writes_assets(tmp_path):
    out = tmp_path / "assets"
    completed = subprocess.run(
        [sys.executable, "-m", "kdtune.assets", "--out", str(out), "--seed", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert str(out / "student" / "model.safetensors") in completed.stdout
    assert file_hashes(out) == file_hashes(make_tiny_assets(tmp_path / "in_process", seed=4).root)


def test_command_reuses_and_rejects_bad_arguments(tmp_path, capsys):
    make_tiny_assets(tmp_path, seed=0)
    assert assets_main(["--out", str(tmp_path)]) == 0
    assert "reused" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        assets_main(["--out", str(tmp_path), "--vocab", "big"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        assets_main(["--out", str(tmp_path), "--seed", "-1"])
    assert exit_info.value.code == 2
