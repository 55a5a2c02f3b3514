"""Checkpoints you can bet a day on: durable saves, lineage, fallback, torn metrics, disk full,
and non-finite weights refused on load.

Unit tests drive :func:`save_checkpoint_folder` with a small weight writer; the end-to-end tests
run the real recipe (tiny models, CPU) on copies of one 8-step run that saved steps 2, 4, 6, 8.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.checkpoint import resume, save
from kdtune.training.checkpoint.layout import (
    MANIFEST_FILENAME,
    TRAINING_STATE_FILENAME,
    CheckpointError,
    CheckpointSaveError,
    complete_checkpoints,
    latest_checkpoint,
    read_manifest,
    step_dirname,
)
from kdtune.training.checkpoint.resume import read_resume_state, resolve_resume
from kdtune.training.checkpoint.save import prune_checkpoints, save_checkpoint_folder
from kdtune.training.metrics import MetricsWriter, read_metrics
from kdtune.training.runtime import NonFiniteWeightsError

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------------------------
# Helpers: a small checkpoint writer, and the real recipe on tiny models
# --------------------------------------------------------------------------------------------


def write_small_weights(step_folder: Path) -> None:
    """A weights writer like the HF one: a safetensors file and a subfolder with a file."""
    save_file({"w": torch.arange(6.0)}, step_folder / "model.safetensors")
    (step_folder / "model").mkdir()
    (step_folder / "model" / "config.json").write_text("{}")


def small_state(tag: str) -> dict:
    """A training state with the keys a resumable one has; ``tag`` tells saves apart."""
    return {"optimizer": {}, "dataloader": {}, "rng": [], "run": {}, "progress": {"tag": tag}}


def save_small(output_dir: Path, step: int, run_id: str, parent: Path | None = None) -> Path:
    """Save step ``step`` of run ``run_id`` (resumed from ``parent``, or fresh)."""
    lineage = {"run_id": run_id, "parent": resume.new_run_lineage(parent)["parent"]}
    return save_checkpoint_folder(
        output_dir, step, write_small_weights, small_state(f"{run_id}:{step}"), lineage
    )


def tag_of(folder: Path) -> str:
    return resume.load_training_state(folder)["progress"]["tag"]


def step_folder(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / step_dirname(step)


def weights_path(folder: Path) -> str:
    """The tiny student's one weight shard in a recipe checkpoint, relative to ``folder``."""
    [shard] = folder.rglob("model-00001-of-00001.safetensors")
    return shard.relative_to(folder).as_posix()


def run_recipe(assets, output_dir: Path, *overrides: str) -> None:
    """The KD recipe (tiny/full_chunked) end to end in this process: setup, train, cleanup."""
    cfg = OmegaConf.merge(
        OmegaConf.load(CONFIG_DIR / "tiny/full_chunked.yaml"),
        OmegaConf.from_dotlist(
            [
                f"assets_dir={assets.root}",
                f"output_dir={output_dir}",
                "validate_every_n_steps=null",
                "scan_dataset=false",
                *overrides,
            ]
        ),
    )
    assert isinstance(cfg, DictConfig)
    recipe = KDRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()


@pytest.fixture(scope="module")
def eight_steps(tiny_assets, tmp_path_factory) -> Path:
    """Run A: 8 steps, a checkpoint every 2 (steps 2, 4, 6 and the final 8). Copy, never write."""
    threads = torch.get_num_threads()
    debug_mode = torch.get_deterministic_debug_mode()
    torch.set_num_threads(1)
    output_dir = tmp_path_factory.mktemp("run_a") / "out"
    try:
        run_recipe(tiny_assets, output_dir, "save_every_n_steps=2")
    finally:
        torch.set_num_threads(threads)
        torch.set_deterministic_debug_mode(debug_mode)
    return output_dir


@pytest.fixture
def run_a(eight_steps, tmp_path) -> Path:
    """A private copy of run A's output folder."""
    return Path(shutil.copytree(eight_steps, tmp_path / "out"))


def setup_steps(output_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(output_dir, kind="setup")]


# --------------------------------------------------------------------------------------------
# 1. Durability
# --------------------------------------------------------------------------------------------


