"""Preflight: every check of a KD run that needs no weights, before any weights load.

One code path for the recipe (:func:`preflight`, called in ``setup`` before a model is built)
and ``kdtune validate`` (:func:`check_run`, which lists every problem of every phase at once)::

    config        keys, values, components built with their real options (losses, optimizer,
                  scheduler), LoRA settings, files named (config.rules.config_problems)
    models        student and teacher built on the meta device: vocabularies against each
                  other and the tokenizer; architecture against each checkpoint's config.json;
                  a teacher_cache's manifest against the config
    data          every dataset node built with the run's tokenizer and scanned once (a
                  progress bar): samples, target tokens, samples cut at tokenizer.max_seq_len,
                  samples without a target, the longest sample against the models' context

A phase whose input has a problem already reported is skipped for that input (e.g. no
tokenizer: no data scan), so one run reports everything it can check. Every problem names the
config key (and, for data, the file and the record) and the fix.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig
from torchtune import config, utils

from kdtune.quantization.qat import build_quantizer
from kdtune.teacher_cache import source as teacher_cache
from kdtune.training.config.errors import ConfigError, Problems
from kdtune.training.config.nodes import kd_vocab_columns
from kdtune.training.config.rules import config_problems
from kdtune.training.data import build_dataset_node, steps_per_epoch
from kdtune.training.data_scan import DataScan, judge_scan, scan_dataset
from kdtune.training.generation import check_prompt_dataset, check_prompt_tokenizer
from kdtune.training.metrics import MetricsWriter
from kdtune.training.model_facts import (
    HF_ARCHITECTURE_FIELDS,
    ModelFacts,
    describe_model,
    tokenizer_max_id,
)
from kdtune.training.on_policy import on_policy_settings, sft_dataset

log = utils.get_logger("INFO")


PREFLIGHT = "before loading any weights"
"""The phase named by the preflight's error message."""


@dataclass
class Report:
    """What :func:`check_run` found: every problem and warning, the built tokenizer (None when
    it could not be built) and the data scans."""

    problems: Problems
    tokenizer: Any = None
    student: ModelFacts | None = None
    teacher: ModelFacts | None = None
    scans: list[DataScan] = field(default_factory=list)
    cache: Any = None  # the opened teacher_cache


# --------------------------------------------------------------------------------------------
# Entry points


def check_run(cfg: DictConfig, *, scan_data: bool = True, show_progress: bool = True) -> Report:
    """Every check of the run, nothing raised: all problems are in ``report.problems``.

    Args:
        cfg: the recipe config (left unchanged).
        scan_data: build and scan the datasets (when ``scan_dataset`` is true).
        show_progress: a tqdm bar per scanned dataset.
    """
    problems = Problems()
    checked = config_problems(cfg, problems)
    return _check_after_config(checked, problems, scan_data, show_progress)


def _check_after_config(
    cfg: DictConfig, problems: Problems, scan_data: bool, show_progress: bool
) -> Report:
    """The phases after the config's own (models, checkpoints, cache, tokenizer, data) on the
    checked config (:func:`~kdtune.training.config.rules.config_problems`' copy)."""
    report = Report(problems)
    report.student = _guarded(problems, _describe, cfg, "model", problems)
    if cfg.get("teacher_model") is not None:
        report.teacher = _guarded(problems, _describe, cfg, "teacher_model", problems)
    for key, facts in (("checkpointer", report.student), ("teacher_checkpointer", report.teacher)):
        if facts is not None and not (key == "teacher_checkpointer" and cfg.get("teacher_cache")):
            _guarded(problems, _check_checkpoint_architecture, cfg, key, facts, problems)
    if report.student is not None:
        _check_adapter_only_save(cfg, report.student, problems)
    if cfg.get("teacher_cache") is not None and not problems.blocks("model"):
        report.cache = _guarded(problems, teacher_cache.open_for_training, cfg)
    report.tokenizer = _guarded(problems, _build_tokenizer, cfg, problems)
    if report.tokenizer is None:
        return report
    if not problems.blocks("on_policy") and on_policy_settings(cfg.get("on_policy")) is not None:
        _check_on_policy(cfg, report.tokenizer, problems)
    teacher_ok = report.teacher is not None or cfg.get("teacher_model") is None
    if report.student is not None and teacher_ok:
        max_id = _guarded(problems, tokenizer_max_id, report.tokenizer)
        model_problems(cfg, report.student, report.teacher, max_id, problems)
    if scan_data and cfg.get("scan_dataset", True):
        report.scans = _guarded(problems, _scan_all, cfg, report, show_progress, problems) or []
    return report


