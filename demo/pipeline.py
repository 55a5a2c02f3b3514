"""``kdtune demo``: a real distillation end to end, then the table that shows it worked.

For each seed: the student (2 layers, random init from the seed) is fine-tuned on the same 128
answers, the same steps and data order, once with CE alone (``demo/student_ce``) and once per
divergence with knowledge distillation from the shipped teacher (``demo/student_kd`` with a
``kd_loss._component_`` override), and once per k in (2, 4, 8) with forward KL from a cache of
the teacher's top-k log-probs (``teacher_cache=...``; built once by ``kdtune cache-teacher``'s
code, no teacher in memory while training). On-policy KD (reverse KL; the student writes every
answer) and mixed KD (half the steps on-policy) get the same 160 steps: as GKD does, they
distil a student fine-tuned on the task (80 CE-only steps), for 80 steps. Every model is scored
on 1,000 held-out answers against the data, the teacher and the true chain, and on its own
sampled answers (:mod:`kdtune.demo.evaluate`).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from kdtune.assets.checkpoints import write_text_atomic
from kdtune.demo.evaluate import evaluate_checkpoints, resolve_checkpoint_dir, weight_files
from kdtune.demo.runner import RunResult, demo_config, recipe_output_to, run_recipe
from kdtune.demo.table import json_safe, markdown_mean_table, markdown_table, wins
from kdtune.demo.variants import (
    CACHE_FOLDER,
    CACHED_TOP_K,
    CACHED_VARIANTS,
    CE_ONLY,
    KD_CONFIG,
    KD_FORWARD,
    LABELS,
    Variant,
    cached_vs_online,
    on_policy_vs_off_policy,
    variants,
)
from kdtune.demo.workspace import DEFAULT_SPEC, Workspace, prepare_workspace, read_teacher_manifest

# On-policy distillation (kdtune.training.on_policy): the student samples the answers of its
# steps' prompts and the teacher grades every sampled token; the dataset answers are unused on
# those steps. Same steps, data order (prompts) and optimizer as the off-policy rows.

# GKD (Agarwal et al. 2024) distils on-policy from a student already fine-tuned on the task.
# The on-policy rows keep the off-policy rows' budget of 160 steps over the same prompts and
# data order: the first half is CE-only fine-tuning on the answers (SFT_START), the second half
# distils without reading an answer (on-policy) or with half of its steps on-policy (mixed).
# They are measured against off-policy forward KL (KD_FORWARD: 160 KD steps from the random
# student), as are the rows as stated (ANSWER_FREE_ON_POLICY_VARIANTS: 160 steps from
# the random student, no answer read). `--on-policy-controls` adds off-policy forward KL from
# the same 80-step start.


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


def start_overrides(ws: Workspace, seed: int, start: Path | None) -> list[str]:
    """The student's initial weights: the seed's random init, or a run's final checkpoint."""
    if start is None:
        return [f"checkpointer.checkpoint_dir={ws.student_init_dir(seed)}"]
    folder = resolve_checkpoint_dir(start)
    files = ", ".join(path.name for path in weight_files(folder))
    return [f"checkpointer.checkpoint_dir={folder}", f"checkpointer.checkpoint_files=[{files}]"]


def run_overrides(
    ws: Workspace, seed: int, variant: Variant, extra: list[str], start: Path | None = None
) -> list[str]:
    """Where the run reads and writes for ``seed``, the variant's overrides, then the user's.

    ``start``: the checkpoint folder of the run the variant starts from (``variant.start``).
    """
    return [
        f"assets_dir={ws.root}",
        f"output_dir={ws.run_dir(seed, variant.name)}",
        f"seed={seed}",
        *start_overrides(ws, seed, start),
        *variant.overrides,
        *extra,
    ]


def train_variant(
    ws: Workspace, seed: int, variant: Variant, extra: list[str], start: Path | None = None
) -> RunResult:
    cfg = demo_config(variant.config, run_overrides(ws, seed, variant, extra, start))
    return run_recipe(cfg, fresh=True, quiet=True)


def _start_of(variant: Variant, runs: dict[str, RunResult]) -> Path | None:
    if variant.start is None:
        return None
    if variant.start not in runs:
        raise ValueError(f"{variant.name} starts from {variant.start}, which has not run yet")
    return runs[variant.start].checkpoint


def evaluate_seed(
    ws: Workspace, seed: int, runs: dict[str, RunResult], extra: list[str]
) -> dict[str, dict]:
    """The table's rows for one seed: before training, each run, the teacher, the truth."""
    cfg = demo_config(KD_CONFIG, run_overrides(ws, seed, KD_FORWARD, extra))
    students = {"before": ws.student_init_dir(seed)}
    students.update({name: run.checkpoint for name, run in runs.items()})
    return evaluate_checkpoints(cfg, students, teacher=ws.teacher_dir)


