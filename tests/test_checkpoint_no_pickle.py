"""``training_state.pt`` holds tensors and plain values only: it is read with
``torch.load(weights_only=True)``, a file that needs full unpickling (a crafted one, or an
older kdtune checkpoint) is refused without running anything, unless the run opts in with
``resume_trust_pickled_state=true``.

Bit-exact resume through the new format is ``tests/test_recipe_resume.py`` (unchanged).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from kdtune.training.checkpoint import resume
from kdtune.training.checkpoint.layout import TRAINING_STATE_FILENAME
from kdtune.training.checkpoint.resume import (
    TRUST_PICKLE_KEY,
    UntrustedCheckpointError,
    read_resume_state,
)
from kdtune.training.checkpoint.save import save_checkpoint_folder


class Payload:
    """Unpickling it creates ``marker`` (as a crafted checkpoint would run any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def small_state(tag: str, **extra) -> dict:
    return {
        "optimizer": {},
        "dataloader": {},
        "rng": [],
        "run": {},
        "progress": {"tag": tag},
        **extra,
    }


def write_weights(folder: Path) -> None:
    save_file({"w": torch.arange(4.0)}, folder / "model.safetensors")


def save(output_dir: Path, step: int, state: dict) -> Path:
    return save_checkpoint_folder(output_dir, step, write_weights, state, {"run_id": "r"})


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    """Capture, save, load with weights_only=True, restore: every generator repeats the draws
    it made right after the capture (the reference)."""
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.normal()  # leaves numpy with a cached gaussian (has_gauss = 1)
    state = resume.capture_rng_state(torch.device("cpu"))
    reference = (torch.rand(5), np.random.rand(5), np.random.normal(), random.random())
    torch.save({"rng": [state]}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["rng"][0]
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    resume.restore_rng_state(loaded, torch.device("cpu"))
    again = (torch.rand(5), np.random.rand(5), np.random.normal(), random.random())
    assert torch.equal(reference[0], again[0])
    assert np.array_equal(reference[1], again[1])
    assert reference[2:] == again[2:]


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    """The newest checkpoint's state carries a payload: resume stops with one line naming the
    file and the opt-in key (no fallback to the older, good checkpoint), and nothing ran."""
    out, marker = tmp_path / "out", tmp_path / "pwned"
    save(out, 2, small_state("good"))
    crafted = save(out, 4, small_state("bad", evil=Payload(marker)))
    assert not marker.exists()
    for target in (True, str(crafted)):
        with pytest.raises(UntrustedCheckpointError) as raised:
            read_resume_state(out, target, is_main=True)
        message = str(raised.value)
        assert str(crafted / TRAINING_STATE_FILENAME) in message
        assert f"{TRUST_PICKLE_KEY}=true" in message
        assert "\n" not in message
        assert not marker.exists()


def test_an_old_pickled_state_loads_only_with_the_opt_in(tmp_path):
    """A state as kdtune wrote it before (numpy's RNG state as numpy objects) is refused by
    default; with the key it loads with a warning and its RNG state restores."""
    out = tmp_path / "out"
    np.random.seed(7)
    old_rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    old_rng["python"] = random.getstate()
    expected = np.random.rand(3)
    folder = save(out, 2, small_state("old", rng=[old_rng]))
    with pytest.raises(UntrustedCheckpointError, match="numpy"):
        read_resume_state(out, True, is_main=True)
    cfg = OmegaConf.create({TRUST_PICKLE_KEY: True})
    with pytest.warns(UserWarning, match=TRUST_PICKLE_KEY):
        found, state, _ = read_resume_state(out, True, is_main=True, cfg=cfg)
    assert found == folder and state["progress"]["tag"] == "old"
    np.random.seed(0)
    resume.restore_rng_state(state["rng"][0], torch.device("cpu"))
    assert np.array_equal(np.random.rand(3), expected)