def test_every_file_and_folder_is_fsynced_before_the_rename_into_place(tmp_path, monkeypatch):
    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}"), ""))
        real_fsync(descriptor)

    def replace(source, target) -> None:
        events.append(("replace", str(Path(source).resolve()), str(Path(target).resolve())))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    root = (tmp_path / "checkpoints").resolve()
    final = save_small(tmp_path, 3, "run")

    staging = root / f".staging_{final.name}"
    move = events.index(("replace", str(staging), str(final.resolve())))
    synced = [path for kind, path, _ in events[:move] if kind == "fsync"]
    written = {staging / path.relative_to(final) for path in final.rglob("*")}
    assert len(written) == 5  # weights, model/, model/config.json, training state, manifest
    manifest = staging / MANIFEST_FILENAME
    assert {str(path) for path in written - {manifest}} <= set(synced)
    # The manifest is fsynced as its temporary file, then the folder with its final name.
    manifest_in = events.index(("replace", str(staging / f".{manifest.name}.tmp"), str(manifest)))
    assert str(staging / f".{manifest.name}.tmp") in synced
    assert ("fsync", str(staging), "") in events[manifest_in:move]
    assert ("fsync", str(root), "") in events[move + 1 :]  # the rename itself made durable


def test_saving_a_step_again_puts_the_new_folder_in_place_before_the_old_one_goes(
    tmp_path, monkeypatch
):
    old = save_small(tmp_path, 4, "first")
    real_rmtree = shutil.rmtree
    deleted: list[str] = []

    def rmtree(path, *args, **kwargs) -> None:
        deleted.append(Path(path).name)
        if Path(path).name == f".aside_{old.name}":
            # The old folder goes only once the new one is complete in its place.
            assert read_manifest(old)["run_id"] == "second"
            assert tag_of(old) == "second:4"
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    new = save_small(tmp_path, 4, "second")
    assert new == old and f".aside_{old.name}" in deleted
    assert old.name not in deleted
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [old.name]


@pytest.mark.parametrize("killed", ["before the new folder moved in", "after it moved in"])
def test_a_save_killed_between_its_renames_leaves_a_loadable_checkpoint(tmp_path, killed):
    """The folders a kill leaves during a second save of step 4 (old one set aside)."""
    save_small(tmp_path, 2, "a")
    step_4 = save_small(tmp_path, 4, "a")
    root = tmp_path / "checkpoints"
    aside = root / f".aside_{step_4.name}"
    os.replace(step_4, aside)
    staging = root / f".staging_{step_4.name}"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    expected = "a:4"
    if killed == "after it moved in":
        save_small(tmp_path / "elsewhere", 4, "b")
        os.replace(step_folder(tmp_path / "elsewhere", 4), step_4)
        expected = "b:4"
    else:  # the aside folder stands in for step 4 until the next launch moves it back
        assert complete_checkpoints(tmp_path)[-1] == aside

    folder, state, _ = read_resume_state(tmp_path, True, is_main=True)
    assert folder == step_4 and state["progress"]["tag"] == expected
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000004"]


# --------------------------------------------------------------------------------------------
# 2. Lineage
# --------------------------------------------------------------------------------------------


def test_true_resumes_the_branch_saved_last_and_pruning_keeps_it(tmp_path):
    for step in (2, 4, 6, 8):
        save_small(tmp_path, step, "a")
    with pytest.warns(UserWarning, match="step_0000006, .*step_0000008") as warned:
        folder, _ = resolve_resume(tmp_path, str(step_folder(tmp_path, 4)))
    assert "abandons" in str(warned[0].message) and folder == step_folder(tmp_path, 4)
    save_small(tmp_path, 6, "b", parent=folder)  # run b resumed from step 4, saved 6

    folder, state = resolve_resume(tmp_path, True)
    assert folder == step_folder(tmp_path, 6) and state["progress"]["tag"] == "b:6"
    assert latest_checkpoint(tmp_path) == folder
    assert [p.name for p in prune_checkpoints(tmp_path, keep_last=1)] == [
        "step_0000002",
        "step_0000004",
        "step_0000008",  # the abandoned branch's step 8 goes, not b's step 6
    ]


