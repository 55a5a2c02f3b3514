"""The real-size configs: their models, built on the meta device, fit together.

No weights are downloaded or loaded: each model is built on ``torch.device("meta")`` and its
vocabulary and size compared with the other model, the tokenizer family's largest id (from
torchtune's own special-token tables) and the loss options.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from config_helpers import check_models, loss_chunks
from omegaconf import OmegaConf
from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS
from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

from kdtune.training.config.errors import ConfigError
from kdtune.training.config.nodes import is_fused_loss
from kdtune.training.config.rules import check_config
from kdtune.training.model_facts import describe_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
REAL_SIZE_NAMES = (
    "llama3_2/8B_to_1B_lora",
    "llama3_2/8B_to_1B_on_policy_lora",
    "llama3_2/8B_to_1B_full",
    "llama3_2/3B_to_1B_full",
    "qwen2_5/7B_to_1_5B_lora",
)
REAL_CONFIGS = [CONFIG_DIR / f"{name}.yaml" for name in REAL_SIZE_NAMES]

# Largest id each tokenizer family produces for text (Llama 3's <|image|> = 128256 excluded).
MAX_TOKEN_ID = {
    "llama3_tokenizer": max(v for k, v in LLAMA3_SPECIAL_TOKENS.items() if k != "<|image|>"),
    "qwen2_5_tokenizer": max(QWEN2_5_SPECIAL_TOKENS.values()),
}


def test_the_real_size_configs_exist():
    missing = [path for path in REAL_CONFIGS if not path.is_file()]
    assert not missing


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: p.parent.name + "/" + p.stem)
def test_real_config_models_agree_on_the_meta_device(path):
    cfg = OmegaConf.load(path)
    student = describe_model(cfg.model)
    teacher = describe_model(cfg.teacher_model)
    assert teacher.num_params > 2 * student.num_params

    tokenizer_family = str(cfg.tokenizer._component_).rsplit(".", 1)[-1]
    max_token_id = MAX_TOKEN_ID[tokenizer_family]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "teacher smaller than student" warning either
        check_models(cfg, student, teacher, max_token_id)

    columns = cfg.kd_loss.get("vocab_columns")
    if student.vocab_size == teacher.vocab_size:
        assert columns is None
    else:  # Qwen2.5: truncation to the smaller vocabulary, above every token id
        assert columns == min(student.vocab_size, teacher.vocab_size) > max_token_id
        cfg.kd_loss.vocab_columns = None
        with pytest.raises(ConfigError, match=f"{teacher.vocab_size}.*{student.vocab_size}"):
            check_models(cfg, student, teacher, max_token_id)

    if not is_fused_loss(cfg.kd_loss):
        assert loss_chunks(cfg.loss) == loss_chunks(cfg.kd_loss)


def test_qwen_vocabularies_are_the_documented_ones():
    cfg = OmegaConf.load(CONFIG_DIR / "qwen2_5" / "7B_to_1_5B_lora.yaml")
    assert describe_model(cfg.teacher_model).vocab_size == 152_064
    assert describe_model(cfg.model).vocab_size == 151_936


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: p.parent.name + "/" + p.stem)
def test_real_config_fails_only_on_missing_downloads(path):
    """Keys, values and losses are valid; only the absent checkpoints/tokenizer are reported."""
    cfg = OmegaConf.load(path)
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    problems = [line for line in str(error.value).splitlines() if line.startswith("  - ")]
    assert problems
    for line in problems:
        assert "does not exist" in line or "not found" in line, line
