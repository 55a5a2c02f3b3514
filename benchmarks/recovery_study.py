"""Recovery study (issue 23): depth- vs width-pruned SmolLM2 students, CE-only vs KD from cache.

Arms: {depth_half, width_half} x {ce, kd_cache} x data orders (``--orders``). Every arm trains
from its pruned start on the same tokens (same config, steps, optimizer; the order set by
``seed``); the KD arms read the teacher's top-k log-probs from one offline cache (built once by
``kdtune cache-teacher``; no teacher in memory while training). Each run saves checkpoints at
1/4, 1/2 and all of the budget; the start and every checkpoint are scored on the held-out split
(perplexity, CE, KL to teacher, top-1 agreement; :mod:`kdtune.smollm2.evaluate`).

Output under ``--out``: ``metrics.jsonl`` (one line per arm x order x checkpoint, plus the
teacher), ``perplexity.png`` (held-out perplexity against training tokens, mean over orders),
``study.json`` (command, machine, versions, budget).

::

    # students first (kdtune prune; about half the teacher's non-embedding parameters):
    kdtune prune kdtune_real/teacher kdtune_real/students/depth_half --layers 15 \\
        --config smollm2/135M_prune15_kd assets_dir=./kdtune_real
    kdtune prune kdtune_real/teacher kdtune_real/students/width_half --target-params 53102016 \\
        --axes width --config smollm2/135M_prune15_kd assets_dir=./kdtune_real
    python benchmarks/recovery_study.py --root ./kdtune_real --out ./study --budget-tokens 2000000
    python benchmarks/recovery_study.py --root ./kdtune_real --out /tmp/study_smoke --smoke

``--smoke`` trains 4 steps per arm on 32 training records (one data order, 2 held-out records):
it checks the pipeline, not the science. The long run is not timed here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from kdtune.smollm2.demo import kdtune_command, run_logged, student_folder_overrides
from kdtune.smollm2.evaluate import evaluate_models
from kdtune.training.checkpoint.layout import CHECKPOINTS_DIRNAME, step_dirname
from kdtune.training.config.loading import load_config, resolve_config

CONFIGS = {"ce": "smollm2/135M_prune15_ce", "kd_cache": "smollm2/135M_prune15_kd"}
FRACTIONS = (0.0, 0.25, 0.5, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0].strip())
    parser.add_argument("--root", type=Path, default=Path("./kdtune_real"), help="set-up folder")
    parser.add_argument("--out", type=Path, required=True, help="study folder")
    parser.add_argument("--students", nargs="+", default=["depth_half", "width_half"])
    parser.add_argument("--losses", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget-tokens", type=int, default=2_000_000, help="per arm")
    parser.add_argument("--top-k", type=int, default=64, help="teacher cache ids per token")
    parser.add_argument("--eval-records", type=int, default=64, help="held-out records scored")
    parser.add_argument(
        "--corpus",
        choices=("docs", "topics"),
        default="docs",
        help="docs: the demo's topics plus standard-library pydoc pages, sized to the budget "
        "(written under --out/data); topics: the set-up's data as it is",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny data and budget, one order")
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    if args.smoke:
        args.orders, args.eval_records = args.orders[:1], 2
    return args


def smoke_data(root: Path, out: Path) -> list[str]:
    """32 training and 4 held-out records (smoke runs), as dataset overrides."""
    data = out / "smoke_data"
    data.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", 32), ("val", 4)):
        records = json.loads((root / "data" / f"{name}.json").read_text())[:count]
        (data / f"{name}.json").write_text(json.dumps(records))
    return [
        f"dataset.data_files={data / 'train.json'}",
        f"validation_dataset.data_files={data / 'val.json'}",
    ]


def study_data(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The ``docs`` corpus under ``--out/data`` (built once): dataset overrides and split sizes."""
    from kdtune.smollm2.text import write_study_data
    from kdtune.smollm2.tokenizer import SmolLM2Tokenizer

    data = args.out / "data"
    sizes_file = data / "sizes.json"
    if not sizes_file.is_file():
        tokenizer = SmolLM2Tokenizer(args.root / "teacher")
        sizes = write_study_data(data, tokenizer, 127, max_train_tokens=args.budget_tokens)
        sizes_file.write_text(json.dumps(sizes, indent=2))
    overrides = [
        f"dataset.data_files={data / 'train.json'}",
        f"validation_dataset.data_files={data / 'val.json'}",
    ]
    return overrides, json.loads(sizes_file.read_text())


def build_cache(args: argparse.Namespace, common: list[str]) -> Path:
    cache = args.out / "teacher_cache"
    if not (cache / "manifest.json").is_file():
        run_logged(
            kdtune_command(
                "cache-teacher",
                "--config",
                CONFIGS["kd_cache"],
                f"--top_k={args.top_k}",
                f"teacher_cache={cache}",
                *common,
            ),
            args.out / "logs" / "cache.log",
            "teacher cache build",
        )
    return cache


