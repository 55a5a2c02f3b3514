"""``release_free_heap``: glibc's ``malloc_trim`` really gives freed heap pages back, and the
recipe calls it before every backward and every optimizer step on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_recipe_step import STEPS, short_run

from kdtune.training import host_memory

FRAGMENTED_HEAP = """
import ctypes, json
import torch
from kdtune.training import host_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

# a freed 16 MiB tensor raises glibc's mmap threshold: the 1 MiB tensors below come from the
# heap; every one but the last is freed, so the top of the heap stays in use and the freed
# pages below it stay resident until they are trimmed
large = torch.empty(4 * 2**20)
del large
kept = [torch.ones(2**18) for _ in range(200)][-1:]
before = rss_mib()
released = host_memory.release_free_heap()
print(json.dumps({"before": before, "after": rss_mib(), "released": released}))
"""


@pytest.mark.skipif(host_memory._malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_system():
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["released"]
    assert result["before"] - result["after"] > 100, result  # about 199 MiB freed


def test_the_recipe_releases_before_each_backward_and_optimizer_step(
    tiny_assets, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(host_memory, "release_free_heap", lambda: calls.append(1) or True)
    recipe = short_run("tiny/full_chunked", tiny_assets, tmp_path / "out")
    recipe.train()
    recipe.cleanup()
    micro_batches_per_step = 2
    assert len(calls) == STEPS * (micro_batches_per_step + 1)
