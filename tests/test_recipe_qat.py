"""Quantisation-aware training (the ``quantizer:`` key) through the real KD recipe, tiny models.

What is checked, each against something computed without the recipe:

- the GGUF-fake-quantised student the recipe trains computes exactly what a plain model computes
  with the saved checkpoint's weights quantised and dequantised by the ``gguf`` package (the
  reader llama.cpp's own conversion scripts use), so ``kdtune export --format gguf`` writes the
  model that was trained;
- the fused loss reads the head's fake-quantised weight: its first step equals the chunked
  loss's, and both differ from the unquantised step;
- resume across ``fake_quant_after_n_steps`` is bit-exact (GGUF + LoRA, torchao 8da4w + full);
- two processes (FSDP2, gloo) train the same curve as one;
- the cached-teacher and on-policy paths train with fake quantisation on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.teacher_cache.build import BuildOptions, build_teacher_cache
from kdtune.training.checkpoint.layout import latest_checkpoint
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.metrics import read_metrics

gguf = pytest.importorskip("gguf")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
REPO = Path(__file__).resolve().parents[1]
GGUF_Q4 = "quantizer={_component_: kdtune.quantization.qat.GGUFQ4_0QATQuantizer}"
TORCHAO_8DA4W = (
    "quantizer={_component_: torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer, "
    "groupsize: 32}"
)
STEPS = ("epochs=2", "max_steps_per_epoch=3", "validate_every_n_steps=null")

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


def load_recipe(config: str, assets, output_dir: Path, *overrides: str) -> KDRecipe:
    cfg = OmegaConf.load(CONFIG_DIR / f"{config}.yaml")
    dotlist = [f"assets_dir={assets.root}", f"output_dir={output_dir}", *overrides]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    assert isinstance(cfg, DictConfig)
    recipe = KDRecipe(cfg)
    recipe.setup(cfg)
    return recipe


def gguf_round_trip(weight: torch.Tensor, qtype) -> torch.Tensor:
    """``weight`` quantised and dequantised by the ``gguf`` package (rows of 32-blocks)."""
    array = weight.detach().float().numpy().astype(np.float32)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype))


def train_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir, kind="train")]


def test_gguf_qat_student_is_its_checkpoint_quantised_by_gguf(tiny_assets, tmp_path):
    recipe = load_recipe(
        "tiny/full_chunked", tiny_assets, tmp_path / "run", GGUF_Q4, "max_steps_per_epoch=4"
    )
    recipe.train()
    recipe.cleanup()
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < losses[0]
    assert [r["fake_quant"] for r in read_metrics(tmp_path / "run", kind="train")] == [1.0] * 4

    # Reference: a plain (unprepared) student with the saved weights passed through gguf.quants:
    # Q4_0 for the projections, Q8_0 for the token embedding and the output head (the default).
    saved = {}
    for shard in sorted((latest_checkpoint(tmp_path / "run") / "model").glob("*.safetensors")):
        saved.update(load_file(shard))
    plain = load_recipe(
        "tiny/full_chunked", tiny_assets, tmp_path / "plain", "max_steps_per_epoch=1"
    )._student
    from torchtune.models.convert_weights import hf_to_tune

    tuned = hf_to_tune(saved, num_heads=4, num_kv_heads=2, dim=64)  # the tiny student's shape
    reference = {}
    for name, value in plain.state_dict().items():
        weight = tuned[name]
        if name.endswith("scale"):  # RMSNorm scales stay in full precision
            reference[name] = weight
            continue
        is_embedding = name in ("tok_embeddings.weight", "output.weight")
        qtype = gguf.GGMLQuantizationType.Q8_0 if is_embedding else gguf.GGMLQuantizationType.Q4_0
        reference[name] = gguf_round_trip(weight, qtype).to(value.dtype)
    plain.load_state_dict(reference)
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    recipe._student.set_num_output_chunks(0)
    plain.set_num_output_chunks(0)
    with torch.no_grad():
        ours, theirs = recipe._student(tokens), plain(tokens)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("student", "quantizer"),
    [("lora", GGUF_Q4), ("full", TORCHAO_8DA4W)],
    ids=["gguf_q4_0_lora", "torchao_8da4w_full"],
)
def test_fused_loss_reads_the_fake_quantised_head(student, quantizer, tiny_assets, tmp_path):
    def first_step(config: str, *overrides: str) -> float:
        folder = tmp_path / f"{config.replace('/', '_')}{len(overrides)}"
        recipe = load_recipe(config, tiny_assets, folder, "shuffle=false", *overrides)
        batches = [next(iter(recipe._dataloader))]
        if recipe._fake_quant is not None:
            recipe._fake_quant.apply(recipe._student, 0)
        return float(recipe.accumulate_gradients(batches)["loss"])

    fused = first_step(f"tiny/{student}_fused", quantizer)
    chunked = first_step(f"tiny/{student}_chunked", quantizer)
    unquantised = first_step(f"tiny/{student}_fused")
    assert fused == pytest.approx(chunked, rel=1e-5)
    assert abs(fused - unquantised) > 1e-4  # the quantisation reaches the loss at all


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "quantizer"),
    [("tiny/lora_chunked", GGUF_Q4), ("tiny/full_chunked", TORCHAO_8DA4W)],
    ids=["gguf_q4_0_lora", "torchao_8da4w_full"],
)
def test_resume_across_the_fake_quant_start_is_bitwise_exact(
    kdtune_run, config, quantizer, tiny_assets, tmp_path
):
    common = [
        f"assets_dir={tiny_assets.root}",
        *STEPS,
        quantizer,
        "fake_quant_after_n_steps=3",
        "gradient_accumulation_steps=2",
    ]
    kdtune_run(config, [*common, f"output_dir={tmp_path / 'straight'}"])
    kdtune_run(config, [*common, f"output_dir={tmp_path / 'resumed'}", "stop_after_steps=2"])
    kdtune_run(
        config, [*common, f"output_dir={tmp_path / 'resumed'}", "resume_from_checkpoint=true"]
    )

    records = read_metrics(tmp_path / "resumed", kind="train")
    assert [r["fake_quant"] for r in records] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # 3 steps off
    straight, resumed = (latest_checkpoint(tmp_path / n) for n in ("straight", "resumed"))
    assert straight.name == resumed.name == "step_0000006"
    for shard in sorted(straight.glob("*/*.safetensors")) + sorted(straight.glob("*/*.pt")):
        if shard.suffix == ".pt":
            a = torch.load(shard, weights_only=True)
            b = torch.load(resumed / shard.parent.name / shard.name, weights_only=True)
        else:
            a, b = load_file(shard), load_file(resumed / shard.parent.name / shard.name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), shard
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")


@pytest.mark.slow
def test_two_processes_train_what_one_does(tiny_assets, tmp_path, launch):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    common = [f"assets_dir={tiny_assets.root}", GGUF_Q4, "fake_quant_after_n_steps=2", *STEPS]
    runs = [
        {
            "config": "tiny/full_chunked",
            "overrides": [
                *common,
                "batch_size=1",
                "gradient_accumulation_steps=2",
                f"output_dir={tmp_path / 'two'}",
            ],
        }
    ]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    launch.torchrun(
        REPO / "tests" / "dist_workers" / "recipe_runs.py",
        "--runs",
        str(tmp_path / "runs.json"),
        cwd=REPO,
    )
    recipe = load_recipe(
        "tiny/full_chunked",
        tiny_assets,
        tmp_path / "one",
        *common[1:],
        "batch_size=2",
        "gradient_accumulation_steps=2",
    )
    recipe.train()
    recipe.cleanup()
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_cached_teacher_on_policy_and_lora_fused_train_with_fake_quant(tiny_assets, tmp_path):
    cache = tmp_path / "cache"
    cfg = load_config(
        resolve_config("tiny/full_chunked_cached"),
        [f"assets_dir={tiny_assets.root}", f"teacher_cache={cache}"],
    )
    build_teacher_cache(cfg, BuildOptions(top_k=16))
    runs = {
        "cached": ("tiny/full_chunked_cached", f"teacher_cache={cache}"),
        "on_policy": ("tiny/lora_chunked", "on_policy={fraction: 1.0, max_new_tokens: 6}"),
        "lora_fused": ("tiny/lora_fused", "shuffle=false"),
    }
    for name, (config, option) in runs.items():
        recipe = load_recipe(
            config, tiny_assets, tmp_path / name, GGUF_Q4, option, "max_steps_per_epoch=4"
        )
        recipe.train()
        recipe.cleanup()
        records = read_metrics(tmp_path / name, kind="train")
        assert [r["fake_quant"] for r in records] == [1.0] * 4, name
        assert all(np.isfinite(r["loss"]) for r in records), name
        if name != "on_policy":  # sampled sequences differ step to step
            assert records[-1]["loss"] < records[0]["loss"], name
