"""The KD recipe under FSDP2 with 2 processes (gloo on CPU) against the single-process recipe.

Three torchrun launches (each costs seconds of imports on both processes) serve every test:

1. ``tests/dist_workers/recipe_runs.py``: four 2-process runs in one launch (full/LoRA student,
   chunked/fused loss; each also switches on one FSDP option) and a full-student run stopped
   mid-epoch after step 13;
2. ``tune run --nproc_per_node 2 kdtune/recipes/knowledge_distillation.py``: resumes it;
3. ``kdtune run --nproc_per_node 2 knowledge_distillation``: the same full-student run
   uninterrupted.

The references are single-process runs in this process on the same global batches: a
2-process step reads 2 ranks x 1 sample x 2 micro-batches, which are the permutation positions
``[4k, 4k + 4)`` of the epoch, the same samples one process reads with 2 samples x 2
micro-batches (checked directly by ``test_ranks_together_read_the_single_process_batches``).
Validation covers the same 32 samples (2 ranks x 2 batches of 8; one process: 2 batches of 16).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchtune import training
from torchtune.training import FullModelHFCheckpointer

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.checkpoint.layout import (
    ADAPTER_DIRNAME,
    MODEL_DIRNAME,
    latest_checkpoint,
    read_manifest,
)
from kdtune.training.checkpoint.resume import load_training_state
from kdtune.training.config.errors import ConfigError
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.data import build_dataloader
from kdtune.training.metrics import MEMORY_FIELDS, SETUP_FIELDS, TRAIN_FIELDS, read_metrics
from kdtune.training.runtime import SINGLE_PROCESS, sharding_options

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_workers" / "recipe_runs.py"
BIN = Path(sys.executable).parent

STEPS = 20
STOP_AT = 13  # inside the second epoch (10 steps each)
COMMON = ("epochs=2", "max_steps_per_epoch=10", "validate_every_n_steps=null")
TWO_PROCESSES = ("batch_size=1", "gradient_accumulation_steps=2")
ONE_PROCESS = ("batch_size=2", "gradient_accumulation_steps=2", "validation_batch_size=16")

# Each 2-process run also exercises one FSDP option, which must not change the numbers.
VARIANTS: dict[str, tuple[str, ...]] = {
    "full_chunked": (),
    "full_fused": ("fsdp_cpu_offload=true",),
    "lora_chunked": ("enable_activation_checkpointing=true",),
    "lora_fused": ("fsdp_reshard_after_forward=false", "fsdp_teacher_reshard_after_forward=false"),
}
# Options of both sides (the single-process reference too).
SHARED: dict[str, tuple[str, ...]] = {"lora_fused": ("save_adapter_weights_only=true",)}

TOLERANCE = 1e-5  # fp32 loss curves


@pytest.fixture(scope="module")
def two_process(tiny_assets, tmp_path_factory: pytest.TempPathFactory, launch) -> Path:
    """Output folders of the 2-process runs: ``<root>/<variant>`` and ``<root>/resumed``."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    root = tmp_path_factory.mktemp("two_process")
    common = [f"assets_dir={tiny_assets.root}", *COMMON, *TWO_PROCESSES]

    runs = [
        {
            "config": f"tiny/{variant}",
            "overrides": [
                *common,
                f"output_dir={root / variant}",
                *options,
                *SHARED.get(variant, ()),
            ],
            "count_gradient_reductions": variant == "full_fused",
        }
        for variant, options in VARIANTS.items()
        if variant != "full_chunked"
    ]
    stopped = [*common, f"output_dir={root / 'resumed'}"]
    runs.append(
        {"config": "tiny/full_chunked", "overrides": [*stopped, f"stop_after_steps={STOP_AT}"]}
    )
    (root / "runs.json").write_text(json.dumps(runs))
    launch.torchrun(WORKER, "--runs", str(root / "runs.json"), cwd=REPO)

    # From a folder without a kdtune/ of its own, as the README says for `tune run`.
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    config_path = REPO / "configs" / "tiny" / "full_chunked.yaml"
    recipe = "kdtune/recipes/knowledge_distillation.py"
    tune = [str(BIN / "tune"), "run", "--nproc_per_node", "2", recipe, "--config", str(config_path)]
    launch.run([*tune, *stopped, "resume_from_checkpoint=true"], cwd=elsewhere)

    kdtune = [sys.executable, "-m", "kdtune.cli.main", "run", "--nproc_per_node", "2"]
    run_args = ["knowledge_distillation", "--config", "tiny/full_chunked"]
    launch.run([*kdtune, *run_args, *common, f"output_dir={root / 'full_chunked'}"], cwd=elsewhere)
    return root


