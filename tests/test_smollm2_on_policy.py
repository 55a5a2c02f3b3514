"""On-policy steps with SmolLM2's tokenizer and the shipped smollm2 configs (tiny real-format
folders: a converted tiny GGUF, as tests/test_smollm2.py makes them).

- the tokenizer stops sampling at ``<|im_end|>`` (the end of an assistant turn) and EOS;
- ``kdtune validate`` and the run agree: a text-completion dataset cannot give prompts, an
  error naming ``dataset`` raised before any weight is loaded; an instruct dataset runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_smollm2 import tiny_builder_overrides, write_tiny_gguf
from torchtune.training import FullModelHFCheckpointer

from kdtune.cli.main import main as kdtune_main
from kdtune.smollm2.convert import convert_gguf
from kdtune.smollm2.prune import prune_layers
from kdtune.smollm2.tokenizer import ENDOFTEXT, IM_END, SmolLM2Tokenizer
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.preflight import check_run

WORDS = ["the", "is", "a", "on", "then", "this", "at", "he", "tea"]


def _added_token_ids(folder: Path) -> dict[str, int]:
    """The special tokens' ids as tokenizer.json lists them (read here, not through kdtune)."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    return {token["content"]: token["id"] for token in spec["added_tokens"]}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny SmolLM2-format folder (tokenizer.json, config.json, safetensors)."""
    root = tmp_path_factory.mktemp("smollm2_tiny")
    return convert_gguf(write_tiny_gguf(root / "tiny.Q4_1.gguf"), root / "teacher")


def test_tokenizer_stops_at_the_end_of_a_turn_and_eos(teacher):
    tokenizer = SmolLM2Tokenizer(teacher)
    ids = _added_token_ids(teacher)
    eos = json.loads((teacher / "tokenizer_config.json").read_text())["eos_token"]
    eos = eos["content"] if isinstance(eos, dict) else eos
    assert set(tokenizer.stop_tokens) == {ids[IM_END], ids[eos], ids[ENDOFTEXT]}
    assert len(tokenizer.stop_tokens) == len(set(tokenizer.stop_tokens))


def _real_folder(teacher: Path, tmp_path: Path) -> Path:
    """A ``kdtune_real``-shaped folder: tiny teacher, a 2-layer pruned student, text data and
    instruct data made of the tiny vocabulary's words."""
    root = tmp_path / "real"
    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    text = [{"text": " ".join(rng.choice(WORDS, size=20))} for _ in range(8)]
    for name in ("train", "val"):
        (root / "data" / f"{name}.json").write_text(json.dumps(text))
    instruct = [
        {"input": " ".join(rng.choice(WORDS, size=5)), "output": " ".join(rng.choice(WORDS, 6))}
        for _ in range(8)
    ]
    (root / "data" / "instruct.json").write_text(json.dumps(instruct))
    (root / "teacher").symlink_to(teacher)
    prune_layers(teacher, root / "students" / "prune15", [0, 2])
    return root


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"assets_dir={root}",
        f"output_dir={out}",
        "max_steps_per_epoch=2",
        "dtype=fp32",
        "tokenizer.max_seq_len=48",
        "lr_scheduler.num_warmup_steps=1",
        "validation_dataset=null",
        "on_policy={fraction: 1.0, max_new_tokens: 6, source: student}",
        *tiny_builder_overrides("model", 2),
        *tiny_builder_overrides("teacher_model", 3),
        *extra,
    ]


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Loading a checkpoint fails the test: what is checked here must fail before it."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(FullModelHFCheckpointer, "load_checkpoint", refuse)


@pytest.mark.usefixtures("one_thread_and_restored_torch_globals", "no_weights_loaded")
def test_text_completion_data_is_refused_by_validate_and_run_before_weights(
    teacher, tmp_path, capsys
):
    root = _real_folder(teacher, tmp_path)
    overrides = _overrides(root, tmp_path / "out")
    cfg = load_config(resolve_config("smollm2/135M_prune15_kd"), overrides)
    errors = [p.message for p in check_run(cfg, show_progress=False).problems.errors]
    assert len(errors) == 1 and errors[0].startswith("dataset: on-policy steps"), errors
    assert "TextCompletionDataset" in errors[0] and "instruct_dataset" in errors[0]
    with pytest.raises(SystemExit) as exit_info:
        kdtune_main(
            ["run", "knowledge_distillation", "--config", "smollm2/135M_prune15_kd", *overrides]
        )
    assert exit_info.value.code == 1
    assert errors[0] in capsys.readouterr().err  # the run's error is validate's


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread_and_restored_torch_globals")
def test_shipped_config_runs_on_policy_with_instruct_data(teacher, tmp_path, kdtune_run):
    """validate says OK, and the run samples with SmolLM2's stop tokens and trains."""
    root = _real_folder(teacher, tmp_path)
    out = tmp_path / "out"
    overrides = _overrides(root, out)
    shipped = OmegaConf.load(resolve_config("smollm2/135M_prune15_kd"))
    shipped.dataset = {
        "_component_": "torchtune.datasets.instruct_dataset",
        "source": "json",
        "data_files": str(root / "data" / "instruct.json"),
        "split": "train",
        "train_on_input": False,
        "packed": False,
    }
    path = tmp_path / "instruct_kd.yaml"
    OmegaConf.save(shipped, path)
    assert check_run(load_config(path, overrides), show_progress=False).problems.errors == []
    kdtune_run(str(path), overrides)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(line["loss"]) for line in train)
    assert all(line["generated_tokens"] > 0 for line in train)