def test_fallback_stays_on_the_branch_trained_last(tmp_path):
    """Run b resumed a's step 4 and saved 6 and 8; with b's 8 and 6 unusable, `true` falls
    back to a's step 4 (b's parent), never to a's abandoned 8; pruning keeps b's branch."""
    for step in (2, 4, 6, 8, 10):
        save_small(tmp_path, step, "a")
    save_small(tmp_path, 6, "b", parent=step_folder(tmp_path, 4))
    save_small(tmp_path, 8, "b", parent=step_folder(tmp_path, 4))
    for step in (6, 8):
        (step_folder(tmp_path, step) / "model.safetensors").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="falling back") as warned:
        folder, state = resolve_resume(tmp_path, True)
    assert folder == step_folder(tmp_path, 4) and state["progress"]["tag"] == "a:4"
    assert "step_0000008" in str(warned[0].message) and "step_0000010" not in str(warned[0].message)
    assert [p.name for p in prune_checkpoints(tmp_path, keep_last=2)] == [
        "step_0000002",
        "step_0000010",
    ]


def test_pruning_never_removes_the_checkpoint_true_resumes_from(tmp_path):
    save_small(tmp_path, 2, "a")
    newest = save_small(tmp_path, 4, "a")
    (newest / "model.safetensors").write_bytes(b"torn")  # unusable: true resumes step 2
    assert prune_checkpoints(tmp_path, keep_last=1) == []
    with pytest.warns(UserWarning, match="falling back"):
        folder, _ = resolve_resume(tmp_path, True)
    assert folder == step_folder(tmp_path, 2)


