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

* ``launch``: :class:`Launcher`: ``launch.torchrun(worker, *args, cwd=...)`` runs a worker of
  ``tests/dist_workers/`` in 2 processes, ``launch.run(command, cwd=...)`` any multi-process
  command (``kdtune run`` / ``tune run --nproc_per_node 2``); a failure fails the test with the
  output tails.
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

import subprocess
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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
"""Two local processes. ``--standalone`` rendezvous on port 0: the OS picks a free port, so
parallel launches cannot race for one."""

LAUNCH_TIMEOUT_S = 1200
"""Generous: a 2-process launch takes 10-60 s on an idle 2-core machine, several times that
when other processes keep both cores busy; a hang still ends in a failure with the output."""


class Launcher:
    """Runs multi-process commands, one intra-op thread per process (2 processes on 2 cores),
    and fails the calling test with the output tails if one exits non-zero or hangs."""

    def torchrun(self, script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        """``python -m torch.distributed.run --standalone --nproc_per_node 2 script args``."""
        return self.run([*TORCHRUN, str(script), *args], cwd=cwd)

    def run(self, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run(
                command,
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=LAUNCH_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as expired:
            pytest.fail(
                f"{' '.join(command[:8])} ... did not end within {LAUNCH_TIMEOUT_S} s:\n"
                f"{_tail(expired.stdout, 3000)}\n{_tail(expired.stderr, 8000)}"
            )
        if proc.returncode != 0:
            pytest.fail(
                f"{' '.join(command[:8])} ... failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
            )
        return proc


@pytest.fixture(scope="session")
def launch() -> Launcher:
    """The one launcher of the multi-process tests (workers live in ``tests/dist_workers/``)."""
    return Launcher()


def _tail(output: str | bytes | None, limit: int) -> str:
    if output is None:
        return ""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    return text[-limit:]