def preflight(
    cfg: DictConfig,
    metrics: MetricsWriter | None = None,
    resumed: dict[str, Any] | None = None,
    *,
    is_main: bool = True,
) -> Report:
    """The recipe's preflight: :func:`check_run` after the config phase (the recipe's
    constructor ran it: ``cfg`` is its checked copy), raising every problem at once. Every process
    of a multi-process run runs it (the same data, the same verdict: no rank waits for another
    that failed); the main one shows the scan's progress bar, issues the warnings, and logs
    each dataset's figures in one line and to ``metrics`` (kind ``"data"``, at the step the
    run starts from: ``resumed``'s).

    Returns:
        The report: the tokenizer built from ``cfg.tokenizer`` and the opened, checked
        ``teacher_cache`` (None without one), for the recipe to use as they are, and the scans
        (:func:`samples_left_out` reads the training samples to leave out).

    Raises:
        ConfigError: every problem, one per line, each naming key (file, record) and fix.
    """
    report = _check_after_config(cfg, Problems(), scan_data=True, show_progress=is_main)
    report.problems.raise_if_any(PREFLIGHT)
    if not is_main:
        return report
    for message in report.problems.warnings:
        warnings.warn(message, stacklevel=2)
    step = int((resumed or {}).get("progress", {}).get("global_step", 0))
    for scan in report.scans:
        if metrics is not None:
            metrics.write(scan.record(step))
    if report.scans:
        log.info("Data scan: " + "; ".join(scan.summary() for scan in report.scans))
    return report


def drops_samples_without_target(cfg: DictConfig) -> bool:
    """``drop_samples_without_target``, except for prompt-only on-policy training
    (``on_policy.fraction: 1``), where a sample's prompt is all a step reads."""
    on_policy = on_policy_settings(cfg.get("on_policy"))
    return bool(cfg.drop_samples_without_target) and (on_policy is None or on_policy.fraction < 1)


def samples_left_out(cfg: DictConfig, report: Report) -> list[int] | None:
    """Indices (into the concatenated training data) of the samples without a target, which the
    loader leaves out; None when nothing is left out, so a step may still lack targets
    (``drop_samples_without_target: false``, ``scan_dataset: false``, packed data)."""
    nodes = [node for key, node in _dataset_nodes(cfg) if key != "validation_dataset"]
    scans = [scan for scan in report.scans if scan.dataset != "validation_dataset"]
    packed = any(node.get("packed", False) for node in nodes)
    if not drops_samples_without_target(cfg) or packed or len(scans) != len(nodes) or not scans:
        return None
    left_out, offset = [], 0
    for scan in scans:  # in the order the datasets are concatenated
        left_out += [offset + index for index in scan.without_target]
        offset += scan.num_samples
    return left_out


def _guarded(problems: Problems, check: Any, *args: Any) -> Any:
    """``check(*args)``; a :class:`ConfigError` becomes a problem (None returned). Any other
    error is raised, unless a problem was reported before (it may follow from that one)."""
    reported = len(problems.errors)
    try:
        return check(*args)
    except ConfigError as error:
        problems.error(str(error))
    except Exception:
        if not reported:
            raise
    return None


# --------------------------------------------------------------------------------------------
# Models and checkpoints


def _describe(cfg: DictConfig, key: str, problems: Problems) -> ModelFacts | None:
    """The model of ``cfg[key]`` built on the meta device (no memory, no weights)."""
    node = cfg.get(key)
    if not isinstance(node, DictConfig) or problems.blocks(key):
        return None
    quantizer = None
    if key == "model" and cfg.get("quantizer") is not None and not problems.blocks("quantizer"):
        quantizer = build_quantizer(cfg.quantizer)  # checked in phase 1: builds
    try:
        facts = describe_model(node, quantizer)
    except Exception as error:
        problems.error(
            f"{key}: {node.get('_component_')} cannot be built with its options: "
            f"{type(error).__name__}: {error}",
            key,
        )
        return None
    if facts.quantizer_problem is not None:
        problems.error(facts.quantizer_problem, "quantizer")
    return facts


