"""Exact resume, gradient-accumulation equivalence and crash-safe checkpoints of the KD recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from kdtune.cli.main import main as kdtune_main
from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.checkpoint import save as checkpointing
from kdtune.training.checkpoint.layout import (
    ADAPTER_DIRNAME,
    complete_checkpoints,
    latest_checkpoint,
    read_manifest,
)
from kdtune.training.checkpoint.save import save_checkpoint_folder
from kdtune.training.data import shift_labels
from kdtune.training.metrics import read_metrics

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*/*.safetensors")):
        weights.update({f"{shard.name}:{k}": v for k, v in load_file(shard).items()})
    return weights


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    unequal = [key for key in a if not torch.equal(a[key], b[key])]
    assert not unequal, f"tensors differ: {unequal}"


# Two epochs of 3 optimizer steps, each of 2 micro-batches; shuffled data; validation only at
# the end. The interrupted run stops after step 2 (inside the first epoch).
RESUME_OVERRIDES = (
    "epochs=2",
    "max_steps_per_epoch=3",
    "gradient_accumulation_steps=2",
    "validate_every_n_steps=null",
)


@pytest.mark.slow
@pytest.mark.parametrize("student", ["full", "lora"])
def test_resume_mid_epoch_is_bitwise_exact(kdtune_run, student, tiny_assets, tmp_path, monkeypatch):
    config = f"tiny/{student}_chunked"
    common = [f"assets_dir={tiny_assets.root}", *RESUME_OVERRIDES]
    if student == "lora":
        common.append("model.lora_dropout=0.1")  # training draws random numbers: RNG must resume

    straight = tmp_path / "straight"
    kdtune_run(config, [*common, f"output_dir={straight}"])

    resumed = tmp_path / "resumed"
    kdtune_run(config, [*common, f"output_dir={resumed}", "stop_after_steps=2"])
    stopped_at = latest_checkpoint(resumed)
    manifest = read_manifest(stopped_at)
    assert (manifest["step"], manifest["epoch"], manifest["steps_in_epoch"]) == (2, 0, 2)
    assert manifest["final"] is False
    kdtune_run(config, [*common, f"output_dir={resumed}", "resume_from_checkpoint=true"])

    final_straight, final_resumed = latest_checkpoint(straight), latest_checkpoint(resumed)
    assert final_straight.name == final_resumed.name == "step_0000006"
    assert read_manifest(final_resumed)["final"] is True
    assert_bitwise_equal(saved_weights(final_straight), saved_weights(final_resumed))
    if student == "lora":
        adapters = [
            torch.load(f / ADAPTER_DIRNAME / "adapter_model.pt", weights_only=True)
            for f in (final_straight, final_resumed)
        ]
        assert_bitwise_equal(*adapters)

    # The metrics of the resumed run continue the interrupted one: steps 1..6 once each, and
    # steps 3..6 log exactly what the uninterrupted run logged.
    straight_records = read_metrics(straight, kind="train")
    resumed_records = read_metrics(resumed, kind="train")
    assert [r["step"] for r in resumed_records] == list(range(1, 7))
    for a, b in zip(straight_records, resumed_records):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])


def load_recipe(config: str, assets, output_dir: Path, *overrides: str) -> KDRecipe:
    cfg = OmegaConf.load(CONFIG_DIR / f"{config}.yaml")
    cfg = OmegaConf.merge(
        cfg,
        OmegaConf.from_dotlist(
            [f"assets_dir={assets.root}", f"output_dir={output_dir}", *overrides]
        ),
    )
    assert isinstance(cfg, DictConfig)
    recipe = KDRecipe(cfg)
    recipe.setup(cfg)
    return recipe


@pytest.mark.parametrize("loss_path", ["chunked", "fused"])
def test_four_micro_batches_of_one_equal_one_batch_of_four(loss_path, tiny_assets, tmp_path):
    """Gradients are normalised by the step's token count, not per micro-batch."""

    def gradients(batch_size: int, accumulation: int) -> tuple[dict, dict, list]:
        recipe = load_recipe(
            f"tiny/full_{loss_path}",
            tiny_assets,
            tmp_path / f"{batch_size}x{accumulation}",
            "shuffle=false",
            f"batch_size={batch_size}",
            f"gradient_accumulation_steps={accumulation}",
        )
        batches = [batch for _, batch in zip(range(accumulation), recipe._dataloader)]
        losses = recipe.accumulate_gradients(batches)
        grads = {n: p.grad.clone() for n, p in recipe._student.named_parameters()}
        return grads, losses, batches

    grads_accumulated, losses_accumulated, micro_batches = gradients(batch_size=1, accumulation=4)
    grads_batched, losses_batched, _ = gradients(batch_size=4, accumulation=1)

    # The samples have different target counts, so a per-micro-batch mean would weigh them
    # differently from the batch mean and this comparison would fail.
    counts = [int((shift_labels(b["labels"], -100) != -100).sum()) for b in micro_batches]
    assert len(set(counts)) > 1, counts
    assert losses_accumulated["num_tokens"] == losses_batched["num_tokens"] == sum(counts)
    for key in ("loss", "ce_loss", "kd_loss"):
        assert losses_accumulated[key] == pytest.approx(losses_batched[key], rel=1e-5)
    assert grads_accumulated.keys() == grads_batched.keys()
    for name in grads_batched:
        torch.testing.assert_close(
            grads_accumulated[name], grads_batched[name], rtol=1e-5, atol=1e-7, msg=name
        )


