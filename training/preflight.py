"""Preflight: every check of a KD run that needs no weights, before any weights load.

One code path for the recipe (:func:`preflight`, called in ``setup`` before a model is built)
and ``kdtune validate`` (:func:`check_run`, which lists every problem of every phase at once)::

    config        keys, values, components built with their real options (losses, optimizer,
                  scheduler), LoRA settings, files named (config_checks.config_problems)
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig
from torchtune import config, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from tqdm import tqdm

from kdtune.teacher_cache import source as teacher_cache
from kdtune.training.config_checks import (
    HF_ARCHITECTURE_FIELDS,
    ConfigError,
    ModelFacts,
    Problems,
    config_problems,
    describe_model,
    model_problems,
    tokenizer_max_id,
)
from kdtune.training.data import build_dataset_node, data_source, steps_per_epoch
from kdtune.training.metrics import MetricsWriter
from kdtune.training.on_policy import OnPolicySettings, check_answers, on_policy_settings

log = utils.get_logger("INFO")

DATA_RECORD_KIND = "data"
"""``metrics.jsonl`` kind of a dataset scan's figures (one record per scanned dataset node)."""

PREFLIGHT = "before loading any weights"
"""The phase named by the preflight's error message."""

_SHOWN_RECORDS = 3  # record indices named per kind of bad record


@dataclass
class DataScan:
    """Figures of one dataset node, tokenized as the run tokenizes it (``tokens``/``labels``
    lists of each sample; a target is a label the shifted loss counts, ``labels[1:] !=
    ignore``)."""

    dataset: str  # the config key: dataset, dataset[1], validation_dataset
    source: str  # its file(s), or its Hub source
    num_samples: int = 0
    target_tokens: int = 0
    truncated_samples: int = 0  # reach tokenizer.max_seq_len (cut there)
    samples_without_target: int = 0
    longest_sample: int = 0
    longest_sample_index: int = -1
    student_context: int | None = None
    teacher_context: int | None = None

    def record(self, step: int) -> dict[str, Any]:
        """The ``metrics.jsonl`` record (kind :data:`DATA_RECORD_KIND`)."""
        return {"kind": DATA_RECORD_KIND, "step": step, **asdict(self)}

    def summary(self) -> str:
        return (
            f"{self.dataset}: {self.num_samples:,} samples, {self.target_tokens:,} target "
            f"tokens, {self.truncated_samples} cut at tokenizer.max_seq_len, "
            f"{self.samples_without_target} without a target, longest {self.longest_sample} "
            f"tokens (context {self.student_context})"
        )


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
    cfg = config_problems(cfg, problems)
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
) -> tuple[Any, Any]:
    """The recipe's preflight: :func:`check_run`, raising every problem at once. Every process
    of a multi-process run runs it (the same data, the same verdict: no rank waits for another
    that failed); the main one shows the scan's progress bar, issues the warnings, and logs
    each dataset's figures in one line and to ``metrics`` (kind ``"data"``, at the step the
    run starts from: ``resumed``'s).

    Returns:
        ``(tokenizer, teacher_cache)``: the tokenizer built from ``cfg.tokenizer`` and the
        opened, checked ``teacher_cache`` (None without one), for the recipe to use as they are.

    Raises:
        ConfigError: every problem, one per line, each naming key (file, record) and fix.
    """
    report = check_run(cfg, show_progress=is_main)
    report.problems.raise_if_any(PREFLIGHT)
    if not is_main:
        return report.tokenizer, report.cache
    for message in report.problems.warnings:
        warnings.warn(message, stacklevel=2)
    step = int((resumed or {}).get("progress", {}).get("global_step", 0))
    for scan in report.scans:
        if metrics is not None:
            metrics.write(scan.record(step))
    if report.scans:
        log.info("Data scan: " + "; ".join(scan.summary() for scan in report.scans))
    return report.tokenizer, report.cache


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
    try:
        return describe_model(node)
    except Exception as error:
        problems.error(
            f"{key}: {node.get('_component_')} cannot be built with its options: "
            f"{type(error).__name__}: {error}",
            key,
        )
        return None


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
        _judge(cfg, key, scan, context, problems, may_lack_targets=prompt_only)
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