def _check_checkpoint_architecture(
    cfg: DictConfig, key: str, facts: ModelFacts, problems: Problems
) -> None:
    """The checkpoint's ``config.json`` describes the model the builder makes (layers, heads,
    dimensions, vocabulary): else the weights would not fit (a reshape error after loading)
    or, for a layer count, the exported ``config.json`` would describe another model."""
    node = cfg.get(key)
    if not isinstance(node, DictConfig) or problems.blocks(key):
        return
    path = Path(str(node.checkpoint_dir)) / "config.json"
    if not path.is_file():
        return  # reported by the config phase for a Hugging Face checkpointer
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.error(f"{key}.checkpoint_dir: {path} is not valid JSON ({error})", key)
        return
    if not isinstance(hf_config, dict):
        problems.error(f"{key}.checkpoint_dir: {path} is not a JSON object", key)
        return
    if "num_attention_heads" in hf_config:  # Hugging Face's default for a missing field
        hf_config.setdefault("num_key_value_heads", hf_config["num_attention_heads"])
    model_key = "model" if key == "checkpointer" else "teacher_model"
    differences = [
        f"{name} = {hf_config[name]!r} (the builder: {facts.architecture[name]})"
        for name in HF_ARCHITECTURE_FIELDS
        if name in hf_config and name in facts.architecture
        if hf_config[name] != facts.architecture[name]
    ]
    if differences:
        problems.error(
            f"{key}.checkpoint_dir: {path} does not describe the model that {model_key} builds "
            f"({cfg[model_key]['_component_']}): {'; '.join(differences)}. Point "
            f"{key}.checkpoint_dir at that model's checkpoint, or set {model_key} to the builder "
            "of this checkpoint",
            key,
        )


def _check_adapter_only_save(cfg: DictConfig, student: ModelFacts, problems: Problems) -> None:
    if cfg.save_adapter_weights_only and not student.has_adapters:
        problems.error(
            "save_adapter_weights_only = true needs a LoRA/DoRA student (a lora_* model "
            "builder): set it to false for a full-parameter student",
            "save_adapter_weights_only",
        )


# --------------------------------------------------------------------------------------------
# Tokenizer and data


def _build_tokenizer(cfg: DictConfig, problems: Problems) -> Any:
    node = cfg.get("tokenizer")
    if not isinstance(node, DictConfig) or problems.blocks("tokenizer"):
        return None
    try:
        return config.instantiate(node)
    except Exception as error:
        problems.error(
            f"tokenizer: {node.get('_component_')} cannot be built: {type(error).__name__}: "
            f"{error}",
            "tokenizer",
        )
        return None


def _check_on_policy(cfg: DictConfig, tokenizer: Any, problems: Problems) -> None:
    """On-policy steps read prompts from the training dataset (one torchtune ``SFTDataset``)
    and stop sampling at the tokenizer's stop tokens: checked here, as the run checks them."""
    try:
        check_prompt_tokenizer(tokenizer)
    except ValueError as error:
        problems.error(str(error), "tokenizer")
    if isinstance(cfg.get("dataset"), ListConfig):
        problems.error(
            "dataset: on-policy steps (on_policy.fraction > 0) read prompts from one dataset, "
            "not a list of them: keep one dataset node, or set on_policy: null",
            "on_policy",
        )
        return
    for key, node in _dataset_nodes(cfg):
        if key == "validation_dataset" or problems.blocks(key):
            continue
        try:
            dataset = build_dataset_node(key, node, tokenizer)
        except ConfigError:
            continue  # the data scan reports it
        try:
            check_prompt_dataset(sft_dataset(dataset), key=key)
        except ValueError as error:
            problems.error(str(error), "on_policy")


def _dataset_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    nodes = cfg.get("dataset")
    found = (
        [(f"dataset[{i}]", node) for i, node in enumerate(nodes)]
        if isinstance(nodes, ListConfig)
        else [("dataset", nodes)]
    )
    if cfg.get("validation_dataset") is not None:
        found.append(("validation_dataset", cfg.validation_dataset))
    return [(key, node) for key, node in found if isinstance(node, DictConfig)]


