"""Config checks: each bad config fails before any model is built, naming the key and the fix."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from config_helpers import check_config_and_models, check_models
from omegaconf import DictConfig, OmegaConf
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

from kdtune.cli.main import main as kdtune_main
from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.config.errors import ConfigError
from kdtune.training.config.rules import check_config
from kdtune.training.config.schema import FIELDS, is_required, markdown_table, with_defaults
from kdtune.training.model_facts import ModelFacts, describe_model, tokenizer_max_id

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def restored_deterministic_mode():
    """Building a KDRecipe sets torch's deterministic debug mode; restore it afterwards."""
    debug_mode = torch.get_deterministic_debug_mode()
    yield
    torch.set_deterministic_debug_mode(debug_mode)


TINY_CONFIGS = sorted((CONFIG_DIR / "tiny").glob("*.yaml"))


def tiny_config(assets, tmp_path: Path, *overrides: str, name: str = "full_chunked") -> DictConfig:
    cfg = OmegaConf.load(CONFIG_DIR / "tiny" / f"{name}.yaml")
    dotlist = [f"assets_dir={assets.root}", f"output_dir={tmp_path / 'out'}", *overrides]
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    assert isinstance(merged, DictConfig)
    return merged


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.stem)
def test_tiny_configs_pass(path, tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path, name=path.stem)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config(cfg)  # raises on any problem


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_sets_exactly_the_recipe_keys(path):
    """Shipped configs spell out every key (none left to a default), and none is unknown."""
    cfg = OmegaConf.load(path)
    referenced = {"assets_dir"}  # used only through ${assets_dir} interpolation
    assert set(cfg) - referenced == set(FIELDS)


# (override, words the message must contain)
BAD_VALUES = [
    (["kd_ratio=1.5"], ["kd_ratio", "1.5", "[0, 1]"]),
    (["kd_ratio=-0.1"], ["kd_ratio", "-0.1"]),
    (["kd_loss.temperature=0.0"], ["kd_loss.temperature", "0.0", "> 0"]),
    (["kd_loss.temperature=-2"], ["kd_loss.temperature", "-2"]),
    (["dtype=fp16"], ["dtype", "fp16", "bf16"]),
    (
        ["kd_loss.num_output_chunks=8"],
        ["kd_loss.num_output_chunks = 8", "loss.num_output_chunks = 4"],
    ),
    (["kd_loss.ignore_index=0"], ["kd_loss.ignore_index", "loss.ignore_index"]),
    (["kd_loss.reduction=sum"], ["kd_loss.reduction", "'sum'", "mean"]),
    (["kd_ratioo=0.3"], ["unknown key 'kd_ratioo'", "did you mean 'kd_ratio'"]),
    (["kd_loss.temprature=2.0"], ["kd_loss.temprature", "did you mean 'temperature'"]),
    (["optimizer.weight_decy=0.1"], ["optimizer.weight_decy", "did you mean 'weight_decay'"]),
    # values only the component itself can judge: reported by building it before the models
    (["optimizer.lr=fast"], ["optimizer: torch.optim.AdamW rejects its options"]),
    (["optimizer.weight_decay=-1.0"], ["optimizer:", "weight_decay"]),
    (["kd_loss.topk_mode=sparse"], ["kd_loss.topk_mode", "'sparse'"]),
    (["lr_scheduler.num_warmup_steps=abc"], ["lr_scheduler:", "rejects its options"]),
    (["batch_size=0"], ["batch_size", "0", ">= 1"]),
    (["gradient_accumulation_steps=two"], ["gradient_accumulation_steps", "'two'"]),
    (["teacher_quantization=int4"], ["teacher_quantization", "int4", "int8_weight_only"]),
    (
        ["checkpointer.checkpoint_files=[missing.safetensors]"],
        ["checkpointer.checkpoint_files", "missing.safetensors"],
    ),
    (
        ["teacher_checkpointer.checkpoint_dir=/nonexistent/teacher"],
        ["teacher_checkpointer.checkpoint_dir", "/nonexistent/teacher"],
    ),
    (
        ["tokenizer.path=/nonexistent/tokenizer.model"],
        ["tokenizer.path", "/nonexistent/tokenizer.model"],
    ),
    (
        ["dataset.data_files=/nonexistent/train.json"],
        ["dataset.data_files", "/nonexistent/train.json"],
    ),
    (["teacher_model=null"], ["teacher_model is null", "teacher_checkpointer"]),
    (["teacher_model=null", "teacher_checkpointer=null"], ["kd_ratio = 0.5", "kd_ratio: 0.0"]),
    (["kd_loss=null"], ["kd_loss is null", "kdtune.losses"]),
    (["loss=null"], ["loss is null", "CEWithChunkedOutputLoss"]),
    (["resume_from_checkpoint=3"], ["resume_from_checkpoint", "3"]),
    (["validation_dataset.packed=true"], ["validation_dataset.packed", "packed: false"]),
]


