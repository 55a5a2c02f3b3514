"""Huge pages for large CPU tensors (``kdtune.use_huge_pages_for_large_tensors``): a kdtune
process does not page-fault them 4 KiB at a time.

Each case runs in a fresh interpreter (PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once, at the first
CPU allocation): it imports what a recipe run imports first (torch, torchtune, then kdtune's
recipe module), then counts the minor page faults (``getrusage``) of making and filling 64 MiB
tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdtune import THP_ENV

SCRIPT = """
import json, resource
import torch, torchtune  # as tune run does before the recipe file
import kdtune.recipes.knowledge_distillation  # the recipe's own imports
import os
def cycle():
    x = torch.empty(16 * 1024 * 1024, dtype=torch.float32)  # 64 MiB
    x.fill_(1.0)
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    cycle()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "faults": faults}))
"""

PAGES = 3 * 64 * 1024 * 1024 // 4096
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def faults(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    if env_value is not None:
        env[THP_ENV] = env_value
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not THP.is_file() or "[never]" in THP.read_text(), reason="no transparent huge pages"
)
def test_a_kdtune_process_faults_large_tensors_in_by_huge_pages():
    kdtune_default, opted_out = faults(None), faults("0")
    assert kdtune_default["env"] == "1" and opted_out["env"] == "0"
    # PyTorch's default: every 4 KiB page of every 64 MiB tensor faults, each time
    assert opted_out["faults"] >= 0.9 * PAGES, opted_out
    # huge pages: 2 MiB per fault
    assert kdtune_default["faults"] < 0.1 * PAGES, kdtune_default


def test_the_environment_wins(monkeypatch):
    from kdtune import use_huge_pages_for_large_tensors

    monkeypatch.setenv(THP_ENV, "0")
    assert use_huge_pages_for_large_tensors() == "0"
    monkeypatch.delenv(THP_ENV)
    assert use_huge_pages_for_large_tensors() == "1"
