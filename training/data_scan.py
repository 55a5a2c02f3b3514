"""The data phase of the preflight: every sample of a dataset node tokenized once, and judged.

:func:`scan_dataset` builds a node with the run's tokenizer and counts samples, target tokens,
samples cut at ``tokenizer.max_seq_len``, samples without a target and the longest sample
(:class:`DataScan`, also logged to ``metrics.jsonl``); :func:`judge_scan` turns those figures
into problems and warnings that name the config key, the file and the records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from tqdm import tqdm

from kdtune.training.config.errors import ConfigError, Problems
from kdtune.training.data import build_dataset_node, data_source
from kdtune.training.on_policy import OnPolicySettings, check_answers

DATA_RECORD_KIND = "data"
"""``metrics.jsonl`` kind of a dataset scan's figures (one record per scanned dataset node)."""


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
    without_target: list[int] = field(default_factory=list, repr=False)  # their indices

    def record(self, step: int) -> dict[str, Any]:
        """The ``metrics.jsonl`` record (kind :data:`DATA_RECORD_KIND`; the indices left out)."""
        figures = asdict(self)
        del figures["without_target"]
        return {"kind": DATA_RECORD_KIND, "step": step, **figures}

    def summary(self) -> str:
        return (
            f"{self.dataset}: {self.num_samples:,} samples, {self.target_tokens:,} target "
            f"tokens, {self.truncated_samples} cut at tokenizer.max_seq_len, "
            f"{self.samples_without_target} without a target, longest {self.longest_sample} "
            f"tokens (context {self.student_context})"
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
        if targets == 0:
            scan.samples_without_target += 1
            scan.without_target.append(index)
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


def judge_scan(
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
        dropped = key != "validation_dataset" and cfg.drop_samples_without_target
        outcome = (
            "they are left out of training (drop_samples_without_target: false keeps them); "
            "raise tokenizer.max_seq_len to train on their answers"
            if dropped
            else "they add nothing to the loss"
        )
        problems.warn(
            f"{key}: {scan.samples_without_target} of {scan.num_samples} samples have no target "
            f"token{cut}: {outcome}"
        )
