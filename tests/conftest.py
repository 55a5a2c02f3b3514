"""Shared pytest setup for kdtune: a hermetic environment and the tiny offline assets.

At import (before any test module imports ``datasets`` / ``huggingface_hub``, which read these
once) the environment is made offline and cache-free:

* ``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``: any network access raises instead of hanging;
* ``TOKENIZERS_PARALLELISM=false``: no fork warnings from the tokenizers library;
* ``HF_HOME=<repo>/.pytest_cache/huggingface``: ``datasets.load_dataset("json", ...)`` caches its
  Arrow files inside the (git-ignored) repo, not in the user's home;
* ``TIKTOKEN_CACHE_DIR=""``: tiktoken reads ``tokenizer.model`` directly instead of caching a copy
  in the system temp folder keyed by path (a stale copy would survive a rewritten file).

Subprocesses started by tests inherit all of this through ``os.environ``.

Fixtures (session scope, built once per test session under pytest's tmp folder):

* ``tiny_assets``: :class:`kdtune.assets.TinyAssets`, vocab ``"small"`` (model vocab 512), seed 0;
* ``tiny_assets_llama3``: same, vocab ``"llama3"`` (model vocab 128,256, canonical Llama-3
  special-token ids), seed 0. Building it takes a few seconds (about 200 MB of fp32 weights).

Use them read-only: tests that write (checkpoints, outputs) write to their own ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "huggingface")
os.environ["TIKTOKEN_CACHE_DIR"] = ""

import sys
from collections.abc import Callable

import pytest

if TYPE_CHECKING:
    from kdtune.assets import TinyAssets


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """Tiny assets with the small vocabulary (model vocab_size 512), seed 0."""
    from kdtune.assets import make_tiny_assets  # imported here: torchtune is slow to import

    return make_tiny_assets(tmp_path_factory.mktemp("tiny_assets_small"), vocab="small", seed=0)


@pytest.fixture(scope="session")
def tiny_assets_llama3(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """Tiny assets with the Llama-3 vocabulary (model vocab_size 128,256), seed 0."""
    from kdtune.assets import make_tiny_assets

    return make_tiny_assets(tmp_path_factory.mktemp("tiny_assets_llama3"), vocab="llama3", seed=0)


@pytest.fixture
def one_thread_and_restored_torch_globals():
    """For end-to-end recipe tests: one torch thread, and torch's global state restored after.

    Tiny models run fastest on one thread (and do not oversubscribe a shared machine). The
    recipe sets process-wide torch state (``deterministic: true`` sets the deterministic debug
    mode); restoring it keeps later tests on the defaults. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")``.
    """
    import torch

    threads = torch.get_num_threads()
    debug_mode = torch.get_deterministic_debug_mode()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_deterministic_debug_mode(debug_mode)


@pytest.fixture
def kdtune_run(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, list[str]], None]:
    """``kdtune_run(config, overrides)``: ``kdtune run knowledge_distillation`` in this process."""
    from kdtune.cli.main import main as kdtune_main

    def run(config: str, overrides: list[str]) -> None:
        monkeypatch.setattr(sys, "argv", list(sys.argv))
        with pytest.raises(SystemExit) as exit_info:
            kdtune_main(["run", "knowledge_distillation", "--config", config, *overrides])
        assert exit_info.value.code in (0, None)

    return run
