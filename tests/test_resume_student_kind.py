"""Resuming a LoRA checkpoint with a full-parameter config (or the reverse) is a config error
naming the checkpoint, raised on every rank before any weights load."""

from __future__ import annotations

import pytest

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.config.errors import ConfigError
from kdtune.training.config.loading import load_config, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


def recipe(config: str, tiny_assets, output_dir, *extra: str) -> KDRecipe:
    overrides = [
        f"assets_dir={tiny_assets.root}",
        f"output_dir={output_dir}",
        "epochs=1",
        "max_steps_per_epoch=2",
        "validate_every_n_steps=null",
        *extra,
    ]
    cfg = load_config(resolve_config(config), overrides)
    return KDRecipe(cfg=cfg)


@pytest.mark.parametrize(
    ("trained", "resumed", "words"),
    [
        ("tiny/lora_chunked", "tiny/full_chunked", "holds a LoRA/DoRA student"),
        ("tiny/full_chunked", "tiny/lora_chunked", "holds a full student"),
    ],
)
def test_resume_with_the_other_kind_of_student_is_refused(
    trained, resumed, words, tiny_assets, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    first = recipe(trained, tiny_assets, out)
    first.setup(cfg=first._cfg)
    first.train()
    first.cleanup()
    second = recipe(resumed, tiny_assets, out, "resume_from_checkpoint=true")
    loads = []
    monkeypatch.setattr(
        "kdtune.training.checkpoint.resume.student_start_state",
        lambda *a, **k: loads.append(1),
    )
    with pytest.raises(ConfigError, match=words) as error:
        second.setup(cfg=second._cfg)
    assert "resume_from_checkpoint" in str(error.value) and "step_0000002" in str(error.value)
    assert not loads  # refused before reading any weights


def test_the_console_script_prints_a_checkpoint_error_in_one_line(tiny_assets, tmp_path):
    """In-process callers get the exception (tests/test_recipe_resume.py); the ``kdtune``
    command prints one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    first = recipe("tiny/full_chunked", tiny_assets, out)
    first.setup(cfg=first._cfg)
    first.train()
    first.cleanup()
    script = Path(sys.executable).parent / "kdtune"
    command = [str(script), "run", "knowledge_distillation", "--config", "tiny/full_chunked"]
    overrides = [f"assets_dir={tiny_assets.root}", f"output_dir={out}", "max_steps_per_epoch=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, *overrides], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdtune: error:")]
    assert len(errors) == 1 and "already holds checkpoints" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
