"""Graceful stop on a scheduler's signal: the step finishes, one checkpoint is saved, the run
exits with its own status and says how to resume; resuming ends bit-identical to a run that
was never stopped, in one process and in two (the signal sent to the launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdtune.training import stop_signals
from kdtune.training.checkpoint.layout import complete_checkpoints
from kdtune.training.stop_signals import PREEMPTED_EXIT_CODE, StopRequest

STEPS = 40
KDTUNE = [sys.executable, "-m", "kdtune.cli.main", "run"]


def command(nproc: int, output_dir: Path, assets: Path, *extra: str) -> list[str]:
    launcher = ["--nproc_per_node", "2"] if nproc == 2 else []
    return [
        *KDTUNE,
        *launcher,
        "knowledge_distillation",
        "--config",
        "tiny/full_chunked",
        f"assets_dir={assets}",
        f"output_dir={output_dir}",
        "epochs=1",
        f"max_steps_per_epoch={STEPS}",
        "validate_every_n_steps=null",
        "log_every_n_steps=1",
        *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_to_end(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]


def train_records(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if '"kind": "train"' in line]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    folder = complete_checkpoints(output_dir)[-1]
    weights = {}
    for shard in sorted((folder / "model").glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_exact(nproc, tiny_assets, tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    proc = subprocess.Popen(
        command(nproc, stopped, tiny_assets.root),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while len(train_records(stopped)) < 3 and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never logged 3 steps"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher (kdtune run, torchrun in it for 2)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-4000:]
    (folder,) = complete_checkpoints(stopped)
    step = int(folder.name.removeprefix("step_"))
    assert 3 <= step < STEPS
    assert f"stopped by SIGTERM after step {step}" in stderr
    assert "resume_from_checkpoint=true" in stderr
    assert "Traceback" not in stderr
    assert max(r["step"] for r in train_records(stopped)) == step

    run_to_end(command(nproc, stopped, tiny_assets.root, "resume_from_checkpoint=true"))
    run_to_end(command(nproc, reference, tiny_assets.root))
    resumed, uninterrupted = final_weights(stopped), final_weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_second_signal_exits_at_once_and_a_duplicate_counts_once(monkeypatch):
    exits = []
    monkeypatch.setattr(stop_signals.os, "_exit", exits.append)
    clock = iter([100.0, 100.4, 102.0])
    monkeypatch.setattr(stop_signals.time, "monotonic", lambda: next(clock))
    request = StopRequest()
    request._handle(signal.SIGINT, None)
    assert request.signal == signal.SIGINT and not exits
    assert request.agreed(torch.device("cpu"))  # one process: no collective
    request._handle(signal.SIGTERM, None)  # 0.4 s later: the launcher forwarding the same stop
    assert not exits
    request._handle(signal.SIGINT, None)  # 2 s later: the user insists
    assert exits == [128 + signal.SIGINT]


def test_handlers_are_installed_and_restored():
    before = {s: signal.getsignal(s) for s in stop_signals.STOP_SIGNALS}
    request = StopRequest()
    request.install()
    try:
        assert all(signal.getsignal(s) == request._handle for s in stop_signals.STOP_SIGNALS)
    finally:
        request.uninstall()
    assert {s: signal.getsignal(s) for s in stop_signals.STOP_SIGNALS} == before