def _scan_all(
    cfg: DictConfig, report: Report, show_progress: bool, problems: Problems
) -> list[DataScan]:
    contexts = [f.max_seq_len for f in (report.student, report.teacher) if f is not None]
    context = min((c for c in contexts if c is not None), default=None)
    on_policy = None if problems.blocks("on_policy") else on_policy_settings(cfg.get("on_policy"))
    scans = []
    for key, node in _dataset_nodes(cfg):
        if problems.blocks(key):
            continue
        train = key != "validation_dataset"
        needs_answers = on_policy if train and on_policy and on_policy.fraction < 1 else None
        scan = scan_dataset(
            key,
            node,
            report.tokenizer,
            problems,
            show_progress=show_progress,
            on_policy=needs_answers,
        )
        if scan is None:
            continue
        scan.student_context = report.student.max_seq_len if report.student else None
        scan.teacher_context = report.teacher.max_seq_len if report.teacher else None
        prompt_only = train and on_policy is not None and on_policy.fraction >= 1
        judge_scan(cfg, key, scan, context, problems, may_lack_targets=prompt_only)
        scans.append(scan)
    _check_training_size(
        cfg, report, [s for s in scans if s.dataset != "validation_dataset"], problems
    )
    return scans


def _check_training_size(
    cfg: DictConfig, report: Report, scans: list[DataScan], problems: Problems
) -> None:
    """At least one optimizer step per epoch (this process count: ``WORLD_SIZE``, as torchrun
    sets it; 1 for ``validate``), and as many samples as the teacher cache holds."""
    nodes = [node for key, node in _dataset_nodes(cfg) if key != "validation_dataset"]
    if len(scans) != len(nodes):
        return  # a training node failed to load: reported
    samples = sum(scan.num_samples for scan in scans)
    if samples == 0:
        return
    try:
        teacher_cache.check_num_samples(report.cache, range(samples))  # only len() is read
    except ConfigError as error:
        problems.error(str(error), "teacher_cache")
    if drops_samples_without_target(cfg):
        samples -= sum(scan.samples_without_target for scan in scans)
        if samples == 0:
            return  # no sample has a target: reported by the scan
    if any(node.get("packed", False) for node in nodes):
        return  # packs, not samples, make the batches
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = math.ceil(samples / world_size)  # the sampler pads to a multiple of the ranks
    try:
        steps_per_epoch(
            per_rank // int(cfg.batch_size),
            int(cfg.batch_size),
            int(cfg.gradient_accumulation_steps),
            cfg.max_steps_per_epoch,
        )
    except ValueError as error:
        problems.error(
            f"{error} ({samples} training samples, {world_size} process(es))", "batch_size"
        )


def model_problems(
    cfg: DictConfig,
    student: ModelFacts,
    teacher: ModelFacts | None,
    max_token_id: int | None,
    problems: Problems,
) -> None:
    """:func:`check_models` into ``problems`` (errors and warnings)."""
    columns = kd_vocab_columns(cfg)
    vocab = "kd_loss.vocab_columns"
    if max_token_id is not None and max_token_id >= student.vocab_size:
        problems.error(
            f"the tokenizer produces ids up to {max_token_id} but the student (model) has "
            f"vocab size {student.vocab_size}: use a student with vocab > {max_token_id} or "
            "the matching tokenizer",
            "model",
        )
    if teacher is None:
        return
    if columns is None and teacher.vocab_size != student.vocab_size:
        smaller = min(teacher.vocab_size, student.vocab_size)
        problems.error(
            f"vocab sizes differ: teacher (teacher_model) {teacher.vocab_size}, student "
            f"(model) {student.vocab_size}. If the extra rows are padding the tokenizer never "
            f"produces, set kd_loss.vocab_columns: {smaller} to compare only the first "
            f"{smaller} logits",
            vocab,
        )
    if columns is not None:
        smaller = min(teacher.vocab_size, student.vocab_size)
        if columns > smaller:
            problems.error(
                f"kd_loss.vocab_columns = {columns} exceeds the smaller vocab (teacher "
                f"{teacher.vocab_size}, student {student.vocab_size}): set it to {smaller}",
                vocab,
            )
        if max_token_id is not None and max_token_id >= columns:
            problems.error(
                f"kd_loss.vocab_columns = {columns} truncates the vocab, but the tokenizer "
                f"produces ids up to {max_token_id} (teacher vocab {teacher.vocab_size}, "
                f"student vocab {student.vocab_size}): truncation would drop real tokens; "
                "use models with matching vocabularies",
                vocab,
            )
    if max_token_id is not None and max_token_id >= teacher.vocab_size:
        problems.error(
            f"the tokenizer produces ids up to {max_token_id} but the teacher (teacher_model) "
            f"has vocab size {teacher.vocab_size}: use the tokenizer both models share",
            "teacher_model",
        )
    if teacher.num_params < student.num_params:
        problems.warn(
            f"teacher_model has fewer parameters ({teacher.num_params:,}) than the student "
            f"model ({student.num_params:,}): check that teacher_model and model are not "
            "swapped"
        )