def _run_in_this_process(config: str, overrides: list[str]) -> None:
    """One single-process recipe run, exactly as ``kdtune run`` loads the config."""
    threads, debug_mode = torch.get_num_threads(), torch.get_deterministic_debug_mode()
    torch.set_num_threads(1)
    try:
        cfg = load_config(resolve_config(config), overrides)
        recipe = KDRecipe(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.train()
        recipe.cleanup()
    finally:
        torch.set_num_threads(threads)
        torch.set_deterministic_debug_mode(debug_mode)


@pytest.fixture(scope="module")
def one_process(tiny_assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folders ``<root>/<variant>`` of the single-process references."""
    root = tmp_path_factory.mktemp("one_process")
    for variant in VARIANTS:
        overrides = [
            f"assets_dir={tiny_assets.root}",
            f"output_dir={root / variant}",
            *COMMON,
            *ONE_PROCESS,
            *SHARED.get(variant, ()),
        ]
        _run_in_this_process(f"tiny/{variant}", overrides)
    return root


def _setup_record(output_dir: Path) -> dict:
    records = read_metrics(output_dir, kind="setup")
    assert records and set(records[-1]) == set(SETUP_FIELDS)
    return records[-1]


def _hf_weights(folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint folder's weights as torchtune's FullModelHFCheckpointer reads them."""
    reader = FullModelHFCheckpointer(
        checkpoint_dir=str(folder / MODEL_DIRNAME),
        checkpoint_files=sorted(
            p.name for p in (folder / MODEL_DIRNAME).glob("model-*.safetensors")
        ),
        model_type="LLAMA3",
        output_dir=str(tmp_path / f"reader_{folder.parent.parent.name}"),
    )
    return reader.load_checkpoint()[training.MODEL_KEY]


# --------------------------------------------------------------------------------------------
# Two processes against one
# --------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_curve_equals_the_single_process_run(variant, two_process, one_process):
    sharded, reference = two_process / variant, one_process / variant
    assert _setup_record(sharded)["world_size"] == 2
    assert _setup_record(reference)["world_size"] == 1
    ours, theirs = read_metrics(sharded, kind="train"), read_metrics(reference, kind="train")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, STEPS + 1))
    for a, b in zip(ours, theirs):
        assert set(a) == set(TRAIN_FIELDS)
        assert a["num_tokens"] == b["num_tokens"], a["step"]  # the same samples
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for key in ("loss", "ce_loss", "kd_loss"):
        difference = max(abs(a[key] - b[key]) for a, b in zip(ours, theirs))
        assert difference <= TOLERANCE, (variant, key, difference)
    # The curve moved: equality is not that of two constant sequences.
    assert ours[-1]["loss"] < 0.8 * ours[0]["loss"]

    # Validation under FSDP2: the same 32 samples, the same numbers.
    val_ours, val_theirs = (
        read_metrics(sharded, kind="val")[-1],
        read_metrics(reference, kind="val")[-1],
    )
    assert val_ours["num_tokens"] == val_theirs["num_tokens"]
    for key in ("ce", "kl_to_teacher", "top1_agreement"):
        assert val_ours[key] == pytest.approx(val_theirs[key], abs=TOLERANCE), key


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full_chunked", "lora_fused"])
def test_each_rank_holds_half_the_parameters(variant, two_process, one_process):
    sharded, whole = _setup_record(two_process / variant), _setup_record(one_process / variant)
    for key in ("param_memory_gib", "student_param_memory_gib", "teacher_param_memory_gib"):
        assert len(sharded[key]) == 2 and len(whole[key]) == 1
        for rank_gib in sharded[key]:
            assert rank_gib == pytest.approx(whole[key][0] / 2, rel=0.02), (key, sharded, whole)
    memory = read_metrics(two_process / variant, kind="memory")
    assert [r["step"] for r in memory] == list(range(1, STEPS + 1))  # log_every_n_steps: 1
    for record in memory:
        assert set(record) == set(MEMORY_FIELDS)
        assert len(record["peak_memory_gib"]) == 2 and min(record["peak_memory_gib"]) > 0
    peaks = [r["peak_memory_gib"] for r in read_metrics(two_process / variant, kind="train")]
    assert peaks[-1] == max(memory[-1]["peak_memory_gib"])