def chains(plan: list[Variant]) -> list[list[tuple[int, Variant]]]:
    """The plan as chains that may run side by side, each ``(position in plan, variant)`` in
    order: a run joins the chain of the run it starts from."""
    chain_of: dict[str, list[tuple[int, Variant]]] = {}
    found: list[list[tuple[int, Variant]]] = []
    for index, variant in enumerate(plan, start=1):
        chain = chain_of.get(variant.start) if variant.start is not None else None
        if chain is None:
            chain = []
            found.append(chain)
        chain.append((index, variant))
        chain_of[variant.name] = chain
    return found


def train_chain(
    ws: Workspace, seed: int, chain: list[tuple[int, Variant]], total: int, extra: list[str]
) -> dict[str, RunResult]:
    """Train one chain's runs in order (a run may start from an earlier one's checkpoint)."""
    runs: dict[str, RunResult] = {}
    for index, variant in chain:
        _say(f"[seed {seed}] {index}/{total} training {variant.label} ...")
        run = train_variant(ws, seed, variant, extra, _start_of(variant, runs))
        runs[variant.name] = run
        _say(
            f"[seed {seed}]   {variant.name}: {run.steps} steps in {run.seconds:.1f} s, "
            f"final train loss {run.final_loss:.3f}"
        )
    return runs


def evaluate_and_report(
    ws: Workspace, seed: int, runs: dict[str, RunResult], extra: list[str]
) -> dict[str, dict]:
    """:func:`evaluate_seed`, with its progress lines."""
    _say(f"[seed {seed}] evaluating {len(runs) + 2} models on {DEFAULT_SPEC.num_val} answers")
    rows = evaluate_seed(ws, seed, runs, extra)
    _say(
        f"[seed {seed}]   held-out true KL: before {rows['before']['true_kl']:.3f}, "
        f"CE-only {rows[CE_ONLY.name]['true_kl']:.3f}, "
        f"KD forward KL {rows[KD_FORWARD.name]['true_kl']:.3f}, "
        f"teacher {rows['teacher']['true_kl']:.3f}"
    )
    return rows


class _Inline:
    """Runs submitted work at once, in this process (``jobs=1``): same interface as the pool."""

    def submit(self, function: Callable, *args: Any) -> Future:
        future: Future = Future()
        future.set_result(function(*args))
        return future


def train_and_evaluate(
    ws: Workspace,
    seeds: list[int],
    plan: list[Variant],
    extra: list[str],
    *,
    jobs: int,
    threads: int,
) -> tuple[list[dict[str, dict]], dict[str, float]]:
    """Every seed's runs, then its evaluation as soon as its runs are done; with ``jobs`` > 1
    in worker processes (spawned: no forked OpenMP state). Returns the rows per seed (in
    ``seeds`` order) and each run's training seconds."""
    pending: dict[Future, tuple[str, int]] = {}
    runs: dict[int, dict[str, RunResult]] = {seed: {} for seed in seeds}
    chains_left = {seed: 0 for seed in seeds}
    rows: dict[int, dict[str, dict]] = {}
    pool = (
        ProcessPoolExecutor(
            jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )
        if jobs > 1
        else _Inline()
    )
    try:
        for seed in seeds:
            for chain in sorted(chains(plan), key=len, reverse=True):  # longest first
                pending[pool.submit(train_chain, ws, seed, chain, len(plan), extra)] = (
                    "train",
                    seed,
                )
                chains_left[seed] += 1
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, seed = pending.pop(future)
                if kind == "evaluate":
                    rows[seed] = future.result()
                    continue
                runs[seed].update(future.result())
                chains_left[seed] -= 1
                if chains_left[seed] == 0:
                    ordered = {v.name: runs[seed][v.name] for v in plan}
                    job = pool.submit(evaluate_and_report, ws, seed, ordered, extra)
                    pending[job] = ("evaluate", seed)
    finally:
        if isinstance(pool, ProcessPoolExecutor):
            pool.shutdown(cancel_futures=True)
    timings = {
        f"seed{seed}/{name}": run.seconds for seed in seeds for name, run in runs[seed].items()
    }
    return [rows[seed] for seed in seeds], timings


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
    on_policy: bool = True,
    controls: bool = False,
    jobs: int = 1,
    threads: int = 1,
) -> dict:
    """Set up, train and evaluate; print progress and the table; write results.{json,md}.

    ``jobs`` > 1 trains and evaluates in that many worker processes (each with ``threads``
    torch threads); every run is seeded by its own config, so the results are the same."""
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
    plan = variants(quick, cached, on_policy, controls)
    build_teacher_caches(ws, plan, extra)
    per_seed, timings = train_and_evaluate(ws, seeds, plan, extra, jobs=jobs, threads=threads)
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
    beats = on_policy_vs_off_policy(per_seed)
    for (name, other), count in beats.items():
        verdict += (
            f"\n{LABELS[name]} beats {LABELS[other]} on both sample-based metrics (true "
            f"LL/token, seq. reverse KL) in {count}/{len(seeds)} seed(s)."
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
        "on_policy_beats_off_policy_seeds": [
            {"on_policy": name, "off_policy": other, "seeds": count}
            for (name, other), count in beats.items()
        ],
        "seconds": elapsed,
        "train_seconds": timings,
    }
    write_text_atomic(ws.root / "results.json", json.dumps(json_safe(results), indent=1) + "\n")
    return results
