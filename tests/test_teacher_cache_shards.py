"""Shard sizing of ``kdtune cache-teacher``: by default small enough that a killed build
resumes with most of its work kept (at most 256 samples, and at most ``max_shard_bytes``)."""

from __future__ import annotations

import json
import multiprocessing
import signal

import torch
from test_teacher_cache import _build_and_get_killed, cache_files, tiny_cfg

from kdtune.teacher_cache.build import (
    BUILD_STATS,
    MAX_SAMPLES_PER_SHARD,
    BuildOptions,
    auto_samples_per_shard,
    build_teacher_cache,
)
from kdtune.teacher_cache.encoding import TopKCodec

MIB = 2**20


def test_the_real_set_is_split_into_several_shards_under_the_byte_bound():
    """SmolLM2's vocabulary at k = 128: the 836-sample real set (128 tokens) in >= 4 shards;
    at 4,096 tokens a shard stays under 64 MiB (fewer samples)."""
    bytes_per_position = TopKCodec(128, 49_152).bytes_per_position
    short = auto_samples_per_shard(bytes_per_position, 128, 64 * MIB)
    assert short <= MAX_SAMPLES_PER_SHARD == 256
    assert -(-836 // short) >= 4
    long = auto_samples_per_shard(bytes_per_position, 4096, 64 * MIB)
    assert 1 <= long < short
    assert long * bytes_per_position * 4096 <= 64 * MIB
    assert auto_samples_per_shard(bytes_per_position, 10**9, 64 * MIB) == 1  # never 0


def test_a_build_killed_after_its_first_default_shard_resumes_to_the_same_cache(
    tiny_assets, tmp_path
):
    """Default sizing with a byte bound that makes ~100-sample shards: killed while writing
    shard 1, the rerun keeps shard 0 and ends with the bytes of an uninterrupted build."""
    codec = TopKCodec(16, 512, num_knots=16)
    max_seq_len = tiny_cfg(tiny_assets).tokenizer.max_seq_len  # tiny/full_chunked's
    per_sample = codec.bytes_per_position * max_seq_len + 24
    options = BuildOptions(top_k=16, knots=16, batch_size=8, max_shard_bytes=100 * per_sample)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = tmp_path / "straight"
        build_teacher_cache(tiny_cfg(tiny_assets, f"teacher_cache={straight}"), options)
        plan = json.loads((straight / "plan.json").read_text())
        assert plan["samples_per_shard"] == 100 and plan["num_shards"] >= 3

        folder = tmp_path / "killed"
        cfg = tiny_cfg(tiny_assets, f"teacher_cache={folder}")
        child = multiprocessing.get_context("fork").Process(
            target=_build_and_get_killed, args=(cfg, options, 1)
        )
        child.start()
        child.join(timeout=300)
        assert child.exitcode == -signal.SIGKILL
        names = {p.name for p in folder.iterdir()}
        assert "shard_00000.safetensors.json" in names and "manifest.json" not in names

        build_teacher_cache(tiny_cfg(tiny_assets, f"teacher_cache={folder}"), options)
    finally:
        torch.set_num_threads(threads)
    stats = json.loads((folder / BUILD_STATS).read_text())
    assert stats["shards_built_last_run_rank0"] == plan["num_shards"] - 1  # shard 0 kept
    assert cache_files(folder) == cache_files(straight)
