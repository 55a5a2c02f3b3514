"""Test-only entry points into the checks (kept out of the package: the recipe and
``kdtune validate`` go through :mod:`kdtune.training.preflight`)."""

from __future__ import annotations

import warnings

from omegaconf import DictConfig

from kdtune.training.config.errors import Problems
from kdtune.training.config.nodes import component_options, is_fused_loss
from kdtune.training.model_facts import ModelFacts
from kdtune.training.preflight import model_problems


def loss_chunks(node: DictConfig) -> int:
    """Number of chunks of a chunked loss (``num_output_chunks``) or the fused loss (``num_chunks``)."""
    options = component_options(node)
    return int(options["num_chunks"] if is_fused_loss(node) else options["num_output_chunks"])


def check_models(
    cfg: DictConfig,
    student: ModelFacts,
    teacher: ModelFacts | None,
    max_token_id: int | None,
) -> list[str]:
    """Phase 2: vocabularies of student, teacher and tokenizer agree; the teacher is the larger.

    Args:
        cfg: the recipe config (reads ``kd_loss.vocab_columns``).
        student: facts of the student model.
        teacher: facts of the teacher model, or None (CE-only).
        max_token_id: the tokenizer's largest id (None: not checked).

    Returns:
        Warnings (also issued with :func:`warnings.warn`).

    Raises:
        ConfigError: on a vocabulary mismatch, naming both sizes and the fix.
    """
    problems = Problems()
    model_problems(cfg, student, teacher, max_token_id, problems)
    problems.raise_if_any("in the model vocabularies")
    for message in problems.warnings:
        warnings.warn(message, stacklevel=2)
    return problems.warnings


def check_config_and_models(cfg: DictConfig) -> list[str]:
    """Everything ``kdtune validate`` and the recipe check before loading weights, except the
    dataset scan: the config, the tokenizer, the models on the meta device against each other
    and against their checkpoints' ``config.json`` (:func:`kdtune.training.preflight.check_run`).
    Returns the warnings (also issued); raises :class:`ConfigError` listing every problem."""
    from kdtune.training.preflight import PREFLIGHT, check_run

    report = check_run(cfg, scan_data=False)
    report.problems.raise_if_any(PREFLIGHT)
    for message in report.problems.warnings:
        warnings.warn(message, stacklevel=2)
    return report.problems.warnings