@pytest.mark.distributed
@pytest.mark.slow
def test_gradients_are_reduced_only_in_the_last_micro_batch(two_process):
    """FSDP2 reduce-scatters once per optimizer step (2 micro-batches), not per micro-batch."""
    counts = json.loads((two_process / "full_fused" / "gradient_reductions.json").read_text())
    assert len(counts) == 2 * STEPS
    assert counts[0::2] == [0] * STEPS  # first micro-batches: gradients stay local
    last = counts[1::2]  # every parameter group reduces once, in the last backward
    assert min(last) > 0 and len(set(last)) == 1, last


def test_resumed_two_process_run_matches_the_uninterrupted_one(two_process):
    straight, resumed = two_process / "full_chunked", two_process / "resumed"
    stopped = resumed / "checkpoints" / f"step_{STOP_AT:07d}"
    manifest = read_manifest(stopped)
    assert (manifest["epoch"], manifest["steps_in_epoch"], manifest["final"]) == (1, 3, False)
    assert manifest["world_size"] == 2
    assert len(load_training_state(stopped)["rng"]) == 2  # one generator state per rank

    assert [r["step"] for r in read_metrics(resumed, kind="setup")] == [0, STOP_AT]
    a, b = read_metrics(straight, kind="train"), read_metrics(resumed, kind="train")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    keys = ("loss", "ce_loss", "kd_loss", "grad_norm", "lr", "num_tokens")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    final_a, final_b = latest_checkpoint(straight), latest_checkpoint(resumed)
    assert final_a.name == final_b.name == f"step_{STEPS:07d}"
    assert read_manifest(final_b)["final"] is True
    weights_a = load_file(next((final_a / MODEL_DIRNAME).glob("model-*.safetensors")))
    weights_b = load_file(next((final_b / MODEL_DIRNAME).glob("model-*.safetensors")))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full_chunked", "lora_chunked"])
def test_two_process_checkpoint_loads_in_the_hf_checkpointer(
    variant, two_process, one_process, tmp_path
):
    """Full weights (merged for LoRA), gathered from both ranks, equal the 1-process run's."""
    ours = _hf_weights(latest_checkpoint(two_process / variant), tmp_path)
    theirs = _hf_weights(latest_checkpoint(one_process / variant), tmp_path)
    assert ours.keys() == theirs.keys() and ours
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4, msg=key)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_adapter_only_checkpoint(two_process, one_process):
    folder = latest_checkpoint(two_process / "lora_fused")
    assert read_manifest(folder)["merged_weights"] is False
    assert not list((folder / MODEL_DIRNAME).glob("model-*.safetensors"))
    ours = torch.load(folder / ADAPTER_DIRNAME / "adapter_model.pt", weights_only=True)
    theirs = torch.load(
        latest_checkpoint(one_process / "lora_fused") / ADAPTER_DIRNAME / "adapter_model.pt"
    )
    assert ours.keys() == theirs.keys() and ours
    assert all("lora_" in key for key in ours)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4, msg=key)