def scan_dataset(
    key: str,
    node: DictConfig,
    tokenizer: Any,
    problems: Problems,
    *,
    show_progress: bool,
    on_policy: OnPolicySettings | None = None,
) -> DataScan | None:
    """Build ``node`` (unpacked: a packed node's samples) and tokenize each sample once.

    Records that cannot be read (a missing column, a value the transform rejects) are
    problems naming the record index, the file and the key; None when the data cannot be
    loaded at all. With ``on_policy`` (some steps off-policy) every record needs an answer.
    """
    if node.get("packed", False):
        node = node.copy()
        node.packed = False
    try:
        dataset = build_dataset_node(key, node, tokenizer)
    except ConfigError as error:
        problems.error(str(error), key)
        return None
    if on_policy is not None:
        try:
            check_answers(dataset, on_policy, key=key)
        except ValueError as error:
            problems.error(str(error), "on_policy")
    scan = DataScan(dataset=key, source=data_source(node))
    max_len = getattr(tokenizer, "max_seq_len", None)
    bad: dict[str, list[int]] = {}
    for index in tqdm(
        range(len(dataset)),
        desc=f"scanning {key}",
        disable=not show_progress,
        dynamic_ncols=True,
        leave=False,
    ):
        try:
            sample = dataset[index]
        except Exception as error:
            bad.setdefault(_record_problem(key, dataset, error), []).append(index)
            continue
        tokens, labels = sample["tokens"], sample["labels"]
        targets = sum(1 for label in labels[1:] if label != CROSS_ENTROPY_IGNORE_IDX)
        scan.num_samples += 1
        scan.target_tokens += targets
        scan.samples_without_target += targets == 0
        scan.truncated_samples += max_len is not None and len(tokens) >= max_len
        if len(tokens) > scan.longest_sample:
            scan.longest_sample, scan.longest_sample_index = len(tokens), index
    for problem, indices in bad.items():
        shown = ", ".join(str(i) for i in indices[:_SHOWN_RECORDS])
        more = f" and {len(indices) - _SHOWN_RECORDS} more" if len(indices) > _SHOWN_RECORDS else ""
        problems.error(
            f"{key}: record {shown}{more} of {scan.source} (0-based): {problem}", f"{key}.records"
        )
    return scan


def _record_problem(key: str, dataset: Any, error: Exception) -> str:
    """What is wrong with one record, and the fix (the record's index is added by the caller)."""
    if isinstance(error, KeyError):
        columns = getattr(getattr(dataset, "_data", None), "column_names", None)
        column = error.args[0] if error.args else error
        return (
            f"no column {column!r} (the data has {columns}): rename the column in the data, or "
            f"map it with {key}.column_map (e.g. column_map: {{{column}: <your column>}})"
        )
    return f"cannot be tokenized: {type(error).__name__}: {error}"


def _judge(
    cfg: DictConfig,
    key: str,
    scan: DataScan,
    context: int | None,
    problems: Problems,
    *,
    may_lack_targets: bool,
) -> None:
    """Problems of a scanned dataset: samples longer than the context, no target at all."""
    max_len = cfg.tokenizer.get("max_seq_len")
    if context is not None and scan.longest_sample > context:
        problems.error(
            f"{key}: record {scan.longest_sample_index} of {scan.source} is "
            f"{scan.longest_sample} tokens, longer than the models' context ({context} "
            f"positions; tokenizer.max_seq_len = {max_len}): set tokenizer.max_seq_len: "
            f"{context} (or less) to cut long samples",
            "tokenizer.max_seq_len",
        )
    if may_lack_targets or scan.num_samples == 0:
        return
    cut = (
        f"; {scan.truncated_samples} reach tokenizer.max_seq_len = {max_len}, which cuts the "
        "answers off"
        if scan.truncated_samples
        else ""
    )
    if scan.target_tokens == 0:
        outcome = (
            "validation would measure nothing"
            if key == "validation_dataset"
            else ("the run would train on nothing")
        )
        problems.error(
            f"{key}: no sample of {scan.source} has a target token ({scan.num_samples} "
            f"samples{cut}): {outcome} (loss 0.0). Raise "
            "tokenizer.max_seq_len above the prompts' length, or check the answers and "
            f"{key}.train_on_input / {key}.column_map",
            "tokenizer.max_seq_len",
        )
    elif scan.samples_without_target:
        problems.warn(
            f"{key}: {scan.samples_without_target} of {scan.num_samples} samples have no target "
            f"token{cut}: they add nothing to the loss"
        )
