"""The KD recipe trained from a teacher cache: the same training as with the teacher (k = V), no
teacher weights read, bit-exact resume, and 2 processes (FSDP2, gloo) equal to one, from a cache
that 2 processes built byte-for-byte as one did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchtune.training import FullModelHFCheckpointer

from kdtune.teacher_cache.build import BUILD_STATS, BuildOptions, build_teacher_cache
from kdtune.training.checkpoint.layout import latest_checkpoint
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_workers" / "teacher_cache_runs.py"
CACHED = "tiny/full_chunked_cached"
VOCAB = 512  # tiny assets, small vocabulary
# k = V with every rank a knot: the cache holds the teacher's whole distribution (float16).
FULL = BuildOptions(top_k=VOCAB, knots=VOCAB, samples_per_shard=100)

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

# 2 epochs of 3 steps of 2 micro-batches (shuffled); stopped runs stop inside the first epoch.
STEPS = ("epochs=2", "max_steps_per_epoch=3", "validate_every_n_steps=null")


@pytest.fixture(scope="module")
def full_cache(tiny_assets, tmp_path_factory) -> Path:
    """The tiny teacher's cache with :data:`FULL` options, built by this process."""
    folder = tmp_path_factory.mktemp("recipe_cache") / "k512"
    cfg = load_config(
        resolve_config(CACHED), [f"assets_dir={tiny_assets.root}", f"teacher_cache={folder}"]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_teacher_cache(cfg, FULL)
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def checkpoint_reads(monkeypatch) -> list[str]:
    """Folders every ``FullModelHFCheckpointer.load_checkpoint`` call reads, in order."""
    reads: list[str] = []
    load = FullModelHFCheckpointer.load_checkpoint

    def recording(self, *args, **kwargs):
        reads.append(str(self._checkpoint_dir))
        return load(self, *args, **kwargs)

    monkeypatch.setattr(FullModelHFCheckpointer, "load_checkpoint", recording)
    return reads


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    folder = latest_checkpoint(output_dir)
    return {
        f"{shard.name}:{key}": value
        for shard in sorted(folder.glob("*/*.safetensors"))
        for key, value in load_file(shard).items()
    }


@pytest.mark.slow
def test_cache_of_the_whole_distribution_trains_like_the_teacher(
    kdtune_run, full_cache, tiny_assets, tmp_path, checkpoint_reads
):
    """Rows joined by sample index under shuffling: with k = V the cached run is the online run
    up to float16 log-probs. The teacher keys are set in the config; its weights are not read."""
    common = [f"assets_dir={tiny_assets.root}", *STEPS, "gradient_accumulation_steps=2"]
    kdtune_run("tiny/full_chunked", [*common, f"output_dir={tmp_path / 'online'}"])
    checkpoint_reads.clear()
    cached = tmp_path / "cached"
    kdtune_run(CACHED, [*common, f"output_dir={cached}", f"teacher_cache={full_cache}"])

    assert checkpoint_reads == [str(tiny_assets.student_dir)]  # the student's weights only
    online, offline = read_metrics(tmp_path / "online", "train"), read_metrics(cached, "train")
    assert len(online) == len(offline) == 6
    assert online[0]["ce_loss"] == pytest.approx(offline[0]["ce_loss"], rel=1e-6)
    for a, b in zip(online, offline):
        assert a["num_tokens"] == b["num_tokens"]  # the same samples, step by step
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=2e-3, abs=1e-4), a["step"]
    # Misjoined rows (another sample's teacher) would give KD losses of another size entirely.
    assert read_metrics(cached, "val")[-1]["kl_to_teacher"] is None  # no teacher to compare


@pytest.fixture(scope="module")
def straight_run(full_cache, tiny_assets, tmp_path_factory) -> Path:
    """One uninterrupted single-process cached run (batch 2, 2 micro-batches, 6 steps)."""
    from kdtune.cli.main import main as kdtune_main

    output_dir = tmp_path_factory.mktemp("cached_runs") / "straight"
    threads, debug_mode = torch.get_num_threads(), torch.get_deterministic_debug_mode()
    torch.set_num_threads(1)
    argv, sys.argv = list(sys.argv), list(sys.argv)
    try:
        with pytest.raises(SystemExit) as exit_info:
            kdtune_main(
                [
                    "run",
                    "knowledge_distillation",
                    "--config",
                    CACHED,
                    f"assets_dir={tiny_assets.root}",
                    *STEPS,
                    "gradient_accumulation_steps=2",
                    f"output_dir={output_dir}",
                    f"teacher_cache={full_cache}",
                ]
            )
        assert exit_info.value.code in (0, None)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
        torch.set_deterministic_debug_mode(debug_mode)
    return output_dir


@pytest.mark.slow
def test_cached_run_resumes_mid_epoch_bitwise(
    kdtune_run, straight_run, full_cache, tiny_assets, tmp_path
):
    common = [
        f"assets_dir={tiny_assets.root}",
        *STEPS,
        "gradient_accumulation_steps=2",
        f"output_dir={tmp_path / 'resumed'}",
        f"teacher_cache={full_cache}",
    ]
    kdtune_run(CACHED, [*common, "stop_after_steps=2"])
    assert latest_checkpoint(tmp_path / "resumed").name == "step_0000002"
    kdtune_run(CACHED, [*common, "resume_from_checkpoint=true"])
    straight, resumed = _weights(straight_run), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    ours, theirs = read_metrics(tmp_path / "resumed", "train"), read_metrics(straight_run, "train")
    assert [(r["loss"], r["grad_norm"]) for r in ours] == [
        (r["loss"], r["grad_norm"]) for r in theirs
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_build_and_train_as_one(straight_run, full_cache, tiny_assets, tmp_path):
    """``kdtune cache-teacher`` with 2 processes writes the same bytes as with 1 (each rank its
    own shards); then 2 ranks x 1 sample x 2 micro-batches train on the global batches of
    1 process x 2 x 2, with the same losses."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    output_dir, cache = tmp_path / "two", tmp_path / "cache_two"
    build = {
        "config": CACHED,
        "overrides": [f"assets_dir={tiny_assets.root}", f"teacher_cache={cache}"],
        "options": vars(FULL),
    }
    overrides = [f"assets_dir={tiny_assets.root}", *STEPS, "gradient_accumulation_steps=2"]
    overrides += ["batch_size=1", f"output_dir={output_dir}", f"teacher_cache={cache}"]
    (tmp_path / "runs.json").write_text(json.dumps([{"config": CACHED, "overrides": overrides}]))
    (tmp_path / "build.json").write_text(json.dumps(build))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(WORKER), "--build", str(tmp_path / "build.json")]
    command += ["--runs", str(tmp_path / "runs.json")]
    proc = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    built_by_two = sorted(p.name for p in cache.iterdir() if p.name != BUILD_STATS)
    assert len(built_by_two) == 2 * 3 + 2  # 3 shards, their records, plan and manifest
    for name in built_by_two:
        assert (cache / name).read_bytes() == (full_cache / name).read_bytes(), name
    assert json.loads((cache / BUILD_STATS).read_text())["world_size"] == 2
    assert read_metrics(output_dir, "setup")[-1]["world_size"] == 2
    ours, theirs = read_metrics(output_dir, "train"), read_metrics(straight_run, "train")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 7))
    for a, b in zip(ours, theirs):
        assert a["num_tokens"] == b["num_tokens"]
        for key in ("loss", "ce_loss", "kd_loss"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key)
    assert ours[-1]["loss"] < 0.8 * ours[0]["loss"]  # the curve moved
