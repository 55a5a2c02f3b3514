"""One run per output_dir (:mod:`kdtune.training.run_lock`): a second run into a folder in use
stops before loading anything, naming the holder; a lock left by a killed run is no obstacle."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdtune.training import run_lock
from kdtune.training.checkpoint.layout import complete_checkpoints, read_manifest
from kdtune.training.metrics import read_metrics

HOLD = """
import sys, time
from kdtune.training import run_lock
run_lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _holder(folder: Path) -> subprocess.Popen:
    """A process that takes ``folder``'s lock and keeps it (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_folder_is_refused_naming_the_holder_and_a_killed_holder_is_no_obstacle(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        with pytest.raises(run_lock.OutputDirLockedError) as raised:
            run_lock.acquire(out)
        message = str(raised.value)
        assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message
        assert "started 20" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # as kill -9: no cleanup code runs
        holder.wait()
    assert json.loads((out / run_lock.LOCK_FILENAME).read_text())["pid"] == holder.pid  # stale
    lock = run_lock.acquire(out)
    assert json.loads((out / run_lock.LOCK_FILENAME).read_text())["pid"] == os.getpid()
    lock.release()
    lock = run_lock.acquire(out)  # released: free again (and re-entrant within a process)
    assert run_lock.acquire(out) is not lock
    run_lock.acquire(out).release()


def _launch(assets_root: Path, out: Path, seed: int, log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "kdtune.cli.main",
        "run",
        "knowledge_distillation",
        "--config",
        "tiny/full_chunked",
        f"assets_dir={assets_root}",
        f"output_dir={out}",
        "validate_every_n_steps=null",
        "save_every_n_steps=2",
        "tokenizer.max_seq_len=256",  # every sample keeps its answer (no empty step)
        f"seed={seed}",
    ]
    with log.open("w") as file:
        return subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, env=_env())


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder_one_trains(tiny_assets, tmp_path):
    """The issue's case: both started at once with seeds 0 and 1. Exactly one trains; the
    other exits 1 with one line naming the winner's pid, without loading weights; the
    metrics and checkpoints are the winner's alone."""
    out = tmp_path / "out"
    logs = [tmp_path / f"run{seed}.log" for seed in (0, 1)]
    procs = [_launch(tiny_assets.root, out, seed, log) for seed, log in zip((0, 1), logs)]
    ended: dict[int, int] = {}  # process index -> order of exit
    deadline = time.monotonic() + 600
    while len(ended) < 2 and time.monotonic() < deadline:
        for index, proc in enumerate(procs):
            if index not in ended and proc.poll() is not None:
                ended[index] = len(ended)
        time.sleep(0.05)
    for proc in procs:
        proc.kill()  # no-op for finished ones (a hang fails below)
        proc.wait()
    texts = [log.read_text() for log in logs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 1], [(code, text[-2000:]) for code, text in zip(codes, texts)]
    winner = codes.index(0)
    loser_text = texts[1 - winner]
    assert f"in use by another run (host {socket.gethostname()}, pid {procs[winner].pid}" in (
        loser_text
    ), loser_text[-2000:]
    assert "Setup done" not in loser_text and "Traceback" not in loser_text
    assert ended[1 - winner] == 0  # it stopped first

    records = read_metrics(out)
    setups = [r for r in records if r["kind"] == "setup"]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert len(setups) == 1 and steps == sorted(set(steps)) and steps[-1] == 8
    run_ids = {read_manifest(folder)["run_id"] for folder in complete_checkpoints(out)}
    assert len(run_ids) == 1 and len(complete_checkpoints(out)) == 4
    assert not (out / "logs" / "error.log").exists()  # the loser wrote nothing into the folder


@pytest.mark.slow
def test_a_two_process_run_into_a_held_folder_stops_on_every_rank(tiny_assets, tmp_path):
    """Rank 0 finds the folder held and tells rank 1 (a broadcast): the launch fails with
    the holder named and no rank gets as far as loading weights."""
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "kdtune.cli.main",
                "run",
                "--nproc_per_node",
                "2",
                "knowledge_distillation",
                "--config",
                "tiny/full_chunked",
                f"assets_dir={tiny_assets.root}",
                f"output_dir={out}",
            ],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=600,
            check=False,
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"in use by another run (host {socket.gethostname()}, pid {holder.pid}" in text, text
    assert "Setup done" not in text and not (out / "metrics.jsonl").exists()
