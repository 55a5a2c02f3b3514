"""The non-finite guard and the zero-target-token check, end to end on the tiny models (CPU).

NaN is injected by a forward hook on the student's token embedding at chosen steps (the
chunked and the fused losses both read it), so the loss and every gradient of that step are
NaN, as after a divergence. Each run's outcome is read from the files a user has:
``metrics.jsonl``, the checkpoint folders and the weights in them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.checkpoint.layout import complete_checkpoints
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.guard import NonFiniteError
from kdtune.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


def make_recipe(config: str, tiny_assets, output_dir: Path, *extra: str) -> KDRecipe:
    overrides = [
        f"assets_dir={tiny_assets.root}",
        f"output_dir={output_dir}",
        "epochs=1",
        "max_steps_per_epoch=6",
        "validate_every_n_steps=null",
        *extra,
    ]
    cfg = load_config(resolve_config(config), overrides)
    recipe = KDRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    return recipe


def inject_nan(recipe: KDRecipe, steps: set[int]) -> None:
    """The student's embeddings become NaN in the forward passes of ``steps`` (1-based)."""

    def hook(module, inputs, output):
        if recipe.global_step + 1 in steps:
            return output * float("nan")
        return output

    recipe._student.tok_embeddings.register_forward_hook(hook)


def run(recipe: KDRecipe) -> None:
    try:
        recipe.train()
    finally:
        recipe.cleanup()


def saved_steps(output_dir: Path) -> list[int]:
    return [int(folder.name.split("_")[1]) for folder in complete_checkpoints(output_dir)]


def weights_are_finite(folder: Path) -> bool:
    """Every tensor of the checkpoint's safetensors files (either layout) is finite."""
    files = list(folder.rglob("*.safetensors"))
    assert files, folder
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


@pytest.mark.parametrize("config", ["tiny/full_chunked", "tiny/full_fused"])
def test_stop_names_the_step_and_the_last_good_checkpoint_and_saves_nothing_after(
    config, tiny_assets, tmp_path
):
    out = tmp_path / "out"
    recipe = make_recipe(
        config,
        tiny_assets,
        out,
        "save_every_n_steps=2",
        "keep_last_n_checkpoints=1",
        "log_every_n_steps=5",  # step 3 is not a logging step: the save at 4 must catch it
    )
    inject_nan(recipe, {3})
    with pytest.raises(NonFiniteError) as raised:
        run(recipe)
    (good,) = complete_checkpoints(out)  # step 4 was never saved, so step 2 was never pruned
    assert saved_steps(out) == [2]
    message = str(raised.value)
    assert "step 3" in message and str(good) in message and "on_non_finite" in message
    assert weights_are_finite(good)
    assert not (good.parent / "step_0000004").exists()
    records = read_metrics(out, kind="train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # read before the save at step 4
    assert math.isfinite(records[1]["loss"]) and records[2]["loss"] == "nan"
    assert not any(r["skipped"] for r in records)


def test_stop_before_any_checkpoint_says_so_and_skips_the_final_save(tiny_assets, tmp_path):
    out = tmp_path / "out"
    recipe = make_recipe("tiny/lora_chunked", tiny_assets, out, "log_every_n_steps=100")
    inject_nan(recipe, {5})
    with pytest.raises(NonFiniteError, match=r"step 5.*no checkpoint was saved"):
        run(recipe)
    assert saved_steps(out) == []
    assert [r["step"] for r in read_metrics(out, kind="train")] == list(range(1, 7))


def test_a_too_high_lr_stops_and_names_the_checkpoint_the_bad_forward_started_from(
    tiny_assets, tmp_path
):
    """lr 1e30: steps 1 and 2 have finite losses, but step 2's weights give step 3 a NaN loss.
    The error names step 3 and says the step-2 checkpoint holds the weights it started from."""
    out = tmp_path / "out"
    saves = ("save_every_n_steps=1", "keep_last_n_checkpoints=2")
    recipe = make_recipe("tiny/full_chunked", tiny_assets, out, "optimizer.lr=1e30", *saves)
    with pytest.raises(NonFiniteError, match=r"step 3: the loss") as raised:
        run(recipe)
    first, second = complete_checkpoints(out)
    assert saved_steps(out) == [1, 2]
    assert f"the last checkpoint, {second}, holds the weights" in str(raised.value)
    assert "earlier checkpoint" in str(raised.value)
    assert weights_are_finite(first)


def test_weights_that_overflowed_are_never_saved(tiny_assets, tmp_path):
    """An update that makes a weight inf while the step's loss and gradient norm are finite:
    the weight check before the save catches it and names the parameter."""
    out = tmp_path / "out"
    recipe = make_recipe("tiny/lora_chunked", tiny_assets, out, "save_every_n_steps=1")
    name, parameter = next((n, p) for n, p in recipe._student.named_parameters() if p.requires_grad)

    def overflow(optimizer, args, kwargs):
        if recipe.global_step == 1:  # the update of step 2
            parameter.data[0] = float("inf")

    recipe._optimizer.register_step_post_hook(overflow)
    with pytest.raises(NonFiniteError, match=r"weights after step 2 are not finite") as raised:
        run(recipe)
    assert name in str(raised.value)
    assert saved_steps(out) == [1]


def skipping_recipe(tiny_assets, out: Path, max_skipped: int, *extra: str) -> KDRecipe:
    """``on_non_finite: skip``; NaN at steps 2 and 4."""
    overrides = ["on_non_finite=skip", f"max_non_finite_steps={max_skipped}", *extra]
    recipe = make_recipe("tiny/full_chunked", tiny_assets, out, *overrides)
    inject_nan(recipe, {2, 4})
    return recipe


def test_skip_leaves_out_the_updates_of_bad_steps_and_finishes(tiny_assets, tmp_path):
    out = tmp_path / "out"
    recipe = skipping_recipe(tiny_assets, out, 3, "log_every_n_steps=3")
    run(recipe)
    records = read_metrics(out, kind="train")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["step"] for r in records if r["skipped"]] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in records if not r["skipped"])
    # AdamW counted only the 4 updates that happened; the final checkpoint is finite.
    state = recipe._optimizer.state[next(iter(recipe._student.parameters()))]
    assert int(state["step"]) == 4
    assert saved_steps(out) == [6]
    assert weights_are_finite(complete_checkpoints(out)[-1])


