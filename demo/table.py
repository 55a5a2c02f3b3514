"""The quality table: markdown text of per-model metrics, one seed or the mean over seeds."""

from __future__ import annotations

import math
import statistics

# (metric key, column header); arrows say which direction is better
COLUMNS: tuple[tuple[str, str], ...] = (
    ("ce", "CE (nats) ↓"),
    ("ppl", "PPL ↓"),
    ("teacher_kl", "KL to teacher ↓"),
    ("true_kl", "true KL ↓"),
    ("top1", "top-1 acc ↑"),
    ("sample_true_ll", "own samples: true LL/token ↑"),
    ("sample_reverse_kl", "own samples: seq. reverse KL ↓"),
    ("sample_valid", "own samples: valid ↑"),
)

Rows = dict[str, dict[str, float]]


def _cell(value: float, spread: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) < 5e-4:  # e.g. -4e-17 from rounding in a KL that is exactly 0
        value = 0.0
    text = f"{value:.3f}"
    return text if spread is None else f"{text} ± {spread:.3f}"


def markdown_table(rows: Rows, labels: dict[str, str] | None = None) -> str:
    """A markdown table, one row per model (in ``rows`` order), the columns of :data:`COLUMNS`."""
    labels = labels or {}
    header = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [header, rule]
    for name, metrics in rows.items():
        cells = " | ".join(_cell(metrics.get(key, math.nan)) for key, _ in COLUMNS)
        lines.append(f"| {labels.get(name, name)} | {cells} |")
    return "\n".join(lines)


def mean_rows(per_seed: list[Rows]) -> tuple[Rows, Rows]:
    """Mean and (sample) standard deviation over seeds of every row and metric."""
    means: Rows = {}
    spreads: Rows = {}
    for name in per_seed[0]:
        means[name], spreads[name] = {}, {}
        for key, _ in COLUMNS:
            values = [rows[name][key] for rows in per_seed]
            if any(v is None or math.isnan(v) for v in values):  # a metric that does not apply
                means[name][key] = spreads[name][key] = math.nan
                continue
            means[name][key] = statistics.fmean(values)
            spreads[name][key] = statistics.stdev(values) if len(values) > 1 else 0.0
    return means, spreads


def markdown_mean_table(per_seed: list[Rows], labels: dict[str, str] | None = None) -> str:
    """Like :func:`markdown_table` with ``mean ± std`` cells over the seeds."""
    labels = labels or {}
    means, spreads = mean_rows(per_seed)
    header = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [header, rule]
    for name, metrics in means.items():
        cells = " | ".join(
            _cell(metrics[key], spreads[name][key] if len(per_seed) > 1 else None)
            for key, _ in COLUMNS
        )
        lines.append(f"| {labels.get(name, name)} | {cells} |")
    return "\n".join(lines)


def json_safe(value):
    """``value`` with every NaN float (a metric that does not apply) replaced by None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def wins(per_seed: list[Rows], better: str, worse: str, metrics: tuple[str, ...]) -> int:
    """In how many seeds ``better`` is strictly lower than ``worse`` on every one of ``metrics``."""
    return sum(all(rows[better][m] < rows[worse][m] for m in metrics) for rows in per_seed)
