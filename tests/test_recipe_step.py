"""The training step on GPU terms: no host synchronisation per micro-batch outside logging steps.

A host sync (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)`` on a device
tensor) stalls the CPU until the GPU has caught up, so a step that syncs per micro-batch cannot
queue the next micro-batch's kernels while the current ones run. On CPU every tensor is a host
tensor, so the test counts calls of these methods instead: patched on ``torch.Tensor``, counted
while the recipe runs a step that does not log (the optimizer's own step is left out: its
step counters are host tensors in CUDA runs too). Where CUDA exists the same run also goes
under ``torch.cuda.set_sync_debug_mode("error")``.

The reduce-scatter side (FSDP2 reduces gradients only in the last micro-batch's backward) is
checked in the 2-process runs of ``tests/test_recipe_distributed.py``.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

SYNCING_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")
LOG_EVERY = 3
STEPS = 4  # steps 1, 2 and 4 do not log; step 3 does


class SyncCounter:
    """Counts calls of the syncing ``torch.Tensor`` methods while :attr:`active`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.calls: list[str] = []
        for name in SYNCING_METHODS:
            monkeypatch.setattr(
                torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name))
            )

    def _counted(self, name, original):
        def method(tensor, *args, **kwargs):
            if self.active:
                where = traceback.extract_stack(limit=2)[0]  # the caller
                self.calls.append(f"{name} at {where.filename}:{where.lineno}")
            return original(tensor, *args, **kwargs)

        return method


def short_run(config: str, tiny_assets, output_dir: Path, *extra: str) -> KDRecipe:
    """The recipe, set up for :data:`STEPS` steps of 2 micro-batches, logging every 3rd."""
    overrides = [
        f"assets_dir={tiny_assets.root}",
        f"output_dir={output_dir}",
        "epochs=1",
        f"max_steps_per_epoch={STEPS}",
        "batch_size=1",
        "gradient_accumulation_steps=2",
        f"log_every_n_steps={LOG_EVERY}",
        "validate_every_n_steps=null",
        *extra,
    ]
    cfg = load_config(resolve_config(config), overrides)
    recipe = KDRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    return recipe


def run_counting(
    config: str, tiny_assets, output_dir: Path, monkeypatch, *extra: str
) -> dict[str, list]:
    """Run ``config`` (:func:`short_run`); the syncing calls of each step, by kind of step."""
    recipe = short_run(config, tiny_assets, output_dir, *extra)
    counter = SyncCounter(monkeypatch)
    calls: dict[str, list] = {"silent": [], "logging": []}

    paused_state = []
    recipe._optimizer.register_step_pre_hook(
        lambda *_: paused_state.append(counter.active) or setattr(counter, "active", False)
    )
    recipe._optimizer.register_step_post_hook(
        lambda *_: setattr(counter, "active", paused_state.pop())
    )
    train_step = recipe._train_step

    def counted_train_step(micro_batches, progress):
        kind = "logging" if (recipe.global_step + 1) % LOG_EVERY == 0 else "silent"
        counter.calls, counter.active = [], True
        try:
            train_step(micro_batches, progress)
        finally:
            counter.active = False
        calls[kind].append(counter.calls)

    monkeypatch.setattr(recipe, "_train_step", counted_train_step)
    recipe.train()
    recipe.cleanup()
    return calls


@pytest.mark.parametrize(
    "config",
    [
        "tiny/full_chunked",
        "tiny/lora_chunked",
        "tiny/full_fused",
    ],
)
def test_no_host_sync_outside_logging_steps(config, tiny_assets, tmp_path, monkeypatch):
    calls = run_counting(config, tiny_assets, tmp_path / "out", monkeypatch)
    assert len(calls["silent"]) == STEPS - STEPS // LOG_EVERY
    assert calls["silent"] == [[]] * len(calls["silent"])
    # The counter works: the logging step reads the pending steps' values, in one sync.
    assert len(calls["logging"]) == 1 and any("tolist" in c for c in calls["logging"][0])
    # Every step is still recorded, with the numbers read at the logging steps and at the end.
    records = read_metrics(tmp_path / "out", kind="train")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["num_tokens"] > 0 for r in records)
    assert [r["step"] for r in read_metrics(tmp_path / "out", kind="memory")] == [LOG_EVERY]


def test_on_non_finite_skip_reads_one_flag_per_step(tiny_assets, tmp_path, monkeypatch):
    """The documented cost of ``on_non_finite: skip``: exactly one host read per optimizer step
    (whether to apply the update), none per micro-batch; ``stop`` (the default) reads none."""
    out = tmp_path / "out"
    calls = run_counting("tiny/full_chunked", tiny_assets, out, monkeypatch, "on_non_finite=skip")
    assert len(calls["silent"]) == STEPS - STEPS // LOG_EVERY
    assert all(len(step) == 1 and "__bool__" in step[0] for step in calls["silent"])
    assert all("guard.py" in step[0] for step in calls["silent"])
    assert [r["skipped"] for r in read_metrics(out, kind="train")] == [False] * STEPS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_sync_outside_logging_steps(tiny_assets, tmp_path, monkeypatch):
    """On CUDA: torch's sync debug mode raises on any synchronising call in a silent step."""
    recipe = short_run("tiny/full_chunked", tiny_assets, tmp_path / "out", "device=cuda")
    train_step = recipe._train_step

    def checked_train_step(micro_batches, progress):
        silent = (recipe.global_step + 1) % LOG_EVERY != 0
        batches = [{k: v.cuda() for k, v in batch.items()} for batch in micro_batches]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if silent else "default")
        try:
            train_step(batches, progress)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(recipe, "_train_step", checked_train_step)
    recipe.train()
    recipe.cleanup()
    assert len(read_metrics(tmp_path / "out", kind="train")) == STEPS


def test_an_enabled_profiler_writes_a_trace_of_the_active_steps(tiny_assets, tmp_path):
    """``profiler`` is torchtune's ``setup_torch_profiler``, stepped once per optimizer step."""
    profile_dir = tmp_path / "profile"
    profiler = (
        "profiler={_component_: torchtune.training.setup_torch_profiler, enabled: true, "
        "cpu: true, cuda: false, xpu: false, wait_steps: 1, warmup_steps: 1, active_steps: 1, "
        f"num_cycles: 1, output_dir: {profile_dir}}}"
    )
    cfg = load_config(
        resolve_config("tiny/full_chunked"),
        [
            f"assets_dir={tiny_assets.root}",
            f"output_dir={tmp_path / 'out'}",
            "max_steps_per_epoch=4",
            "epochs=1",
            "validate_every_n_steps=null",
            profiler,
        ],
    )
    recipe = KDRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    traces = list(profile_dir.rglob("*.json")) + list(profile_dir.rglob("*.json.gz"))
    assert traces, f"no trace under {profile_dir}: {list(profile_dir.rglob('*'))}"