def test_skip_stops_once_max_non_finite_steps_were_skipped(tiny_assets, tmp_path):
    out = tmp_path / "out"
    saves = ("save_every_n_steps=1", "keep_last_n_checkpoints=1", "log_every_n_steps=100")
    recipe = skipping_recipe(tiny_assets, out, 2, *saves)
    with pytest.raises(NonFiniteError, match=r"max_non_finite_steps = 2.*step 4") as raised:
        run(recipe)
    assert saved_steps(out) == [3]  # the step-4 save and the final save never happened
    assert str(complete_checkpoints(out)[-1]) in str(raised.value)
    records = read_metrics(out, kind="train")
    assert [(r["step"], r["skipped"]) for r in records] == [
        (1, False),
        (2, True),
        (3, False),
        (4, True),
    ]


def student_weights(recipe: KDRecipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in recipe._student.state_dict().items()}


def test_steps_without_target_tokens_make_no_update_and_the_run_goes_on(tiny_assets, tmp_path):
    """Kept samples without a target (``drop_samples_without_target: false``, answers cut at
    ``tokenizer.max_seq_len: 64``, one sample per step, data in order): such a step is a no-op
    (no update, even though AdamW would move weights on zero gradients), counted, and the run
    ends normally with its checkpoint."""
    out = tmp_path / "out"
    recipe = make_recipe(
        "tiny/full_chunked",
        tiny_assets,
        out,
        "tokenizer.max_seq_len=64",
        "drop_samples_without_target=false",
        "batch_size=1",
        "shuffle=false",
        "max_steps_per_epoch=8",
        "log_every_n_steps=1",
    )
    train_step = recipe._train_step
    changed = {}

    def step_and_compare(micro_batches, progress):
        before = student_weights(recipe)
        train_step(micro_batches, progress)
        after = student_weights(recipe)
        changed[recipe.global_step] = any(not torch.equal(before[k], after[k]) for k in before)

    recipe._train_step = step_and_compare
    run(recipe)
    records = read_metrics(out, kind="train")
    without = [r["step"] for r in records if r["num_tokens"] == 0]
    assert without and len(without) < len(records)  # the shipped data has both kinds here
    assert all(r["skipped"] for r in records if r["num_tokens"] == 0)
    assert not any(r["skipped"] for r in records if r["num_tokens"] > 0)
    unmoved = [step for step, moved in changed.items() if not moved]
    warmup = [r["step"] for r in records if r["lr"] == 0.0]  # the schedule starts at lr 0
    assert sorted(set(without) | set(warmup)) == unmoved
    assert set(without) - set(warmup)  # a step that would have moved the weights did not
    assert recipe._guard.no_target_steps == len(without)
    assert saved_steps(out) == [8]


def test_samples_without_target_are_left_out_by_default(tiny_assets, tmp_path):
    """The same data and settings with the default ``drop_samples_without_target: true``: the
    scan's samples without a target never reach a step, and every step trains."""
    out = tmp_path / "out"
    recipe = make_recipe(
        "tiny/full_chunked",
        tiny_assets,
        out,
        "tokenizer.max_seq_len=64",
        "batch_size=1",
        "shuffle=false",
        "max_steps_per_epoch=8",
        "log_every_n_steps=1",
    )
    (scan,) = [r for r in read_metrics(out, kind="data") if r["dataset"] == "dataset"]
    assert scan["samples_without_target"] > 0
    assert len(recipe._dataloader.dataset) == scan["num_samples"] - scan["samples_without_target"]
    run(recipe)
    records = read_metrics(out, kind="train")
    assert len(records) == 8 and all(r["num_tokens"] > 0 and not r["skipped"] for r in records)
