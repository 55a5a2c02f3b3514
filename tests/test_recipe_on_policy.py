"""On-policy distillation through the real KD recipe (``on_policy`` block) on tiny models.

Each on-policy step samples its sequences from the student (or the teacher) for the prompts of
the step's samples; the loss then covers exactly the generated tokens. Checked here: the step
schedule and the logged generation figures, that the loss counts only generated tokens,
prompt-only data, chunked and fused losses, bit-exact mid-epoch resume, and a 2-process FSDP2
run equal to the 1-process run on the same global batches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.checkpoint.layout import latest_checkpoint
from kdtune.training.config.errors import ConfigError
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.generation import is_on_policy_step
from kdtune.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_workers" / "recipe_runs.py"
MIXED = "on_policy={fraction: 0.5, max_new_tokens: 6}"
SHORT = ("epochs=2", "max_steps_per_epoch=3", "validate_every_n_steps=null")


def run(config: str, overrides: list[str]) -> Path:
    cfg = load_config(resolve_config(config), overrides)
    recipe = KDRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    return Path(cfg.output_dir)


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = latest_checkpoint(output_dir)
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*/*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("config", ["tiny/lora_chunked", "tiny/full_fused"])
def test_on_policy_steps_train_on_generated_tokens_only(config, tiny_assets, tmp_path):
    out = run(config, [f"assets_dir={tiny_assets.root}", f"output_dir={tmp_path}", MIXED, *SHORT])
    records = read_metrics(out, kind="train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        on_policy = is_on_policy_step(record["step"] - 1, 0.5)
        assert ("generated_tokens" in record) == on_policy
        assert math.isfinite(record["loss"]) and record["kd_loss"] is not None
        if on_policy:
            # the loss counts exactly the sampled tokens (each predicted from its prefix)
            assert record["num_tokens"] == record["generated_tokens"] > 0
            assert 1 <= record["mean_generated_length"] <= 6
            assert 0 < record["generation_seconds"] < record["step_seconds"]
            assert record["train_seconds"] == pytest.approx(
                record["step_seconds"] - record["generation_seconds"]
            )


def test_mid_epoch_resume_of_a_mixed_run_is_bitwise_exact(tiny_assets, tmp_path):
    common = [f"assets_dir={tiny_assets.root}", MIXED, *SHORT, "gradient_accumulation_steps=2"]
    straight = run("tiny/lora_chunked", [*common, f"output_dir={tmp_path / 'straight'}"])
    resumed = tmp_path / "resumed"
    run("tiny/lora_chunked", [*common, f"output_dir={resumed}", "stop_after_steps=2"])
    run("tiny/lora_chunked", [*common, f"output_dir={resumed}", "resume_from_checkpoint=true"])
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(straight, kind="train") != []
    losses = [r["loss"] for r in read_metrics(straight, kind="train")]
    assert losses == [r["loss"] for r in read_metrics(resumed, kind="train")]


def _prompt_only_data(tiny_assets, tmp_path: Path) -> Path:
    records = json.loads(Path(tiny_assets.train_data).read_text())
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps([{**r, "output": ""} for r in records]))
    return data


def test_prompt_only_data_trains_on_policy_and_is_refused_for_mixed_runs(tiny_assets, tmp_path):
    data = _prompt_only_data(tiny_assets, tmp_path)
    common = [f"assets_dir={tiny_assets.root}", f"dataset.data_files={data}", *SHORT]
    only = "on_policy={fraction: 1.0, max_new_tokens: 6, temperature: 0.8, top_p: 0.9}"
    out = run("tiny/lora_chunked", [*common, f"output_dir={tmp_path / 'only'}", only])
    records = read_metrics(out, kind="train")
    assert len(records) == 6 and all(r["num_tokens"] == r["generated_tokens"] for r in records)
    cfg = load_config(
        resolve_config("tiny/lora_chunked"), [*common, f"output_dir={tmp_path / 'mixed'}", MIXED]
    )
    recipe = KDRecipe(cfg=cfg)
    with pytest.raises(ValueError, match=r"without an answer.*on_policy\.fraction: 1\.0"):
        recipe.setup(cfg=cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["on_policy={fraction: 2.0, max_new_tokens: 4}"], r"on_policy\.fraction"),
        (["on_policy={fraction: 1.0}"], r"on_policy\.max_new_tokens is required"),
        (["on_policy={fraction: 1.0, max_new_tokens: 4, source: oracle}"], r"on_policy\.source"),
        ([MIXED, "dataset.packed=true"], r"unpacked dataset"),
        (["on_policy=[1, 2]"], r"on_policy = .* is invalid"),
    ],
)
def test_bad_on_policy_blocks_fail_before_models_are_built(
    overrides, message, tiny_assets, tmp_path
):
    cfg = load_config(
        resolve_config("tiny/lora_chunked"),
        [f"assets_dir={tiny_assets.root}", f"output_dir={tmp_path}", *overrides],
    )
    with pytest.raises(ConfigError, match=message):
        KDRecipe(cfg=cfg)


@pytest.mark.distributed
def test_two_process_on_policy_run_equals_the_single_process_run(tiny_assets, tmp_path, launch):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    common = [f"assets_dir={tiny_assets.root}", MIXED, *SHORT, "gradient_accumulation_steps=2"]
    two = tmp_path / "two"
    runs = [
        {"config": "tiny/full_chunked", "overrides": [*common, "batch_size=1", f"output_dir={two}"]}
    ]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    launch.torchrun(WORKER, "--runs", str(tmp_path / "runs.json"), cwd=REPO)
    one = run("tiny/full_chunked", [*common, "batch_size=2", f"output_dir={tmp_path / 'one'}"])
    a, b = read_metrics(one, kind="train"), read_metrics(two, kind="train")
    assert [r["generated_tokens"] for r in a if "generated_tokens" in r] == [
        r["generated_tokens"] for r in b if "generated_tokens" in r
    ]
    for x, y in zip(a, b, strict=True):
        assert x["num_tokens"] == y["num_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
