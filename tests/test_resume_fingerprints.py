"""Resume checks what it resumes (:mod:`kdtune.training.checkpoint.fingerprints`): a changed
data file, config key or LoRA base checkpoint is refused, naming each difference and the key
that accepts it; a checkpoint's weights file replaced by another of the same size is caught by
the hashes written at save (fallback to the previous checkpoint, as for a corrupt one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.checkpoint import fingerprints
from kdtune.training.checkpoint.layout import (
    CheckpointError,
    latest_checkpoint,
    read_manifest,
    step_dirname,
)
from kdtune.training.checkpoint.resume import read_resume_state
from kdtune.training.config.schema import doc

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


def tiny_cfg(assets_root: Path, data: Path, out: Path, *overrides: str, name="full_chunked"):
    cfg = OmegaConf.merge(
        OmegaConf.load(CONFIG_DIR / "tiny" / f"{name}.yaml"),
        OmegaConf.from_dotlist(
            [
                f"assets_dir={assets_root}",
                f"output_dir={out}",
                f"dataset.data_files={data}",
                "validate_every_n_steps=null",
                "scan_dataset=false",
                "max_steps_per_epoch=3",
                *overrides,
            ]
        ),
    )
    assert isinstance(cfg, DictConfig)
    return cfg


def run(cfg: DictConfig) -> None:
    recipe = KDRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()


@pytest.fixture(scope="module")
def stopped(tiny_assets, tmp_path_factory) -> tuple[Path, Path]:
    """A run on its own copy of the data, stopped after step 2 (checkpoints at steps 1, 2)."""
    folder = tmp_path_factory.mktemp("fingerprints")
    data = folder / "train.json"
    shutil.copy(tiny_assets.root / "data" / "train.json", data)
    out = folder / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tiny_cfg(tiny_assets.root, data, out, "save_every_n_steps=1", "stop_after_steps=2"))
    finally:
        torch.set_num_threads(threads)
    return data, out


@pytest.fixture
def copy(stopped, tmp_path) -> tuple[Path, Path]:
    """A copy of the stopped run and its data to change."""
    data, out = stopped
    shutil.copy(data, tmp_path / "train.json")
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "train.json", tmp_path / "out"


def test_the_manifest_records_inputs_and_file_hashes(stopped):
    data, out = stopped
    manifest = read_manifest(latest_checkpoint(out))
    recorded = manifest["fingerprints"]
    assert recorded["data"]["data_files"]["file"] == str(data)
    assert recorded["config"]["kd_ratio"] == 0.5 and "student_base" not in recorded  # full
    for name, digest in manifest["file_sha256"].items():
        path = latest_checkpoint(out) / name
        assert digest == fingerprints.hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_data_file_is_refused_and_the_allow_key_lets_it_through(copy, tiny_assets):
    data, out = copy
    records = json.loads(data.read_text())
    records[5]["output"] = "a different answer"
    data.write_text(json.dumps(records))
    resume = ("resume_from_checkpoint=true",)
    cfg = tiny_cfg(tiny_assets.root, data, out, *resume)
    with pytest.raises(CheckpointError) as raised:
        KDRecipe(cfg).setup(cfg)
    message = str(raised.value)
    assert f"data.data_files: {data} has other content" in message
    assert "resume_allow_changes=[data]" in message

    run(tiny_cfg(tiny_assets.root, data, out, *resume, "resume_allow_changes=[data]"))
    assert read_manifest(latest_checkpoint(out))["step"] == 3


def test_a_changed_math_key_is_refused_naming_old_and_new_values(copy, tiny_assets):
    data, out = copy
    cfg = tiny_cfg(tiny_assets.root, data, out, "resume_from_checkpoint=true", "kd_ratio=0.7")
    with pytest.raises(CheckpointError) as raised:
        read_resume_state(out, True, is_main=True, cfg=cfg)
    message = str(raised.value)
    assert "kd_ratio: 0.5 in the checkpoint, 0.7 now" in message
    assert "resume_allow_changes=[kd_ratio]" in message and "data" not in message
    cfg.resume_allow_changes = ["kd_ratoi"]
    with pytest.raises(CheckpointError, match="unknown name"):
        read_resume_state(out, True, is_main=True, cfg=cfg)


def test_a_weights_file_swapped_for_one_of_the_same_size_falls_back(copy, tiny_assets):
    """step_2's weights replaced by step_1's (same size, valid header): the cheap checks pass,
    the hash written at save does not; resume falls back to step_1 with a warning naming the
    file, and an explicit step_2 is refused."""
    data, out = copy
    step_1, step_2 = (out / "checkpoints" / step_dirname(s) for s in (1, 2))
    [weights] = (step_2 / "model").glob("*.safetensors")
    replacement = step_1 / "model" / weights.name
    assert replacement.stat().st_size == weights.stat().st_size
    assert replacement.read_bytes() != weights.read_bytes()
    shutil.copy(replacement, weights)
    cfg = tiny_cfg(tiny_assets.root, data, out, "resume_from_checkpoint=true")
    with pytest.warns(UserWarning) as warned:
        folder, _, _ = read_resume_state(out, True, is_main=True, cfg=cfg)
    assert folder == step_1
    text = str(warned[0].message)
    assert str(step_2) in text and f"model/{weights.name} does not match the SHA-256" in text
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        read_resume_state(out, str(step_2), is_main=True, cfg=cfg)


def test_a_changed_lora_base_checkpoint_is_named(tiny_assets, tmp_path):
    """The recorded base weights of a LoRA student against a base folder with one byte
    changed (same size)."""
    base = Path(shutil.copytree(tiny_assets.root / "student", tmp_path / "student"))
    data = tiny_assets.root / "data" / "train.json"
    cfg = tiny_cfg(tiny_assets.root, data, tmp_path / "out", name="lora_chunked")
    cfg.checkpointer.checkpoint_dir = str(base)
    saved = fingerprints.record(cfg, is_lora=True)
    [weights] = base.glob("*.safetensors")
    content = bytearray(weights.read_bytes())
    content[-1] ^= 1
    weights.write_bytes(bytes(content))
    with pytest.raises(CheckpointError) as raised:
        fingerprints.check(tmp_path, {"fingerprints": saved}, cfg)
    message = str(raised.value)
    assert f"student_base.{weights.name}: {weights} has other content" in message
    assert "resume_allow_changes=[student_base]" in message
    cfg.resume_allow_changes = ["student_base"]
    fingerprints.check(tmp_path, {"fingerprints": saved}, cfg)


def test_the_allow_key_doc_names_every_accepted_name():
    text = doc(fingerprints.ALLOW_KEY)
    assert all(name in text for name in (*fingerprints.GROUPS, *fingerprints.MATH_KEYS))


def test_a_checkpoint_without_fingerprints_resumes_with_a_warning(copy, tiny_assets):
    data, out = copy
    folder = latest_checkpoint(out)
    manifest = read_manifest(folder)
    del manifest["fingerprints"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_cfg(tiny_assets.root, data, out, "resume_from_checkpoint=true", "kd_ratio=0.7")
    with pytest.warns(UserWarning, match="records no fingerprints"):
        found, _, _ = read_resume_state(out, True, is_main=True, cfg=cfg)
    assert found == folder
