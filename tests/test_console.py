"""What a user sees: ``kdtune run`` in a subprocess on the tiny assets, its stdout and stderr.

A config error is a short message naming the key (the traceback goes to
``<output_dir>/logs/error.log``); a run prints no config dump (``logs/config.yaml`` holds it),
no staging path, no unrounded figures, no dependency notices, and its validation lines on their
own lines. Numbers are read from ``metrics.jsonl``, not from the console.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdtune.training import console
from kdtune.training.config.errors import ConfigError
from kdtune.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def kdtune_run(tiny_assets, output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kdtune.cli.main", "run", "knowledge_distillation"]
    command += ["--config", "tiny/full_chunked", f"assets_dir={tiny_assets.root}"]
    command += [f"output_dir={output_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(console.VERBOSE_ENV, None)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def lines(text: str) -> list[str]:
    """Console lines, the progress bar's carriage-return redraws split apart."""
    return [part.strip() for part in re.split(r"[\r\n]", text) if part.strip()]


def test_a_config_error_is_one_short_message_naming_the_key(tiny_assets, tmp_path):
    out = tmp_path / "out"
    proc = kdtune_run(tiny_assets, out, "on_non_finite=maybe")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "on_non_finite = 'maybe'" in proc.stderr and "use one of" in proc.stderr
    assert len(lines(proc.stderr + proc.stdout)) <= 4, proc.stderr
    assert "--verbose" in proc.stderr
    assert not out.exists()  # a config error creates no output folder


def test_a_diverging_run_prints_its_story_quietly(tiny_assets, tmp_path):
    """lr 1e30: step 1 saves; validation after step 2 is NaN, so the run stops before its save
    with a short error naming the last good checkpoint."""
    out = tmp_path / "out"
    proc = kdtune_run(
        tiny_assets,
        out,
        "optimizer.lr=1e30",
        "max_steps_per_epoch=4",
        "save_every_n_steps=1",
        "validate_every_n_steps=1",
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    good = out / "checkpoints" / "step_0000001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [good.name]
    # The error: short, naming the step and the real folder of the last good checkpoint.
    assert "Traceback" not in text
    (error,) = [line for line in lines(proc.stderr) if line.startswith("kdtune: error:")]
    assert "validation after step 2" in error and f"last good checkpoint is {good}" in error
    error_log = out / "logs" / "error.log"
    assert f"full traceback: {error_log}" in proc.stderr
    assert "Traceback" in error_log.read_text() and "NonFiniteError" in error_log.read_text()
    # Saves name the real folder (torchtune's staging path and its messages are gone).
    assert f"saved checkpoint {good}" in text
    assert "staging" not in text and "saved successfully" not in text
    # No config dump (it is in logs/config.yaml), no dependency notice, rounded figures.
    assert "_component_" not in text and "resolved config" in text
    assert OmegaConf.load(out / "logs" / "config.yaml").output_dir == str(out)
    assert "set_vital" not in text
    long_figures = [  # 6+ decimals that are not a rounded small value (0.003953 is 4 digits)
        n for n in re.findall(r"\d+\.\d{6,}", text) if len(n.replace(".", "").lstrip("0")) > 4
    ]
    assert not long_figures, long_figures
    # Validation results on their own lines (written above the progress bar).
    assert any(line.startswith("validation at step 1: ce ") for line in lines(text))
    assert re.search(r"(^|\n)validation at step 1: ce [^\r\n%]*\n", proc.stderr), proc.stderr
    assert "validation at step 1" in (out / "logs" / "run.log").read_text()
    ce = [r["ce"] for r in read_metrics(out, kind="val")]
    assert ce[1] == "nan" and isinstance(ce[0], float)


def test_verbose_shows_the_traceback(monkeypatch, capsys):
    def failing_main():
        raise ConfigError("lr = 'fast' is not a number")

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert console.run_recipe_main(failing_main) == 1
    assert capsys.readouterr().err.startswith("kdtune: error: lr = 'fast' is not a number\n")
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with pytest.raises(ConfigError):
        console.run_recipe_main(failing_main)


def test_a_collective_timeout_is_explained_after_the_group_is_gone(monkeypatch):
    """The recipe tears its process group down before the error reaches run_context: the note
    naming collective_timeout_minutes must not depend on the group still being up."""
    from kdtune.training import process_group

    monkeypatch.setattr(process_group, "_started_group", True)
    monkeypatch.setattr(process_group, "_timeout_minutes", 0.1)
    assert not process_group.is_distributed()
    error = RuntimeError("[gloo] Timed out waiting 6000ms for recv operation to complete")
    process_group.explain_timeout(error)
    assert any("collective_timeout_minutes = 0.1" in note for note in error.__notes__)
    other = RuntimeError("shape mismatch")
    process_group.explain_timeout(other)
    assert not getattr(other, "__notes__", [])


def test_exit_recipe_skips_the_teardown_only_after_a_torn_down_group(monkeypatch, tmp_path):
    """One process: a normal ``sys.exit``. A torchrun worker whose group was destroyed:
    ``os._exit`` with the same status, after flushing what it printed (checked in a child
    process, as the teardown it skips is the interpreter's)."""
    from kdtune.training import process_group

    monkeypatch.setattr(process_group, "_started_group", False)
    with pytest.raises(SystemExit) as exited:
        console.exit_recipe(3)
    assert exited.value.code == 3
    script = (
        "import atexit, sys\n"
        "from kdtune.training import console, process_group\n"
        "process_group._started_group = True  # as after init_distributed + teardown\n"
        "atexit.register(lambda: print('interpreter teardown ran'))\n"
        "print('written before exit', end='')\n"
        "console.exit_recipe(5)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "written before exit"