@pytest.mark.distributed
@pytest.mark.slow
def test_single_device_recipe_starts_from_the_two_process_checkpoint(
    two_process, tiny_assets, tmp_path
):
    """Its weights, read by the single-device recipe, score what the 2-process run measured.

    One step at learning rate 0 leaves the weights as loaded; the final validation then sees
    the 2-process run's last 32 validation samples.
    """
    folder = latest_checkpoint(two_process / "full_chunked") / MODEL_DIRNAME
    overrides = [
        f"assets_dir={tiny_assets.root}",
        f"output_dir={tmp_path / 'out'}",
        f"checkpointer.checkpoint_dir={folder}",
        f"checkpointer.checkpoint_files=[{next(folder.glob('model-*.safetensors')).name}]",
        "optimizer.lr=0.0",
        "epochs=1",
        "max_steps_per_epoch=1",
        *ONE_PROCESS,
    ]
    _run_in_this_process("tiny/full_chunked", overrides)
    single = read_metrics(tmp_path / "out", kind="val")[-1]
    sharded = read_metrics(two_process / "full_chunked", kind="val")[-1]
    assert single["num_tokens"] == sharded["num_tokens"]
    for key in ("ce", "kl_to_teacher"):
        assert single[key] == pytest.approx(sharded[key], abs=1e-6), key


# --------------------------------------------------------------------------------------------
# Single-process checks of the distributed pieces (fast)
# --------------------------------------------------------------------------------------------


def test_ranks_together_read_the_single_process_batches():
    """Global batch k of W ranks (b samples x A micro-batches each) = one process's batch k
    with W*b samples x A micro-batches (or b x W*A): the comparison's premise."""
    dataset = list(range(64))

    def step_sets(batch_size: int, accumulation: int, world_size: int) -> list[set[int]]:
        per_rank = []
        for rank in range(world_size):
            loader = build_dataloader(
                dataset,
                batch_size=batch_size,
                collate_fn=lambda samples: samples,
                shuffle=True,
                seed=3,
                rank=rank,
                world_size=world_size,
                drop_last=True,
            )
            loader.sampler.set_epoch(1)
            per_rank.append(list(loader))
        steps = len(per_rank[0]) // accumulation
        return [
            {
                sample
                for batches in per_rank
                for batch in batches[k * accumulation : (k + 1) * accumulation]
                for sample in batch
            }
            for k in range(steps)
        ]

    two_ranks = step_sets(batch_size=1, accumulation=2, world_size=2)
    assert len(two_ranks) == 16 and all(len(step) == 4 for step in two_ranks)
    assert two_ranks == step_sets(batch_size=2, accumulation=2, world_size=1)
    assert two_ranks == step_sets(batch_size=4, accumulation=1, world_size=1)


def _fsdp_config(**values: object):
    base = {
        "fsdp_cpu_offload": False,
        "fsdp_reshard_after_forward": True,
        "fsdp_teacher_reshard_after_forward": True,
        "teacher_quantization": None,
    }
    return OmegaConf.create({**base, **values})


def test_sharding_options_follow_the_config_and_dtype():
    options = sharding_options(_fsdp_config(fsdp_cpu_offload=True), torch.bfloat16, 2)
    assert options.cpu_offload and options.student_reshard_after_forward
    assert (options.param_dtype, options.reduce_dtype) == (torch.bfloat16, torch.float32)
    options = sharding_options(_fsdp_config(fsdp_reshard_after_forward=False), torch.float32, 2)
    assert not options.student_reshard_after_forward and options.teacher_reshard_after_forward
    assert (options.param_dtype, options.reduce_dtype) == (None, None)
    assert not SINGLE_PROCESS.cpu_offload and SINGLE_PROCESS.param_dtype is None


def test_multi_process_run_needs_the_fsdp_keys():
    cfg = _fsdp_config()
    del cfg["fsdp_teacher_reshard_after_forward"]
    with pytest.raises(ConfigError, match="fsdp_teacher_reshard_after_forward"):
        sharding_options(cfg, torch.float32, 2)


def test_multi_process_run_refuses_an_int8_teacher():
    cfg = _fsdp_config(teacher_quantization="int8_weight_only")
    with pytest.raises(ConfigError, match=r"teacher_quantization.*int8_weight_only.*null"):
        sharding_options(cfg, torch.float32, 2)
