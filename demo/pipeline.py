"""``kdtune demo``: a real distillation end to end, then the table that shows it worked.

For each seed: the student (2 layers, random init from the seed) is fine-tuned on the same 128
answers, the same steps and data order, once with CE alone (``demo/student_ce``) and once per
divergence with knowledge distillation from the shipped teacher (``demo/student_kd`` with a
``kd_loss._component_`` override), and once per k in (2, 4, 8) with forward KL from a cache of
the teacher's top-k log-probs (``teacher_cache=...``; built once by ``kdtune cache-teacher``'s
code, no teacher in memory while training). Then every model is scored on 1,000 held-out
answers against the data, the teacher and the true chain (:mod:`kdtune.demo.evaluate`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from kdtune.assets.checkpoints import write_text_atomic
from kdtune.demo.evaluate import evaluate_checkpoints
from kdtune.demo.runner import RunResult, demo_config, recipe_output_to, run_recipe
from kdtune.demo.table import json_safe, markdown_mean_table, markdown_table, wins
from kdtune.demo.workspace import DEFAULT_SPEC, Workspace, prepare_workspace, read_teacher_manifest

CE_CONFIG = "demo/student_ce"
KD_CONFIG = "demo/student_kd"


@dataclass(frozen=True)
class Variant:
    """One student training run: the config, its overrides and the table's label."""

    name: str
    label: str
    config: str
    overrides: tuple[str, ...]


_LOSSES = "kdtune.losses"
CE_ONLY = Variant("ce_only", "student, CE-only fine-tuning", CE_CONFIG, ())
KD_FORWARD = Variant(
    "kd_forward_kl",
    "student, KD forward KL",
    KD_CONFIG,
    (f"kd_loss._component_={_LOSSES}.ForwardKLWithChunkedOutputLoss",),
)
KD_VARIANTS: tuple[Variant, ...] = (
    Variant(
        "kd_reverse_kl",
        "student, KD reverse KL",
        KD_CONFIG,
        (f"kd_loss._component_={_LOSSES}.ReverseKLWithChunkedOutputLoss",),
    ),
    Variant(
        "kd_jsd",
        "student, KD JSD (beta 0.5)",
        KD_CONFIG,
        (f"kd_loss._component_={_LOSSES}.JSDWithChunkedOutputLoss", "kd_loss.beta=0.5"),
    ),
    Variant(
        "kd_skew_kl",
        "student, KD skew KL (alpha 0.1)",
        KD_CONFIG,
        (f"kd_loss._component_={_LOSSES}.SkewForwardKLWithChunkedOutputLoss", "kd_loss.alpha=0.1"),
    ),
)

CACHED_TOP_K = (2, 4, 8)
CACHE_FOLDER = "teacher_cache"


def cached_variant(k: int) -> Variant:
    """Forward-KL KD from the cached top-k teacher log-probs (the folder is in the workspace)."""
    return Variant(
        f"kd_cached_top{k}",
        f"student, KD forward KL from cached top-{k}",
        KD_CONFIG,
        (f"teacher_cache=${{assets_dir}}/{CACHE_FOLDER}/top{k}",),
    )


CACHED_VARIANTS: tuple[Variant, ...] = tuple(cached_variant(k) for k in CACHED_TOP_K)

LABELS: dict[str, str] = {
    "before": "student, before training",
    **{v.name: v.label for v in (CE_ONLY, KD_FORWARD, *CACHED_VARIANTS, *KD_VARIANTS)},
    "teacher": "teacher (shipped)",
    "truth": "true distribution (floor)",
}


def variants(quick: bool, cached: bool = True) -> list[Variant]:
    """CE-only and forward-KL KD always; unless ``quick``, KD from the cached top-k (if
    ``cached``) and the other divergences."""
    if quick:
        return [CE_ONLY, KD_FORWARD]
    return [CE_ONLY, KD_FORWARD, *(CACHED_VARIANTS if cached else ()), *KD_VARIANTS]


def build_teacher_caches(ws: Workspace, plan: list[Variant], extra: list[str]) -> None:
    """Cache the teacher's top-k over the training answers for each cached variant of ``plan``.

    The same code as ``kdtune cache-teacher --config demo/student_kd --top_k k``; a complete
    cache from an earlier demo run with the same settings is kept (its shards verified).
    """
    from kdtune.teacher_cache.build import BuildOptions, build_teacher_cache

    for k, variant in zip(CACHED_TOP_K, CACHED_VARIANTS):
        if variant not in plan:
            continue
        cfg = demo_config(variant.config, run_overrides(ws, 0, variant, extra))
        started = time.perf_counter()
        with recipe_output_to(ws.root / CACHE_FOLDER / f"top{k}.log"):
            manifest = build_teacher_cache(cfg, BuildOptions(top_k=k, batch_size=64))
        _say(
            f"[setup] cached the teacher's top-{k} log-probs: {manifest['num_positions']} "
            f"answer tokens, {manifest['bytes_per_token']:.0f} bytes/token, "
            f"{time.perf_counter() - started:.1f} s"
        )


def cached_vs_online(per_seed: list[dict[str, dict]]) -> dict[int, list[float]]:
    """Per k, each seed's held-out true KL of the cached-top-k student / the online KD one."""
    return {
        k: [rows[v.name]["true_kl"] / rows[KD_FORWARD.name]["true_kl"] for rows in per_seed]
        for k, v in zip(CACHED_TOP_K, CACHED_VARIANTS)
        if v.name in per_seed[0]
    }


