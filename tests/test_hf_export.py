"""Step checkpoints load as-is in Hugging Face transformers and peft (the real libraries).

``step_N/model/`` must give the student's logits through ``AutoModelForCausalLM`` with peft
installed (no adapter file may sit in it), ``step_N/adapter/`` the same logits through
``AutoPeftModelForCausalLM``; the Qwen2 adapter must not get Llama's RoPE permutation; files are
0644; the training state sits beside ``model/``. The torchtune student is the reference. A
Qwen2 DoRA student has no PEFT equivalent (torchtune's DoRA scales the q/k/v biases): its
``model/`` must still be exact and its ``adapter/`` must hold no PEFT files.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchtune import training
from torchtune.models.qwen2._component_builders import lora_qwen2
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
from torchtune.modules.peft import disable_adapter
from torchtune.training import FullModelHFCheckpointer

from kdtune.assets.models import lora_tiny_student, tiny_student
from kdtune.demo.evaluate import resolve_checkpoint_dir
from kdtune.training.checkpoint.layout import (
    ADAPTER_DIRNAME,
    ADAPTER_FILENAME,
    MANIFEST_FILENAME,
    MODEL_DIRNAME,
    TRAINING_STATE_FILENAME,
    latest_checkpoint,
)
from kdtune.training.checkpoint.save import weights_to_save, write_hf_weights

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

# fp32 throughout. Merged vs unmerged adapters and HF vs torchtune kernels differ by rounding
# (measured up to 4e-5 on logits of about unit scale); a misplaced RoPE row costs about 0.5.
ATOL, RTOL = 1e-4, 1e-5
SHORT_RUN = ("max_steps_per_epoch=2", "validate_every_n_steps=null", "log_every_n_steps=1")
LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------
# Clients and references
# ---------------------------------------------------------------------------------------------


def tokens_for(vocab_size: int) -> Tensor:
    """``[2, 12]`` token ids, fixed."""
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def hf_logits(folder: Path, tokens: Tensor) -> Tensor:
    """``[B, S, V]`` logits of ``AutoModelForCausalLM.from_pretrained(folder)`` in fp32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()(tokens).logits


@torch.no_grad()
def peft_logits(folder: Path, tokens: Tensor) -> Tensor:
    """``[B, S, V]`` logits of ``AutoPeftModelForCausalLM.from_pretrained(folder)`` in fp32."""
    model = peft.AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()(tokens).logits


@torch.no_grad()
def tune_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    return model.eval()(tokens)


def read_hf(folder: Path, model_type: str, files: list[str], scratch: Path) -> dict[str, Tensor]:
    """A HF folder's weights in torchtune keys, read by torchtune's own checkpointer."""
    reader = FullModelHFCheckpointer(
        checkpoint_dir=str(folder),
        checkpoint_files=files,
        model_type=model_type,
        output_dir=str(scratch),
    )
    return reader.load_checkpoint()[training.MODEL_KEY]


def saved_shards(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("model-*.safetensors"))


def assert_files_0644(folder: Path) -> None:
    modes = {
        str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in folder.rglob("*")
        if p.is_file()
    }
    assert modes and set(modes.values()) == {"0o644"}, modes


def assert_model_folder(step: Path) -> None:
    """``model/``: a HF folder, no adapter file, no training state; the state sits beside it."""
    model_dir = step / MODEL_DIRNAME
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors.index.json"} <= names and saved_shards(model_dir)
    assert not {n for n in names if n.startswith("adapter")}, names
    assert TRAINING_STATE_FILENAME not in names and MANIFEST_FILENAME not in names
    assert (step / TRAINING_STATE_FILENAME).is_file()
    assert_files_0644(model_dir)


def assert_adapter_config(adapter_dir: Path, *, base: Path, targets: list[str], **values) -> None:
    """A complete PEFT LoraConfig: only PEFT's own fields, the base folder, HF module names."""
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert set(saved) <= {field.name for field in dataclasses.fields(peft.LoraConfig)}
    expected = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base.resolve()),
        "target_modules": targets,
        "bias": "none",
        "use_rslora": False,
        **values,
    }
    assert {key: saved[key] for key in expected} == expected


# ---------------------------------------------------------------------------------------------
# The real recipe, tiny Llama students
# ---------------------------------------------------------------------------------------------