def train(args, student: str, loss: str, order: int, steps: int, epochs, per_epoch, common, cache):
    out = args.out / "runs" / f"{student}_{loss}_order{order}"
    shutil.rmtree(out, ignore_errors=True)
    every = max(1, steps // 4)
    overrides = [
        *common,
        *student_folder_overrides(args.root / "students" / student),
        f"output_dir={out}",
        f"seed={order}",
        f"epochs={epochs}",
        f"max_steps_per_epoch={per_epoch}",
        f"stop_after_steps={steps}",
        f"save_every_n_steps={every}",
        "keep_last_n_checkpoints=8",
    ]
    if loss == "kd_cache":
        overrides.append(f"teacher_cache={cache}")
    seconds = run_logged(
        kdtune_command("run", "knowledge_distillation", "--config", CONFIGS[loss], *overrides),
        args.out / "logs" / f"{out.name}.log",
        f"{out.name} run",
    )
    return out, seconds


def checkpoints_at(run_dir: Path, steps: int) -> dict[float, Path]:
    """Fraction of the budget -> the checkpoint saved at that step (``steps`` is a multiple
    of 4, saved every ``steps // 4``)."""
    found = {}
    for fraction in FRACTIONS[1:]:
        folder = run_dir / CHECKPOINTS_DIRNAME / step_dirname(round(steps * fraction))
        if folder.is_dir():
            found[fraction] = folder
    return found


def final_answers(args, cfg, teacher: Path, steps: int) -> list[dict]:
    """Greedy chat answers of the teacher, each pruned start and each arm's final checkpoint
    (first data order)."""
    models = {s: args.root / "students" / s for s in args.students}
    for student in args.students:
        for loss in args.losses:
            run_dir = args.out / "runs" / f"{student}_{loss}_order{args.orders[0]}"
            final = checkpoints_at(run_dir, steps).get(1.0)
            if final is not None:
                models[f"{student} {loss}"] = final
    rows = evaluate_models(cfg, models, teacher, max_records=1, log=lambda _: None)
    return [{"model": r["model"], "answers": r["answers"]} for r in rows]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    arms = sorted({(r["student"], r["loss"]) for r in rows if r["student"] != "teacher"})
    for student, loss in arms:
        points: dict[int, list[float]] = {}
        for r in rows:
            if (r["student"], r["loss"]) == (student, loss):
                points.setdefault(r["tokens"], []).append(r["perplexity"])
        xs = sorted(points)
        axis.plot(
            xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=f"{student} {loss}"
        )
    teacher = [r["perplexity"] for r in rows if r["student"] == "teacher"]
    if teacher:
        axis.axhline(teacher[0], color="black", linestyle="--", label="teacher")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("held-out perplexity")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    common = [f"assets_dir={args.root}", *args.overrides]
    sizes = None
    if args.smoke:
        common += smoke_data(args.root, args.out)
        args.budget_tokens = min(args.budget_tokens, 4 * 4 * 128)
    elif args.corpus == "docs":
        overrides, sizes = study_data(args)
        common += overrides
    for student in args.students:
        if not (args.root / "students" / student / "config.json").is_file():
            raise SystemExit(
                f"--students: no {args.root / 'students' / student}; make it with "
                "kdtune prune (see this file's docstring)"
            )
    cfg = load_config(resolve_config(CONFIGS["kd_cache"]), common)
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.tokenizer.max_seq_len
    steps = 4 * max(1, math.ceil(args.budget_tokens / tokens_per_step / 4))
    train_records = len(json.loads(Path(cfg.dataset.data_files).read_text()))
    # epochs x steps per epoch spans the budget (the LR schedule's length); stop_after_steps
    # ends it exactly at the budget
    epochs = math.ceil(steps / max(1, train_records // cfg.batch_size))
    per_epoch = math.ceil(steps / epochs)
    study = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "budget": {
            "tokens": steps * tokens_per_step,
            "steps": steps,
            "epochs": epochs,
            "tokens_per_step": tokens_per_step,
            "train_records": train_records,
        },
        "corpus": {"name": "smoke" if args.smoke else args.corpus, "splits": sizes},
    }
    (args.out / "study.json").write_text(json.dumps(study, indent=2))
    print(
        f"[study] {steps} steps x {tokens_per_step} tokens per arm, {epochs} epoch(s)", flush=True
    )
    cache = build_cache(args, common) if "kd_cache" in args.losses else None
    teacher = args.root / "teacher"
    metrics = args.out / "metrics.jsonl"
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        with metrics.open("a") as file:
            file.write(json.dumps(row) + "\n")

    metrics.write_text("")
    fixed = evaluate_models(
        cfg,
        {s: args.root / "students" / s for s in args.students},
        teacher,
        max_records=args.eval_records,
        prompts=(),
    )
    by_name = {r["model"]: r for r in fixed}
    scores = ("perplexity", "ce", "kl_to_teacher", "top1_agreement")
    record(
        {
            "student": "teacher",
            "loss": None,
            "order": None,
            "fraction": 0.0,
            "tokens": 0,
            **{k: by_name["teacher"][k] for k in scores},
        }
    )
    for order in args.orders:
        for student in args.students:
            for loss in args.losses:
                base = {"student": student, "loss": loss, "order": order}
                record(
                    {
                        **base,
                        "fraction": 0.0,
                        "tokens": 0,
                        **{k: by_name[student][k] for k in scores},
                    }
                )
                run_dir, seconds = train(
                    args, student, loss, order, steps, epochs, per_epoch, common, cache
                )
                found = checkpoints_at(run_dir, steps)
                evaluated = evaluate_models(
                    cfg,
                    {str(f): p for f, p in found.items()},
                    teacher,
                    max_records=args.eval_records,
                    prompts=(),
                    include_teacher=False,
                    log=lambda _: None,
                )
                for row in evaluated:
                    fraction = float(row["model"])
                    record(
                        {
                            **base,
                            "fraction": fraction,
                            "tokens": round(fraction * steps) * tokens_per_step,
                            "train_seconds": seconds,
                            **{k: row[k] for k in scores},
                        }
                    )
                print(
                    f"[study] {student} {loss} order {order}: {len(found)} checkpoints, "
                    f"{seconds:.0f} s",
                    flush=True,
                )
    answers = final_answers(args, cfg, teacher, steps)
    (args.out / "answers.json").write_text(json.dumps(answers, indent=2, ensure_ascii=False))
    plot(rows, args.out / "perplexity.png")
    print(f"[study] wrote {metrics} and {args.out / 'perplexity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