def _apply(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    for override in overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(
            cfg, key, OmegaConf.from_dotlist([f"x={value}"]).x, force_add=True, merge=False
        )
    return cfg


@pytest.mark.parametrize("overrides,words", BAD_VALUES, ids=lambda v: str(v)[:40])
def test_bad_value_is_a_config_error_naming_it(overrides, words, tiny_assets, tmp_path):
    cfg = _apply(tiny_config(tiny_assets, tmp_path), overrides)
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_loss_without_num_tokens_or_ignore_index_is_refused(tiny_assets, tmp_path):
    """A mean that cannot be rescaled to the step's token count is refused."""
    cfg = tiny_config(tiny_assets, tmp_path)
    cfg.loss = OmegaConf.create({"_component_": "torch.nn.MSELoss"})
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert "loss._component_" in str(error.value) and "num_tokens" in str(error.value)


def test_fused_loss_with_a_separate_ce_loss_is_refused(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path, name="full_fused")
    cfg.loss = OmegaConf.create({"_component_": "kdtune.losses.chunked.CEWithChunkedOutputLoss"})
    with pytest.raises(ConfigError, match="set loss: null"):
        check_config(cfg)


def test_several_problems_are_reported_together(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path, "kd_ratio=2.0", "dtype=fp16", "batch_size=-1")
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert "3 config problem(s)" in str(error.value)


def test_missing_required_key_names_it(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path)
    del cfg["batch_size"]
    with pytest.raises(ConfigError, match="missing key 'batch_size'"):
        check_config(cfg)


def test_missing_optional_keys_take_their_documented_defaults(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path)
    optional = [name for name in FIELDS if not is_required(name)]
    for name in optional:
        del cfg[name]
    check_config(cfg)  # raises on a problem
    filled = with_defaults(cfg)
    assert set(filled) - {"assets_dir"} == set(FIELDS)
    assert "clip_grad_norm" not in cfg  # the input is left alone
    assert filled.clip_grad_norm is None and filled.kd_ratio == 0.5
    assert filled.gradient_accumulation_steps == 1 and filled.fsdp_reshard_after_forward is True


def test_every_problem_is_reported_at_once(tiny_assets, tmp_path):
    """Schema problems (type, range, choice, missing) and component problems, one error."""
    cfg = tiny_config(
        tiny_assets, tmp_path, "seed=-1", "shuffle=3", "device=tpu", "kd_loss.temprature=2.0"
    )
    del cfg["epochs"]
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    message = str(error.value)
    assert "5 config problem(s)" in message
    for words in ("seed = -1", "shuffle = 3", "device = 'tpu'", "missing key 'epochs'"):
        assert words in message, words
    assert "did you mean 'temperature'" in message


def test_check_config_leaves_its_input_alone(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path)
    OmegaConf.update(cfg, "teacher_model._component_", None, merge=True)
    before = OmegaConf.to_yaml(cfg)
    with pytest.raises(ConfigError, match="teacher_model is null"):
        check_config(cfg)
    assert OmegaConf.to_yaml(cfg) == before


def test_readme_key_table_is_the_schema():
    """The key table of docs/configs.md is the schema's, exactly."""
    page = (CONFIG_DIR.parent / "docs" / "configs.md").read_text()
    assert markdown_table() in page, (
        "docs/configs.md's key table differs from the schema; regenerate it with "
        "`python -m kdtune.training.config.schema` and paste the output under '## Keys'"
    )


def test_config_error_comes_before_any_model_is_built(tiny_assets, tmp_path, monkeypatch, capsys):
    """Through ``tune run``: the recipe fails in its constructor, with a short message naming
    the key (exit status 1); no output is written."""
    from torchtune._cli.tune import main as tune_main

    built = []
    monkeypatch.setattr("kdtune.training.runtime.build_model", lambda *a: built.append(a))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    argv = [
        "tune",
        "run",
        "kdtune/recipes/knowledge_distillation.py",
        "--config",
        str(CONFIG_DIR / "tiny" / "full_chunked.yaml"),
        f"assets_dir={tiny_assets.root}",
        f"output_dir={tmp_path / 'out'}",
        "kd_ratio=1.5",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:  # a short message, no traceback
        tune_main()
    assert exit_info.value.code == 1
    assert re.search(r"kd_ratio = 1\.5", capsys.readouterr().err)
    assert not built and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Phase 2: vocabularies and sizes


def test_vocab_mismatch_names_both_sizes(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path)
    with pytest.raises(ConfigError) as error:
        check_models(cfg, ModelFacts(151_936, 10), ModelFacts(152_064, 20), max_token_id=151_664)
    message = str(error.value)
    assert "152064" in message and "151936" in message and "vocab_columns: 151936" in message


def test_truncation_allowed_when_the_tokenizer_stays_below_it(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path, "kd_loss.vocab_columns=151936")
    assert (
        check_models(cfg, ModelFacts(151_936, 10), ModelFacts(152_064, 20), max_token_id=151_664)
        == []
    )


def test_truncation_refused_when_the_tokenizer_reaches_beyond_it(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path, "kd_loss.vocab_columns=500")
    with pytest.raises(ConfigError) as error:
        check_models(cfg, ModelFacts(500, 10), ModelFacts(512, 20), max_token_id=508)
    assert "vocab_columns = 500" in str(error.value) and "508" in str(error.value)


def test_truncation_beyond_the_smaller_vocab_is_refused(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path, "kd_loss.vocab_columns=512")
    with pytest.raises(ConfigError, match="exceeds the smaller vocab"):
        check_models(cfg, ModelFacts(500, 10), ModelFacts(512, 20), max_token_id=400)


def test_tokenizer_beyond_the_student_vocab_is_refused(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path)
    with pytest.raises(ConfigError, match="ids up to 600 but the student"):
        check_models(cfg, ModelFacts(512, 10), ModelFacts(512, 20), max_token_id=600)


def test_smaller_teacher_is_a_warning(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path)
    with pytest.warns(UserWarning, match="fewer parameters"):
        found = check_models(cfg, ModelFacts(512, 100), ModelFacts(512, 50), max_token_id=508)
    assert len(found) == 1


def test_recipe_refuses_mismatched_vocab_before_building(tiny_assets, tmp_path, monkeypatch):
    """The student builder asks for 520 rows, the teacher 512: caught on the meta device."""
    cfg = tiny_config(tiny_assets, tmp_path, "model.vocab_size=520")
    built = []
    monkeypatch.setattr(
        "kdtune.recipes.knowledge_distillation.build_model", lambda *a: built.append(a)
    )
    recipe = KDRecipe(cfg)
    with pytest.raises(ConfigError) as error:
        recipe.setup(cfg)
    assert "520" in str(error.value) and "512" in str(error.value) and not built


def test_swapped_teacher_and_student_give_a_warning(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path)
    cfg.model, cfg.teacher_model = cfg.teacher_model, cfg.model
    # with their checkpoints (each config.json must describe its builder's model)
    cfg.checkpointer.checkpoint_dir, cfg.teacher_checkpointer.checkpoint_dir = (
        cfg.teacher_checkpointer.checkpoint_dir,
        cfg.checkpointer.checkpoint_dir,
    )
    with pytest.warns(UserWarning, match="fewer parameters"):
        found = check_config_and_models(cfg)
    assert len(found) == 1


def test_describe_model_builds_nothing_real(tiny_assets):
    facts = describe_model(
        OmegaConf.create({"_component_": "kdtune.assets.models.tiny_teacher", "vocab_size": 512})
    )
    assert facts.vocab_size == 512 and facts.num_params > 0


def test_tokenizer_max_id(tiny_assets):
    tiny = llama3_tokenizer(str(tiny_assets.tokenizer_path), str(tiny_assets.special_tokens_path))
    assert tokenizer_max_id(tiny) == max(
        v for k, v in tiny.special_tokens.items() if k != "<|image|>"
    )
    assert tokenizer_max_id(tiny) < tiny_assets.vocab_size
    # Canonical Llama 3 special tokens: 128255 is the largest text id; <|image|> (128256) is
    # one past the 128,256-row text models and is never produced for text.
    canonical = llama3_tokenizer(str(tiny_assets.tokenizer_path))
    assert tokenizer_max_id(canonical) == 128_255


def test_tokenizer_max_id_of_an_encoder_tokenizer():
    class Qwen:  # shape of torchtune's Qwen2Tokenizer: encoder + special_tokens
        def __init__(self) -> None:
            self.encoder = {"a": 0, "b": 151_642}
            self.special_tokens = QWEN2_5_SPECIAL_TOKENS

    assert tokenizer_max_id(Qwen()) == 151_664


def test_kdtune_validate_reports_ok_and_errors(tiny_assets, tmp_path, capsys):
    common = [
        "--config",
        "tiny/full_chunked",
        f"assets_dir={tiny_assets.root}",
        f"output_dir={tmp_path}",
    ]
    assert kdtune_main(["validate", *common]) == 0
    assert "OK" in capsys.readouterr().out
    assert kdtune_main(["validate", *common, "kd_loss.temperature=0"]) == 1
    err = capsys.readouterr().err
    assert "INVALID" in err and "kd_loss.temperature = 0" in err
    assert kdtune_main(["validate", *common, "model.vocab_size=520"]) == 1
    assert "520" in capsys.readouterr().err