def test_full_student_model_folder_loads_in_transformers(kdtune_run, tiny_assets, tmp_path) -> None:
    out = tmp_path / "full"
    kdtune_run(
        "tiny/full_chunked", [f"assets_dir={tiny_assets.root}", f"output_dir={out}", *SHORT_RUN]
    )
    step = latest_checkpoint(out)
    assert_model_folder(step)
    assert not (step / ADAPTER_DIRNAME).exists()

    model_dir = step / MODEL_DIRNAME
    student = tiny_student(tiny_assets.vocab_size)
    student.load_state_dict(read_hf(model_dir, "LLAMA3", saved_shards(model_dir), tmp_path / "r"))
    tokens = tokens_for(tiny_assets.vocab_size)
    expected = tune_logits(student, tokens)
    torch.testing.assert_close(hf_logits(model_dir, tokens), expected, atol=ATOL, rtol=RTOL)
    # The evaluation tools find model/ from the run, the step or the folder itself.
    assert {resolve_checkpoint_dir(p) for p in (out, step, model_dir)} == {model_dir}


def test_lora_student_exports_and_adapter_only_resume(kdtune_run, tiny_assets, tmp_path) -> None:
    """A LoRA run: ``model/`` (merged) and ``adapter/`` (PEFT) give the student's logits, with
    peft installed; ``save_adapter_weights_only`` writes ``adapter/`` alone and resumes from it
    to the same adapters."""
    common = [f"assets_dir={tiny_assets.root}", *SHORT_RUN]
    merged_run, adapter_run = tmp_path / "merged", tmp_path / "adapter_only"
    kdtune_run("tiny/lora_chunked", [*common, f"output_dir={merged_run}"])
    only = [*common, f"output_dir={adapter_run}", "save_adapter_weights_only=true"]
    kdtune_run("tiny/lora_chunked", [*only, "stop_after_steps=1"])
    kdtune_run("tiny/lora_chunked", [*only, "resume_from_checkpoint=true"])

    step = latest_checkpoint(merged_run)
    assert_model_folder(step)
    adapter_dir = step / ADAPTER_DIRNAME
    assert_files_0644(adapter_dir)
    assert_adapter_config(
        adapter_dir,
        base=tiny_assets.student_dir,
        targets=LLAMA_TARGETS,
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        use_dora=False,
    )

    # The student: the original base weights plus the trained adapters, in torchtune.
    student = lora_tiny_student(
        tiny_assets.vocab_size,
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
    )
    base = read_hf(tiny_assets.student_dir, "LLAMA3", ["model.safetensors"], tmp_path / "r")
    adapters = torch.load(adapter_dir / ADAPTER_FILENAME, weights_only=True)
    student.load_state_dict({**base, **adapters}, strict=True)
    tokens = tokens_for(tiny_assets.vocab_size)
    expected = tune_logits(student, tokens)
    with torch.no_grad(), disable_adapter(student):
        assert (student(tokens) - expected).abs().max() > 1e-2  # the adapters matter

    model_dir = step / MODEL_DIRNAME
    assert transformers.utils.is_peft_available()  # it would apply an adapter_config.json here
    torch.testing.assert_close(hf_logits(model_dir, tokens), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(peft_logits(adapter_dir, tokens), expected, atol=ATOL, rtol=RTOL)
    # save_adapter_weights_only: adapter/ alone; resumed from it, the same adapters as above.
    only_step = latest_checkpoint(adapter_run)
    assert only_step.name == step.name and not (only_step / MODEL_DIRNAME).exists()
    assert (only_step / TRAINING_STATE_FILENAME).is_file()
    with pytest.raises(ValueError, match="save_adapter_weights_only"):
        resolve_checkpoint_dir(adapter_run)
    assert_files_0644(only_step / ADAPTER_DIRNAME)
    for name in (ADAPTER_FILENAME, "adapter_model.safetensors"):
        ours = (load_file if name.endswith("safetensors") else torch.load)(
            only_step / ADAPTER_DIRNAME / name
        )
        theirs = (load_file if name.endswith("safetensors") else torch.load)(adapter_dir / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name


# ---------------------------------------------------------------------------------------------
# The save path: tiny Qwen2 (no RoPE permutation in its HF conversion) and DoRA students
# ---------------------------------------------------------------------------------------------

QWEN2_DIMS = {
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "embed_dim": 64,
    "intermediate_dim": 128,
    "max_seq_len": 64,
    "norm_eps": 1e-6,
    "rope_base": 1_000_000.0,
    "tie_word_embeddings": True,  # as Qwen2.5-0.5B/1.5B (the shipped qwen2_5 student)
}
QWEN2_VOCAB = 256


def write_tiny_qwen2(folder: Path) -> None:
    """A random tiny Qwen2 as a HF folder (``config.json``, ``model.safetensors``)."""
    from torchtune.models.qwen2 import qwen2

    torch.manual_seed(0)
    model = qwen2(vocab_size=QWEN2_VOCAB, **QWEN2_DIMS)
    with torch.no_grad():  # unit-scale logits through the tied output (default init: ~70)
        model.tok_embeddings.weight.mul_(QWEN2_DIMS["embed_dim"] ** -0.5)
    d = QWEN2_DIMS
    hf = qwen2_tune_to_hf(
        model.state_dict(),
        num_heads=d["num_heads"],
        num_kv_heads=d["num_kv_heads"],
        dim=d["embed_dim"],
        tie_word_embeddings=True,
    )
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": QWEN2_VOCAB,
        "hidden_size": d["embed_dim"],
        "intermediate_size": d["intermediate_dim"],
        "num_hidden_layers": d["num_layers"],
        "num_attention_heads": d["num_heads"],
        "num_key_value_heads": d["num_kv_heads"],
        "max_position_embeddings": d["max_seq_len"],
        "rms_norm_eps": d["norm_eps"],
        "rope_theta": d["rope_base"],
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def randomize_adapters(model: nn.Module) -> None:
    """Non-zero adapters (a fresh lora_b is zero) and DoRA magnitudes off the weight norms,
    large enough that a misplaced row shows in the logits."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("magnitude"):
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(
    ("family", "use_dora"), [("qwen2", False), ("qwen2", True), ("llama", True)]
)
def test_saved_adapter_gives_the_student_in_peft(family, use_dora, tiny_assets, tmp_path):
    """Every module of every layer adapted (q/k included: the RoPE-permuted ones for Llama)."""
    attn = ["q_proj", "k_proj", "v_proj", "output_proj"]
    if family == "qwen2":
        base_dir = tmp_path / "qwen2"
        write_tiny_qwen2(base_dir)
        model_type, vocab = "QWEN2", QWEN2_VOCAB
        student = lora_qwen2(
            lora_attn_modules=attn,
            apply_lora_to_mlp=True,
            vocab_size=vocab,
            lora_rank=4,
            lora_alpha=8,
            use_dora=use_dora,
            **QWEN2_DIMS,
        )
    else:
        base_dir, model_type, vocab = tiny_assets.student_dir, "LLAMA3", tiny_assets.vocab_size
        student = lora_tiny_student(
            vocab, attn, apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8, use_dora=use_dora
        )
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(base_dir),
        checkpoint_files=["model.safetensors"],
        model_type=model_type,
        output_dir=str(tmp_path / "unused"),
    )
    student.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY], strict=False)
    if use_dora:
        for module in student.modules():
            if hasattr(module, "initialize_dora_magnitude"):
                module.initialize_dora_magnitude()
    randomize_adapters(student)
    tokens = tokens_for(vocab)
    expected = tune_logits(student, tokens)

    state = {key: value.clone() for key, value in student.state_dict().items()}
    step = tmp_path / "step"
    step.mkdir()
    weights = weights_to_save(student, state, is_lora=True, adapter_only=False)
    write_hf_weights(checkpointer, weights, step, adapter_only=False)

    torch.testing.assert_close(
        hf_logits(step / MODEL_DIRNAME, tokens), expected, atol=ATOL, rtol=RTOL
    )
    assert_files_0644(step)
    adapter_dir = step / ADAPTER_DIRNAME
    assert (adapter_dir / ADAPTER_FILENAME).is_file()
    if family == "qwen2" and use_dora:
        # torchtune's DoRA scales Qwen2's q/k/v biases, PEFT's cannot: no PEFT files.
        assert sorted(p.name for p in adapter_dir.iterdir()) == [ADAPTER_FILENAME]
        return
    assert_adapter_config(
        adapter_dir, base=base_dir, targets=LLAMA_TARGETS, r=4, lora_alpha=8, use_dora=use_dora
    )
    torch.testing.assert_close(peft_logits(adapter_dir, tokens), expected, atol=ATOL, rtol=RTOL)


def test_model_types_without_a_peft_mapping_are_refused_before_loading():
    """Phi-3's fused projections have no one-to-one PEFT modules: refused at setup, naming the
    key (student_start_state checks before reading any weights)."""
    from types import SimpleNamespace

    from torchtune.training.checkpointing._utils import ModelType

    from kdtune.training.checkpoint.hf_export import check_peft_export

    with pytest.raises(ValueError, match=r"checkpointer.model_type = PHI3_MINI"):
        check_peft_export(SimpleNamespace(_model_type=ModelType.PHI3_MINI))
    check_peft_export(SimpleNamespace(_model_type=ModelType.QWEN2))