def test_crash_while_saving_keeps_previous_checkpoint(
    kdtune_run, tiny_assets, tmp_path, monkeypatch
):
    """The second save dies half-way: step 2 stays complete and resuming from it finishes."""
    output_dir = tmp_path / "out"
    common = [
        f"assets_dir={tiny_assets.root}",
        f"output_dir={output_dir}",
        "max_steps_per_epoch=6",
        "save_every_n_steps=2",
        "validate_every_n_steps=null",
    ]
    real_save = checkpointing._torch_save_atomic
    calls = []

    def dying_save(payload, path):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half a file")
            raise OSError("disk full (simulated)")
        real_save(payload, path)

    monkeypatch.setattr(checkpointing, "_torch_save_atomic", dying_save)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(OSError, match="simulated"):
        kdtune_main(["run", "knowledge_distillation", "--config", "tiny/full_chunked", *common])
    assert [f.name for f in complete_checkpoints(output_dir)] == ["step_0000002"]
    assert not (output_dir / "checkpoints" / "step_0000004").exists()

    monkeypatch.setattr(checkpointing, "_torch_save_atomic", real_save)
    kdtune_run(
        "tiny/full_chunked", [*common, "resume_from_checkpoint=true", "keep_last_n_checkpoints=2"]
    )
    assert [f.name for f in complete_checkpoints(output_dir)] == ["step_0000004", "step_0000006"]
    assert not list((output_dir / "checkpoints").glob(".staging_*"))
    assert [r["step"] for r in read_metrics(output_dir, kind="train")] == list(range(1, 7))


def test_runs_never_mix_in_one_output_dir(kdtune_run, tiny_assets, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    common = [
        f"assets_dir={tiny_assets.root}",
        f"output_dir={output_dir}",
        "max_steps_per_epoch=4",
        "validate_every_n_steps=null",
    ]
    kdtune_run("tiny/full_chunked", [*common, "stop_after_steps=2"])
    argv = ["run", "knowledge_distillation", "--config", "tiny/full_chunked", *common]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        kdtune_main(argv)  # a fresh run would leave the old step_2 to be resumed later
    with pytest.raises(ValueError, match="batch_size was 2 in the checkpoint and is 1"):
        kdtune_main([*argv, "resume_from_checkpoint=true", "batch_size=1"])
    assert [f.name for f in complete_checkpoints(output_dir)] == ["step_0000002"]


def test_checkpoint_folder_appears_only_when_complete(tmp_path):
    def weights_then_fail(step_folder: Path) -> None:
        (step_folder / "model.safetensors").write_bytes(b"x")
        raise RuntimeError("killed")

    def weights(step_folder: Path) -> None:
        (step_folder / "model.safetensors").write_bytes(b"x")

    first = save_checkpoint_folder(tmp_path, 1, weights, {"a": 1}, {"final": False})
    with pytest.raises(RuntimeError):
        save_checkpoint_folder(tmp_path, 2, weights_then_fail, {"a": 2}, {"final": False})
    assert latest_checkpoint(tmp_path) == first
    assert read_manifest(first)["files"] == ["model.safetensors", "training_state.pt"]
    second = save_checkpoint_folder(tmp_path, 2, weights, {"a": 2}, {"final": True})
    assert latest_checkpoint(tmp_path) == second
    assert not list((tmp_path / "checkpoints").glob(".staging_*"))