def run_overrides(ws: Workspace, seed: int, variant: Variant, extra: list[str]) -> list[str]:
    """Where the run reads and writes for ``seed``, the variant's overrides, then the user's."""
    return [
        f"assets_dir={ws.root}",
        f"output_dir={ws.run_dir(seed, variant.name)}",
        f"seed={seed}",
        f"checkpointer.checkpoint_dir={ws.student_init_dir(seed)}",
        *variant.overrides,
        *extra,
    ]


def train_variant(ws: Workspace, seed: int, variant: Variant, extra: list[str]) -> RunResult:
    cfg = demo_config(variant.config, run_overrides(ws, seed, variant, extra))
    return run_recipe(cfg, fresh=True, quiet=True)


def evaluate_seed(
    ws: Workspace, seed: int, runs: dict[str, RunResult], extra: list[str]
) -> dict[str, dict]:
    """The table's rows for one seed: before training, each run, the teacher, the truth."""
    cfg = demo_config(KD_CONFIG, run_overrides(ws, seed, KD_FORWARD, extra))
    students = {"before": ws.student_init_dir(seed)}
    students.update({name: run.checkpoint for name, run in runs.items()})
    return evaluate_checkpoints(cfg, students, teacher=ws.teacher_dir)


def _say(message: str) -> None:
    print(message, flush=True)


def run_demo(
    out: Path,
    *,
    seeds: list[int],
    quick: bool,
    extra: list[str],
    setup_only: bool,
    cached: bool = True,
) -> dict:
    """Set up, train and evaluate; print progress and the table; write results.{json,md}."""
    started = time.perf_counter()
    ws, reused = prepare_workspace(out, seeds=seeds)
    spec = DEFAULT_SPEC
    teacher = read_teacher_manifest()
    teacher_kl = teacher["held_out_metrics"]["teacher"]["true_kl"]
    _say(
        f"[setup] {'reused' if reused else 'wrote'} {ws.root}: a {spec.num_words}-word chain with "
        f"stochastic next words; {spec.num_train} training answers, {spec.num_val} held out; "
        f"teacher shipped (4 layers, true KL {teacher_kl:.3f}; trained with `{teacher['command']}`)"
    )
    if setup_only:
        return {}
    plan = variants(quick, cached)
    build_teacher_caches(ws, plan, extra)
    per_seed: list[dict[str, dict]] = []
    timings: dict[str, float] = {}
    for seed in seeds:
        runs: dict[str, RunResult] = {}
        for i, variant in enumerate(plan, start=1):
            _say(f"[seed {seed}] {i}/{len(plan)} training {variant.label} ...")
            run = train_variant(ws, seed, variant, extra)
            runs[variant.name] = run
            timings[f"seed{seed}/{variant.name}"] = run.seconds
            _say(
                f"[seed {seed}]   {run.steps} steps in {run.seconds:.1f} s, "
                f"final train loss {run.final_loss:.3f}"
            )
        _say(f"[seed {seed}] evaluating {len(runs) + 2} models on {spec.num_val} held-out answers")
        rows = evaluate_seed(ws, seed, runs, extra)
        per_seed.append(rows)
        _say(
            f"[seed {seed}]   held-out true KL: before {rows['before']['true_kl']:.3f}, "
            f"CE-only {rows[CE_ONLY.name]['true_kl']:.3f}, "
            f"KD forward KL {rows[KD_FORWARD.name]['true_kl']:.3f}, "
            f"teacher {rows['teacher']['true_kl']:.3f}"
        )
    elapsed = time.perf_counter() - started

    title = f"Held-out metrics, {spec.num_val} answers" + (
        f", mean ± std over seeds {seeds}" if len(seeds) > 1 else f", seed {seeds[0]}"
    )
    table = (
        markdown_mean_table(per_seed, LABELS)
        if len(seeds) > 1
        else markdown_table(per_seed[0], LABELS)
    )
    kd_wins = wins(per_seed, KD_FORWARD.name, CE_ONLY.name, ("ce", "true_kl", "teacher_kl"))
    verdict = (
        f"KD (forward KL) beats CE-only fine-tuning on held-out CE, true KL and KL to teacher "
        f"in {kd_wins}/{len(seeds)} seed(s)."
    )
    ratios = cached_vs_online(per_seed)
    for k, values in ratios.items():
        within = sum(ratio <= 1.05 for ratio in values)
        listed = ", ".join(f"{ratio:.3f}" for ratio in values)
        verdict += (
            f"\nKD from the cached top-{k}: held-out true KL / online KD's = {listed} "
            f"(within 5% in {within}/{len(values)} seed(s))."
        )
    _say(f"\n{title}\n\n{table}\n\n{verdict}")
    _say(f"Done in {elapsed:.0f} s. Per-seed tables: {ws.root / 'results.md'}")
    per_seed_text = "".join(
        f"\n\nSeed {seed}\n\n{markdown_table(rows, LABELS)}" for seed, rows in zip(seeds, per_seed)
    )
    write_text_atomic(ws.root / "results.md", f"{title}\n\n{table}\n\n{verdict}{per_seed_text}\n")
    results = {
        "seeds": seeds,
        "quick": quick,
        "overrides": extra,
        "labels": LABELS,
        "per_seed": per_seed,
        "kd_forward_beats_ce_seeds": kd_wins,
        "cached_true_kl_over_online": ratios,
        "seconds": elapsed,
        "train_seconds": timings,
    }
    write_text_atomic(ws.root / "results.json", json.dumps(json_safe(results), indent=1) + "\n")
    return results
