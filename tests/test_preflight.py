"""The preflight's figures and rules (:mod:`kdtune.training.preflight`); its refusals of bad
inputs are the table of ``tests/test_bad_inputs.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from kdtune.training.config.errors import Problems
from kdtune.training.metrics import SETUP_FIELDS, read_metrics
from kdtune.training.model_facts import describe_model
from kdtune.training.preflight import check_run

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


@pytest.fixture(scope="module")
def small_data(tiny_assets, tmp_path_factory) -> Path:
    """24 training and 8 validation records of the tiny data."""
    folder = tmp_path_factory.mktemp("small_data")
    train = json.loads(tiny_assets.train_data.read_text())[:24]
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "val.json").write_text(json.dumps(json.loads(tiny_assets.val_data.read_text())[:8]))
    return folder


def tiny_config(assets, data: Path, out: Path, *overrides: str) -> DictConfig:
    cfg = OmegaConf.load(CONFIG_DIR / "tiny" / "full_chunked.yaml")
    cfg.assets_dir, cfg.output_dir = str(assets.root), str(out)
    cfg.dataset.data_files = str(data / "train.json")
    cfg.validation_dataset.data_files = str(data / "val.json")
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    assert isinstance(merged, DictConfig)
    return merged


def test_recipe_records_the_scan_and_trains_on_exactly_its_target_tokens(
    tiny_assets, small_data, tmp_path, kdtune_run
):
    """The scan's target tokens are the tokens the losses count: one unshuffled epoch of all 24
    samples sums the train records' num_tokens to the scan's figure; the validation pass over
    its 8 samples counts the validation scan's. The setup record keeps its fields."""
    out = tmp_path / "out"
    cfg = tiny_config(
        tiny_assets,
        small_data,
        out,
        "batch_size=4",
        "max_steps_per_epoch=null",
        "shuffle=false",
        "validate_every_n_steps=null",
        "validation_max_batches=null",
    )
    OmegaConf.save(cfg, tmp_path / "run.yaml")
    kdtune_run(str(tmp_path / "run.yaml"), [])
    scans = {record["dataset"]: record for record in read_metrics(out, "data")}
    assert set(scans) == {"dataset", "validation_dataset"}
    train, val = scans["dataset"], scans["validation_dataset"]
    assert train["num_samples"] == 24 and val["num_samples"] == 8
    assert train["step"] == 0 and train["source"] == str(small_data / "train.json")
    assert train["student_context"] == 512 and train["teacher_context"] == 512
    steps = read_metrics(out, "train")
    assert len(steps) == 6
    assert sum(step["num_tokens"] for step in steps) == train["target_tokens"] > 0
    assert read_metrics(out, "val")[-1]["num_tokens"] == val["target_tokens"] > 0
    assert 0 < train["longest_sample"] <= cfg.tokenizer.max_seq_len
    assert train["truncated_samples"] <= train["num_samples"]
    (setup,) = read_metrics(out, "setup")
    assert tuple(setup) == SETUP_FIELDS


def _prompt_only(small_data: Path, tmp_path: Path) -> Path:
    records = json.loads((small_data / "train.json").read_text())
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{**r, "output": ""} for r in records]))
    return path


@pytest.mark.parametrize("on_policy", [None, "{fraction: 1.0, max_new_tokens: 4}"])
def test_samples_without_targets_are_valid_only_when_every_step_is_on_policy(
    on_policy, tiny_assets, small_data, tmp_path
):
    """Prompt-only records cut to 8 tokens carry no target: an error for off-policy training
    (it would train on nothing), valid when every step samples its own answer."""
    overrides = [
        "tokenizer.max_seq_len=8",
        "validation_dataset=null",
        "validate_every_n_steps=null",
    ]
    if on_policy is not None:
        overrides.append(f"on_policy={on_policy}")
    cfg = tiny_config(tiny_assets, small_data, tmp_path / "out", *overrides)
    cfg.dataset.data_files = str(_prompt_only(small_data, tmp_path))
    report = check_run(cfg, show_progress=False)
    (scan,) = report.scans
    assert scan.target_tokens == 0 and scan.samples_without_target == 24
    messages = [problem.message for problem in report.problems.errors]
    if on_policy is None:
        assert len(messages) == 1 and "tokenizer.max_seq_len = 8" in messages[0], messages
    else:
        assert messages == []


def test_scan_dataset_false_builds_no_dataset(tiny_assets, small_data, tmp_path):
    """``scan_dataset: false``: no scan, so a record without the columns goes unnoticed here
    (the run then fails at its first step); true: the same data is refused."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q"}] * 4))
    for scan, expected in ((False, 0), (True, 1)):
        cfg = tiny_config(tiny_assets, small_data, tmp_path / "out", f"scan_dataset={scan}")
        cfg.dataset.data_files = str(bad)
        report = check_run(cfg, show_progress=False)
        assert len(report.problems.errors) == expected
        assert len(report.scans) == (2 if scan else 0)


def test_a_packed_dataset_is_scanned_sample_by_sample(tiny_assets, small_data, tmp_path):
    cfg = tiny_config(tiny_assets, small_data, tmp_path / "out", "dataset.packed=true")
    report = check_run(cfg, show_progress=False)
    assert not report.problems.errors
    assert report.scans[0].num_samples == 24  # samples, not packs


def test_problems_block_their_key_its_parents_and_children():
    problems = Problems()
    problems.error("bad lr", "optimizer.lr")
    problems.error("no key")
    assert problems.blocks("optimizer") and problems.blocks("optimizer.lr")
    assert problems.blocks("optimizer.lr.x") and not problems.blocks("optimizer.betas")
    assert not problems.blocks("optimizer_x") and not problems.blocks("lr_scheduler")
    problems.error("bad node", "dataset")
    assert problems.blocks("dataset.data_files") and problems.blocks("dataset[1]")
    expected = "3 config problem(s) here:\n  - bad lr\n  - no key\n  - bad node"
    assert problems.text("here") == expected


# Published Hugging Face config.json values of the real models the shipped configs build.
PUBLISHED = {
    "torchtune.models.llama3_1.llama3_1_8b": dict(
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_size=4096,
        intermediate_size=14336,
        head_dim=128,
        vocab_size=128256,
    ),
    "torchtune.models.llama3_2.llama3_2_1b": dict(
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_size=2048,
        intermediate_size=8192,
        head_dim=64,
        vocab_size=128256,
    ),
    "torchtune.models.qwen2_5.qwen2_5_1_5b_instruct": dict(
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        hidden_size=1536,
        intermediate_size=8960,
        head_dim=128,
        vocab_size=151936,
    ),
}


@pytest.mark.parametrize("component", sorted(PUBLISHED))
def test_meta_architecture_matches_the_published_config_json(component):
    facts = describe_model(OmegaConf.create({"_component_": component}))
    assert facts.architecture == PUBLISHED[component]