def test_manifests_without_lineage_resume_as_one_branch_by_step(tmp_path):
    for step in (6, 2, 4):  # saved out of order: without lineage only the step counts
        folder = save_small(tmp_path, step, "old")
        manifest = read_manifest(folder)
        for key in ("run_id", "parent", "save_seq", "saved_at", "file_sizes"):
            del manifest[key]
        (folder / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    folder, state = resolve_resume(tmp_path, True)
    assert folder == step_folder(tmp_path, 6) and state["progress"]["tag"] == "old:6"
    save_small(tmp_path, 4, "new")  # a lineage-aware run resumed from step 2 saves step 4
    assert resolve_resume(tmp_path, True)[0] == step_folder(tmp_path, 4)


def test_true_continues_the_branch_of_an_explicit_earlier_resume(tiny_assets, run_a):
    """Run B resumes run A's step 4 and stops after step 6; `true` then resumes B's step 6."""
    step_4 = step_folder(run_a, 4)
    run_a_id = read_manifest(step_4)["run_id"]
    with pytest.warns(UserWarning, match=r"abandons .*step_0000006, .*step_0000008"):
        run_recipe(tiny_assets, run_a, "save_every_n_steps=2", "stop_after_steps=6",
                   f"resume_from_checkpoint={step_4}")  # fmt: skip
    step_6 = read_manifest(step_folder(run_a, 6))
    assert step_6["run_id"] != run_a_id
    assert step_6["parent"] == {
        "folder": str(step_4.resolve()),
        "run_id": run_a_id,
        "step": 4,
        "save_seq": 2,
    }
    assert read_manifest(step_folder(run_a, 8))["run_id"] == run_a_id  # A's step 8 is still there

    run_recipe(tiny_assets, run_a, "resume_from_checkpoint=true", "stop_after_steps=7")
    assert setup_steps(run_a) == [0, 4, 6]  # A, B from step 4, C from B's step 6 (not A's 8)
    assert read_manifest(step_folder(run_a, 7))["parent"]["run_id"] == step_6["run_id"]


# --------------------------------------------------------------------------------------------
# 3. Fallback past a corrupt or incomplete newest checkpoint
# --------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    """Same size, other bytes: only loading the file can tell."""
    path.write_bytes(bytes(path.stat().st_size))


CORRUPTIONS = {
    "state truncated": (lambda f: truncate(f / TRAINING_STATE_FILENAME), "training_state.pt has"),
    "state garbled": (lambda f: garble(f / TRAINING_STATE_FILENAME), "does not load"),
    "weights missing": (lambda f: (f / weights_path(f)).unlink(), "{weights} is missing"),
    "weights truncated": (lambda f: truncate(f / weights_path(f)), "{weights} has"),
    "manifest not JSON": (lambda f: truncate(f / MANIFEST_FILENAME), "is not valid JSON"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(run_a, corruption):
    damage, problem = CORRUPTIONS[corruption]
    newest, previous = step_folder(run_a, 8), step_folder(run_a, 6)
    problem = problem.format(weights=weights_path(newest))
    damage(newest)
    with pytest.warns(UserWarning) as warned:
        folder, _, _ = read_resume_state(run_a, True, is_main=True)
    assert folder == previous
    message = str(warned[0].message)
    assert str(newest) in message and problem in message and str(previous) in message

    with pytest.raises(CheckpointError, match=problem) as raised:  # an explicit path: an error
        read_resume_state(run_a, str(newest), is_main=True)
    assert str(newest) in str(raised.value)


def test_legacy_checkpoint_with_a_truncated_weight_file_is_caught_without_sizes(run_a):
    newest = step_folder(run_a, 8)
    manifest = read_manifest(newest)
    del manifest["file_sizes"]
    (newest / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    weights = weights_path(newest)
    truncate(newest / weights)
    with pytest.raises(CheckpointError, match=f"{weights} is not a readable safetensors file"):
        resolve_resume(run_a, str(newest))


def test_resume_falls_back_past_a_truncated_state_and_a_torn_metrics_line(tiny_assets, run_a):
    truncate(step_folder(run_a, 8) / TRAINING_STATE_FILENAME)
    with (run_a / "metrics.jsonl").open("a") as file:
        file.write('{"kind": "train", "step": 9, "lo')  # killed mid-line
    with pytest.warns(UserWarning) as warned:
        run_recipe(tiny_assets, run_a, "resume_from_checkpoint=true")
    messages = [str(w.message) for w in warned]
    assert any(
        "falling back to the previous checkpoint" in m and "step_0000006" in m for m in messages
    )
    assert any("torn last line" in m for m in messages)
    assert setup_steps(run_a) == [0, 6]
    assert [r["step"] for r in read_metrics(run_a, kind="train")] == list(range(1, 9))
    assert resume.load_checked_training_state(step_folder(run_a, 8))  # saved again, whole


# --------------------------------------------------------------------------------------------
# 4. metrics.jsonl with a torn last line
# --------------------------------------------------------------------------------------------


def test_torn_last_metrics_line_is_dropped_and_an_earlier_bad_line_named(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3):
        writer.write({"kind": "train", "step": step})
    with writer.path.open("a") as file:
        file.write('{"kind": "tr')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with pytest.warns(UserWarning, match="torn last line"):
        writer.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    writer.path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{writer.path} line 2 is not JSON"):
        writer.truncate_after(3)


# --------------------------------------------------------------------------------------------
# 5. Disk full, and other write errors
# --------------------------------------------------------------------------------------------


def test_disk_full_while_saving_is_reported_and_staging_cleaned(tiny_assets, tmp_path, monkeypatch):
    from torchtune.training.checkpointing import _checkpointer

    real_save_file, calls = _checkpointer.save_file, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint, step 4
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(_checkpointer, "save_file", full_disk)
    output_dir = tmp_path / "out"
    with pytest.raises(CheckpointSaveError) as raised:
        run_recipe(tiny_assets, output_dir, "max_steps_per_epoch=4", "save_every_n_steps=2")
    root = output_dir / "checkpoints"
    assert str(raised.value).startswith(
        f"disk full while writing checkpoint step_0000004 under {root}; earlier checkpoints are "
        "intact; free space and resume"
    )
    assert raised.value.errno == errno.ENOSPC
    assert [p.name for p in root.iterdir()] == ["step_0000002"]
    folder, _, _ = read_resume_state(output_dir, True, is_main=True)
    assert folder == step_folder(output_dir, 2)


def test_a_stream_error_on_a_full_disk_and_other_os_errors(tmp_path, monkeypatch):
    def stream_error(payload, path):  # what torch.save raises when the disk fills
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(save, "_torch_save_atomic", stream_error)
    monkeypatch.setattr(save, "_free_bytes", lambda folder: 4096)
    with pytest.raises(
        CheckpointSaveError, match=r"^disk full while writing checkpoint step_0000001"
    ):
        save_small(tmp_path, 1, "a")

    def io_error(payload, path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(save, "_torch_save_atomic", io_error)
    monkeypatch.setattr(save, "_free_bytes", lambda folder: 2**40)
    with pytest.raises(
        CheckpointSaveError, match=r"could not write checkpoint step_0000001 .*Input/"
    ):
        save_small(tmp_path, 1, "a")
    with pytest.raises(RuntimeError, match="basic_ios"):  # plenty of space: not a disk problem
        monkeypatch.setattr(save, "_torch_save_atomic", stream_error)
        save_small(tmp_path, 1, "a")
    assert list((tmp_path / "checkpoints").iterdir()) == []


# --------------------------------------------------------------------------------------------
# Killed during a save, with the real recipe
# --------------------------------------------------------------------------------------------


def test_a_kill_while_resaving_a_step_keeps_the_old_checkpoint(tiny_assets, run_a, monkeypatch):
    """Run B resumes step 2 and is killed while writing its step 4 over A's: A's stays."""
    real_write = save.write_hf_weights

    def killed(*args, **kwargs) -> None:  # the weights half-written, then the process dies
        real_write(*args, **kwargs)
        [staging] = (run_a / "checkpoints").glob(".staging_*")
        next(staging.rglob("*.safetensors")).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(save, "write_hf_weights", killed)
    step_4 = step_folder(run_a, 4)
    before = read_manifest(step_4)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="abandons"):
        run_recipe(tiny_assets, run_a, "save_every_n_steps=2",
                   f"resume_from_checkpoint={step_folder(run_a, 2)}")  # fmt: skip
    assert read_manifest(step_4) == before
    assert resume.load_checked_training_state(step_4)
    assert not list((run_a / "checkpoints").glob(".staging_*"))


def test_an_aside_folder_left_by_a_kill_is_resumed_and_replaced(tiny_assets, run_a):
    """Killed after setting A's step 8 aside: the next run resumes it and saves step 8 again."""
    step_8 = step_folder(run_a, 8)
    os.replace(step_8, run_a / "checkpoints" / f".aside_{step_8.name}")
    run_recipe(tiny_assets, run_a, "resume_from_checkpoint=true")
    assert setup_steps(run_a) == [0, 8]
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == [
        step_dirname(step) for step in (2, 4, 6, 8)
    ]
    assert read_manifest(step_8)["save_seq"] == 5
    assert resume.load_checked_training_state(step_8)


# --------------------------------------------------------------------------------------------
# 6. Non-finite weights are refused on load
# --------------------------------------------------------------------------------------------


def poison(weights_file: Path, name: str) -> None:
    """Set one value of tensor ``name`` to NaN (same file size)."""
    tensors = load_file(weights_file)
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, weights_file, metadata={"format": "pt"})


@pytest.mark.parametrize("source", ["student", "teacher", "resumed"])
def test_non_finite_weights_are_an_error_naming_tensor_and_source(
    source, tiny_assets, run_a, tmp_path
):
    overrides = []
    if source == "resumed":
        folder = step_folder(run_a, 8)
        weights_file, output_dir = folder / weights_path(folder), run_a
        overrides.append(f"resume_from_checkpoint={folder}")
    else:
        folder = Path(shutil.copytree(getattr(tiny_assets, f"{source}_dir"), tmp_path / source))
        weights_file, output_dir = folder / "model.safetensors", tmp_path / "fresh"
        key = "checkpointer" if source == "student" else "teacher_checkpointer"
        overrides.append(f"{key}.checkpoint_dir={folder}")
    poison(weights_file, "model.norm.weight")  # torchtune's "norm.scale"
    if source == "resumed":
        # A changed file no longer matches the hash written at save: refused as such first.
        with pytest.raises(CheckpointError, match="does not match the SHA-256"):
            run_recipe(tiny_assets, output_dir, *overrides)
        # A checkpoint without hashes (an older kdtune's) reaches the weights check.
        manifest = read_manifest(folder)
        del manifest["file_sha256"]
        (folder / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    with pytest.raises(NonFiniteWeightsError) as raised:
        run_recipe(tiny_assets, output_dir, *overrides)
    message = str(raised.value)
    assert re.match(r"tensor 'norm.scale' \(\d+,\) holds 1 NaN and 0 inf values", message)
    assert f"loaded from {folder}:" in message
    if source == "resumed":  # refused before the run started: no setup record of its own
        assert setup_steps(output_dir) == [0]
    else:
        assert not (output_dir / "metrics.jsonl").exists()
