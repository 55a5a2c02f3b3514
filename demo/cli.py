"""Entry points of ``kdtune demo`` and ``kdtune eval`` (wired by :mod:`kdtune.cli.main`).

::

    kdtune demo [--out DIR] [--seeds 0 1 2] [--quick] [--setup-only] [--no-cached] [--no-on-policy]
                [--on-policy-controls] [--jobs N] [--threads N]
                [key=value ...]
    kdtune eval --config CONFIG --checkpoint NAME=DIR [...] [--teacher DIR | --no-teacher]
                [--seeds 0 1 2] [--task task.json] [--json PATH] [key=value ...]

``key=value`` arguments override the recipe config (every student run of the demo; the
config being scored for eval), as on ``kdtune run``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from kdtune.assets.checkpoints import write_text_atomic
from kdtune.demo.evaluate import evaluate_checkpoints
from kdtune.demo.runner import demo_config
from kdtune.demo.table import json_safe, markdown_mean_table, markdown_table

DEFAULT_DEMO_DIR = Path("./kdtune_demo")


def _split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple:
    """Parse ``argv``; every ``key=value`` that is not an option's value is a config override.

    Overrides are taken out before argparse sees them, so they may come anywhere (even right
    after ``--seeds 0 1 2``), while an option's own value may contain ``=``
    (``--checkpoint kd=DIR``).
    """
    options: list[str] = []
    overrides: list[str] = []
    single_value_next = False
    for token in argv:
        if single_value_next:
            options.append(token)
            single_value_next = False
        elif token.startswith("-"):
            options.append(token)
            # one value follows a store/append option (nargs None; flags have nargs 0);
            # "--flag=value" is one token and not in the table
            action = parser._option_string_actions.get(token)
            single_value_next = action is not None and action.nargs is None
        elif "=" in token:
            overrides.append(token)
        else:
            options.append(token)
    args, extra = parser.parse_known_args(options)
    if extra:
        parser.error(f"unrecognized arguments: {extra} (config overrides are key=value)")
    return args, overrides


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdtune demo",
        description="Distil the shipped teacher into a small student on an embedded task "
        "(nothing to download; about 4-5 minutes on 2 CPU cores) and print the quality table: "
        "student before training, CE-only fine-tuning, KD with four divergences, KD from the "
        "cached top-2/4/8 teacher log-probs, on-policy and mixed KD after 80 CE-only steps, "
        "teacher.",
        epilog="Trailing key=value arguments override the config of every student run "
        "(e.g. epochs=10 kd_ratio=0.5), as on `kdtune run`.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DEMO_DIR, help="demo folder")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="student seeds (initial weights and data order); the table gives mean ± std",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CE-only and forward-KL KD only (no variants)"
    )
    parser.add_argument(
        "--setup-only", action="store_true", help="write the demo folder and stop (no training)"
    )
    parser.add_argument(
        "--no-on-policy",
        action="store_true",
        help="leave out the on-policy (lambda 1, reverse KL) and mixed (lambda 0.5) KD rows "
        "and their 80-step CE-only start",
    )
    parser.add_argument(
        "--on-policy-controls",
        action="store_true",
        help="add the on-policy rows' control: off-policy forward KL from their 80-step "
        "CE-only start (also with --quick, which then runs every on-policy row)",
    )
    parser.add_argument(
        "--no-cached",
        action="store_true",
        help="leave out the three runs of KD from the cached top-k teacher (k = 2, 4, 8)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="training runs side by side, in worker processes (default: the CPU cores; the "
        "results do not depend on it)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the models are tiny, and one thread avoids the "
        "10x slowdowns of OpenMP threads competing for cores with other processes)",
    )
    return parser


def demo_main(argv: list[str]) -> int:
    """``kdtune demo``; returns the exit status."""
    from kdtune.demo.pipeline import run_demo

    parser = demo_parser()
    args, overrides = _split_overrides(parser, argv)
    if args.threads < 1 or args.jobs < 1:
        parser.error(f"--threads and --jobs must be >= 1, got {args.threads}, {args.jobs}")
    torch.set_num_threads(args.threads)
    run_demo(
        args.out,
        seeds=args.seeds,
        quick=args.quick,
        extra=overrides,
        setup_only=args.setup_only,
        cached=not args.no_cached,
        on_policy=not args.no_on_policy,
        controls=args.on_policy_controls,
        jobs=args.jobs,
        threads=args.threads,
    )
    return 0


def _name_and_dir(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdtune eval",
        description="Score checkpoints on the demo task's held-out answers: CE and perplexity "
        "against the data, KL to the teacher, KL to the true distribution, top-1 accuracy.",
        epilog="Trailing key=value arguments override the config (e.g. assets_dir=DIR), as on "
        "`kdtune run`. Example: kdtune eval --config demo/student_kd --checkpoint "
        "kd=kdtune_demo/runs/seed{seed}/kd_forward_kl --seeds 0 1 2",
    )
    parser.add_argument("--config", required=True, help="recipe config name or YAML path")
    parser.add_argument(
        "--checkpoint",
        type=_name_and_dir,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a student (built with the config's model): a folder with config.json and "
        "safetensors, or a run's output_dir (its latest checkpoint); repeat for more. "
        "'{seed}' in DIR is replaced by each of --seeds",
    )
    teacher = parser.add_mutually_exclusive_group()
    teacher.add_argument(
        "--teacher", default=None, help="teacher folder (default: teacher_checkpointer's)"
    )
    teacher.add_argument("--no-teacher", action="store_true", help="no teacher row or KL column")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="values for {seed}")
    parser.add_argument("--task", type=Path, default=None, help="task.json (default: found "
                        "next to validation_dataset.data_files)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser


def _teacher_dir(args: argparse.Namespace, cfg) -> str | None:
    if args.no_teacher:
        return None
    if args.teacher is not None:
        return args.teacher
    if cfg.teacher_checkpointer is None:
        return None
    return str(cfg.teacher_checkpointer.checkpoint_dir)


def eval_main(argv: list[str]) -> int:
    """``kdtune eval``; returns the exit status (2 for a usage error)."""
    parser = eval_parser()
    args, overrides = _split_overrides(parser, argv)
    has_placeholder = any("{seed}" in folder for _, folder in args.checkpoint)
    if args.seeds is not None and not has_placeholder:
        parser.error("--seeds needs '{seed}' in at least one --checkpoint DIR")
    if has_placeholder and args.seeds is None:
        parser.error("a --checkpoint DIR contains '{seed}': pass --seeds")
    cfg = demo_config(args.config, overrides)
    teacher = _teacher_dir(args, cfg)
    seeds = args.seeds if args.seeds is not None else [None]
    per_seed = []
    for seed in seeds:
        students = {
            name: folder if seed is None else folder.replace("{seed}", str(seed))
            for name, folder in args.checkpoint
        }
        rows = evaluate_checkpoints(cfg, students, teacher, task_file=args.task)
        per_seed.append(rows)
        label = "" if seed is None else f"seed {seed}\n"
        print(f"{label}{markdown_table(rows)}\n")
    if len(per_seed) > 1:
        print(f"mean ± std over seeds {seeds}\n{markdown_mean_table(per_seed)}")
    if args.json is not None:
        payload = {"seeds": args.seeds, "rows": per_seed}
        write_text_atomic(args.json, json.dumps(json_safe(payload), indent=1) + "\n")
    return 0
