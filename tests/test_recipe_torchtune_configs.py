"""torchtune 0.6.1's own KD configs run through kdtune's recipe.

The four configs torchtune ships for its KD recipes (``llama3_2/8B_to_1B_KD_lora_*``,
``qwen2/1.5_to_0.5B_KD_lora_*``) are loaded from torchtune's installed ``recipes/configs``:

* at their real sizes, with only paths overridden, through the same checks the recipe runs
  before training (``kdtune validate``: keys, values, files, vocabularies; the models are built
  on the meta device, so an 8B teacher costs no memory). The checkpoint folders hold empty
  files of the configured names; real weights cannot be loaded on this CPU machine.
* end to end, for two steps on CPU, with paths, model builders and ``device`` overridden to
  the tiny assets (Qwen2's tokenizer and ``model_type`` too: the tiny assets are Llama-3).
  torchtune's own loss classes (``CEWithChunkedOutputLoss``, ``ForwardKLWithChunkedOutputLoss``)
  stay the losses, and their ``profiler``, ``log_peak_memory_stats`` and
  ``enable_activation_offloading`` keys are read as torchtune reads them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchtune
from config_helpers import check_config_and_models
from omegaconf import OmegaConf
from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.config.loading import load_config
from kdtune.training.loss_setup import StepNormalized
from kdtune.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

# torchtune installs its recipes and configs as a top-level `recipes` package beside itself.
TORCHTUNE_CONFIGS = Path(torchtune.__file__).parents[1] / "recipes" / "configs"
CONFIGS = [
    "llama3_2/8B_to_1B_KD_lora_single_device",
    "llama3_2/8B_to_1B_KD_lora_distributed",
    "qwen2/1.5_to_0.5B_KD_lora_single_device",
    "qwen2/1.5_to_0.5B_KD_lora_distributed",
]


def config_path(name: str) -> Path:
    return TORCHTUNE_CONFIGS / f"{name}.yaml"


def fake_checkpoint(folder: Path, files: list[str]) -> Path:
    """A folder holding empty files of the configured names (enough for the preflight)."""
    folder.mkdir(parents=True)
    for name in [*files, "config.json"]:
        (folder / name).write_text("{}" if name.endswith(".json") else "")
    return folder


def qwen2_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A minimal byte-level BPE vocabulary in Qwen2's file format (the special-token ids,
    which set the largest id, are torchtune's own)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({chr(c): i for i, c in enumerate(range(33, 127))}))
    merges.write_text("#version: 0.2\n")
    return vocab, merges


@pytest.mark.parametrize("name", CONFIGS)
def test_real_size_config_passes_the_preflight_with_only_paths_overridden(
    name, tiny_assets_llama3, tmp_path
):
    raw = OmegaConf.load(config_path(name))
    student = fake_checkpoint(tmp_path / "student", list(raw.checkpointer.checkpoint_files))
    teacher = fake_checkpoint(tmp_path / "teacher", list(raw.teacher_checkpointer.checkpoint_files))
    paths = [
        f"output_dir={tmp_path / 'out'}",
        f"checkpointer.checkpoint_dir={student}",
        f"teacher_checkpointer.checkpoint_dir={teacher}",
    ]
    if name.startswith("qwen2"):
        vocab, merges = qwen2_tokenizer_files(tmp_path / "tokenizer")
        paths += [f"tokenizer.path={vocab}", f"tokenizer.merges_file={merges}"]
    else:
        paths.append(f"tokenizer.path={tiny_assets_llama3.root / 'tokenizer.model'}")
    cfg = load_config(config_path(name), paths)
    warnings = check_config_and_models(cfg)  # raises ConfigError on any problem
    assert all(isinstance(message, str) for message in warnings)


def tiny_overrides(name: str, assets, output_dir: Path) -> list[str]:
    """Paths, model builders and device (plus, for Qwen2, tokenizer and model_type)."""
    root = assets.root
    overrides = [
        f"output_dir={output_dir}",
        "device=cpu",
        "model._component_=kdtune.assets.models.lora_tiny_student",
        "model.vocab_size=512",
        "teacher_model._component_=kdtune.assets.models.tiny_teacher",
        "teacher_model.vocab_size=512",
        f"checkpointer.checkpoint_dir={root / 'student'}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"teacher_checkpointer.checkpoint_dir={root / 'teacher'}",
        "teacher_checkpointer.checkpoint_files=[model.safetensors]",
        "dataset.source=json",
        f"dataset.data_files={root / 'data' / 'train.json'}",
        "dataset.split=train",
        # two steps of the configs' own batch size and accumulation
        "max_steps_per_epoch=2",
    ]
    if name.startswith("qwen2"):
        overrides += ["checkpointer.model_type=LLAMA3", "teacher_checkpointer.model_type=LLAMA3"]
    return overrides


def tiny_tokenizer(assets) -> dict:
    return {
        "_component_": "torchtune.models.llama3.llama3_tokenizer",
        "path": str(assets.root / "tokenizer.model"),
        "special_tokens_path": str(assets.root / "special_tokens.json"),
        "max_seq_len": None,
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_end_to_end_on_the_tiny_assets(name, tiny_assets, tmp_path):
    cfg = load_config(config_path(name), tiny_overrides(name, tiny_assets, tmp_path / "out"))
    cfg.tokenizer = tiny_tokenizer(tiny_assets)  # the node: Qwen2's has other options
    assert cfg.profiler.enabled is False  # torchtune's DummyProfiler
    recipe = KDRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    assert isinstance(recipe._loss_step.kd_loss, StepNormalized)
    assert isinstance(recipe._loss_step.kd_loss.loss, ForwardKLWithChunkedOutputLoss)
    recipe.train()
    recipe.cleanup()
    records = read_metrics(tmp_path / "out", kind="train")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["kd_loss"] > 0 for r in records)


def test_torchtune_losses_are_rescaled_to_the_step_token_count():
    """A torchtune loss (a micro-batch mean) wrapped by the recipe equals its token sum over
    the step's count: two micro-batches give the value and gradient of their union."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    teacher = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3:] = -100  # the two micro-batches have different target counts
    chunks = 3

    def chunked(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.chunk(chunks, dim=1))

    for loss, extra in (
        (CEWithChunkedOutputLoss(num_output_chunks=chunks), ()),
        (ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks), (teacher,)),
    ):
        wrapped = StepNormalized(loss)
        num_tokens = (labels != -100).sum()
        parts = [
            wrapped(
                chunked(logits[i : i + 1]),
                *(chunked(t[i : i + 1]) for t in extra),
                labels[i : i + 1],
                num_tokens=num_tokens,
            )
            for i in range(2)
        ]
        whole = loss(chunked(logits), *(chunked(t) for t in extra), labels)
        (grad_parts,) = torch.autograd.grad(sum(parts), logits)
        (grad_whole,) = torch.autograd.grad(whole, logits)
        torch.testing.assert_close(sum(parts), whole)
        torch.testing.assert_close(grad_parts, grad_whole)
        all_ignored = wrapped(
            chunked(logits[:1]),
            *(chunked(t[:1]) for t in extra),
            torch.full((1, 6), -100),
            num_tokens=num_tokens,
        )
        assert all_ignored.item() == 0.0
