"""The ``kdtune`` command: run recipes and manage configs by name.

::

    kdtune ls                                              recipes and their configs
    kdtune run knowledge_distillation --config tiny/full_chunked [key=value ...]
    kdtune run --nproc_per_node 2 knowledge_distillation --config <name|path> [key=value ...]
    kdtune cp tiny/full_chunked ./my_kd.yaml               copy a config to edit it
    kdtune validate --config ./my_kd.yaml [key=value ...]  check a config without training
    kdtune cache-teacher --config <name|path> teacher_cache=DIR [--top_k K] [key=value ...]
    kdtune prune SRC DST [--layers N | --drop-layers 3,5-7] [--heads H] [--mlp M] [--hidden D]
                 [--target-params N --axes depth,width] --config <name|path> [key=value ...]
    kdtune export CHECKPOINT_OR_MODEL_DIR --format gguf --quant f16|q8_0|q4_0 [--out FILE]
    kdtune export CHECKPOINT --format torchao [--out DIR]   a torchao QAT run, converted

Subcommands are entries of :data:`COMMANDS` (name -> :class:`Command`); adding one is adding
an entry (``eval`` and ``demo`` plug in there).
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdtune.cli.registry import list_recipes, resolve_recipe
from kdtune.training.config.loading import (
    UnknownNameError,
    config_recipe,
    list_configs,
    load_config,
    resolve_config,
)


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, how it declares arguments, and what it does."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    takes_overrides: bool = False
    """Trailing ``key=value`` arguments go to ``args.overrides`` (the recipe's overrides)."""


# --------------------------------------------------------------------------------------------
# run


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc_per_node",
        type=int,
        default=1,
        help="processes on this machine; more than 1 launches torchrun",
    )
    parser.add_argument("recipe", help="recipe name (kdtune ls) or dotted module path")
    parser.add_argument("--config", required=True, help="config name (kdtune ls) or YAML path")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print the full traceback of a config error or a stopped run (also: KDTUNE_VERBOSE=1; "
        "it is always in <output_dir>/logs/error.log)",
    )


def recipe_argv(module: str, config_path: Path, overrides: list[str]) -> list[str]:
    """The recipe's own command line (what its ``@config.parse`` reads)."""
    return [module, "--config", str(config_path), *overrides]


def _run(args: argparse.Namespace) -> int:
    """Run the recipe as ``__main__`` (its own error handling prints a user error short and
    exits 1; :func:`kdtune.training.console.run_recipe_main`), here or under torchrun."""
    from kdtune.training.console import VERBOSE_ENV

    module = resolve_recipe(args.recipe)
    config_path = resolve_config(args.config)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # torchrun's workers inherit it
    load_config(config_path, args.overrides)  # a file that is not a YAML mapping: one line
    if args.nproc_per_node > 1:
        return _run_torchrun(module, config_path, args.overrides, args.nproc_per_node)
    sys.argv = recipe_argv(module, config_path, args.overrides)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


def _run_torchrun(module: str, config_path: Path, overrides: list[str], nproc: int) -> int:
    """``torchrun --standalone --nproc_per_node N -m <module> --config ...`` in this process."""
    return torchrun_module(module, ["--config", str(config_path), *overrides], nproc)


def torchrun_module(module: str, argv: list[str], nproc: int) -> int:
    """``torchrun --standalone --nproc_per_node N -m <module> ARGV`` in this process.

    A failed worker is one line here (its own message is above; torchrun's report with every
    rank's traceback only with ``--verbose`` / ``KDTUNE_VERBOSE=1``); returns 1 then.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from kdtune.training.console import verbose
    from kdtune.training.stop_signals import PREEMPTED_EXIT_CODE

    launcher = [
        "--standalone",
        f"--nproc_per_node={nproc}",
        # torchrun forwards these to the workers, which save a checkpoint and stop
        # (kdtune.training.stop_signals); it waits this long for them before killing them.
        "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown_timeout={TORCHRUN_SHUTDOWN_TIMEOUT_S}",
    ]
    try:
        run(get_args_parser().parse_args([*launcher, "-m", module, *argv]))
    except SignalException:
        return PREEMPTED_EXIT_CODE  # the workers said what they saved (rank 0's message)
    except ChildFailedError as error:
        if verbose():
            raise
        codes = {failure.exitcode for failure in error.failures.values()}
        if codes == {PREEMPTED_EXIT_CODE}:
            return PREEMPTED_EXIT_CODE  # stopped by a signal after the checkpoint
        ranks = sorted(error.failures)
        print(f"kdtune: {len(ranks)} of {nproc} processes failed (ranks {ranks})", file=sys.stderr)
        return 1
    return 0


TORCHRUN_SHUTDOWN_TIMEOUT_S = 300
"""How long torchrun waits, after forwarding a stop signal, for the workers to finish their
step and checkpoint before killing them (a scheduler's own grace period may be shorter)."""


# --------------------------------------------------------------------------------------------
# ls, cp, validate


def _add_ls_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _ls(args: argparse.Namespace) -> int:
    del args
    configs = list_configs()
    rows = []
    for recipe in list_recipes():
        mine = [name for name in configs if config_recipe(name) == recipe]
        rows.extend((recipe if i == 0 else "", name) for i, name in enumerate(mine or ["-"]))
    width = max(len("RECIPE"), *(len(recipe) for recipe, _ in rows)) + 3
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe, name in rows:
        print(f"{recipe:<{width}}{name}")
    return 0


def _add_cp_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="shipped config name (kdtune ls)")
    parser.add_argument("destination", type=Path, help="file or folder to copy it to")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def _cp(args: argparse.Namespace) -> int:
    source = resolve_config(args.config)
    destination: Path = args.destination
    if destination.is_dir():
        destination = destination / source.name
    if destination.suffix != ".yaml":
        destination = destination.with_suffix(".yaml")
    if destination.exists() and not args.force:
        print(f"error: {destination} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    print(f"Copied {source.name} to {destination}")
    return 0


def _add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    from kdtune.training.config.schema import help_text

    parser.add_argument("--config", required=True, help="config name (kdtune ls) or YAML path")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = help_text()


def _validate(args: argparse.Namespace) -> int:
    """The recipe's preflight (:func:`kdtune.training.preflight.check_run`) without training:
    every problem of every phase at once (exit 1), else the warnings, data figures and OK."""
    from kdtune.training.preflight import PREFLIGHT, check_run

    config_path = resolve_config(args.config)
    cfg = load_config(config_path, args.overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the problems and warnings are the report
        report = check_run(cfg, show_progress=sys.stderr.isatty())
    problems = report.problems
    for message in problems.warnings:
        print(f"warning: {message}")
    if problems.errors:
        print(f"INVALID {config_path}\n{problems.text(PREFLIGHT)}", file=sys.stderr)
        return 1
    for scan in report.scans:
        print(f"data: {scan.summary()}")
    print(f"OK {config_path}")
    return 0


# --------------------------------------------------------------------------------------------
# cache-teacher


def _add_cache_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    from kdtune.teacher_cache.build import add_build_arguments

    parser.add_argument(
        "--nproc_per_node", type=int, default=1, help="processes (each builds its own shards)"
    )
    add_build_arguments(parser)


def _cache_teacher(args: argparse.Namespace) -> int:
    from kdtune.teacher_cache import build

    argv = [
        "--config",
        str(resolve_config(args.config)),
        *(f"--{key}={value}" for key, value in build.cli_options(args).items()),
        *args.overrides,
    ]
    if args.nproc_per_node > 1:
        return torchrun_module("kdtune.teacher_cache", argv, args.nproc_per_node)
    return build.main(argv)


def _add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    from kdtune.pruning.command import add_prune_arguments

    add_prune_arguments(parser)


def _prune(args: argparse.Namespace) -> int:
    from kdtune.pruning.command import prune_main

    return prune_main(args)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from kdtune.quantization.gguf_export import FORMATS, QUANTS

    parser.add_argument("source", type=Path, help="checkpoints/step_N (its model/) or an HF folder")
    parser.add_argument("--format", choices=FORMATS, default="gguf", help="file format")
    parser.add_argument(
        "--quant", choices=QUANTS, default=None, help="gguf: 2-D projection weights (default q8_0)"
    )
    parser.add_argument(
        "--embedding-quant",
        choices=QUANTS,
        default=None,
        help="gguf: token embedding / output (default: --quant; q8_0 for q4_0, as llama-quantize)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="gguf: file (default <checkpoint>/gguf/model-QUANT.gguf); torchao: folder "
        "(default <checkpoint>/torchao)",
    )


def _export(args: argparse.Namespace) -> int:
    from kdtune.quantization.gguf_export import ExportError, export_gguf

    try:
        if args.format == "torchao":
            return _export_torchao(args)
        quant = args.quant if args.quant is not None else "q8_0"
        result = export_gguf(
            args.source, args.out, quant=quant, embedding_quant=args.embedding_quant
        )
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB)")
    return 0


def _export_torchao(args: argparse.Namespace) -> int:
    from kdtune.quantization.gguf_export import ExportError
    from kdtune.quantization.torchao_export import export_torchao

    for option, value in (("--quant", args.quant), ("--embedding-quant", args.embedding_quant)):
        if value is not None:
            raise ExportError(
                f"{option} is a GGUF option; --format torchao uses the run's own quantizer "
                "(drop it, or export with --format gguf)"
            )
    result = export_torchao(args.source, args.out)
    print(
        f"Wrote {result.path} ({result.size_bytes / 2**20:.2f} MiB, "
        f"{result.size_bytes / result.bf16_bytes:.3f}x the bf16 weights)"
    )
    return 0


COMMANDS: dict[str, Command] = {
    "run": Command("run a recipe with a config", _add_run_arguments, _run, takes_overrides=True),
    "ls": Command("list recipes and their configs", _add_ls_arguments, _ls),
    "cp": Command("copy a shipped config to edit it", _add_cp_arguments, _cp),
    "validate": Command(
        "check a config (no training)", _add_validate_arguments, _validate, takes_overrides=True
    ),
    "cache-teacher": Command(
        "cache a KD config's teacher top-k log-probs (then train with teacher_cache=DIR)",
        _add_cache_teacher_arguments,
        _cache_teacher,
        takes_overrides=True,
    ),
    "prune": Command(
        "prune a Llama-family HF folder (depth, heads, MLP, hidden; Minitron-style)",
        _add_prune_arguments,
        _prune,
        takes_overrides=True,
    ),
    "export": Command(
        "export a checkpoint's model for deployment (GGUF f16/q8_0/q4_0 for llama.cpp, ollama; "
        "torchao's converted model for a torchao QAT run)",
        _add_export_arguments,
        _export,
    ),
}
"""Subcommand table."""

DELEGATED: dict[str, tuple[str, str]] = {
    "demo": (
        "distil the embedded tiny task end to end and print the quality table",
        "kdtune.demo.cli:demo_main",
    ),
    "eval": ("compute the quality table for any checkpoints", "kdtune.demo.cli:eval_main"),
    "assets": (
        "write the tiny offline assets (tokenizer, checkpoints, data)",
        "kdtune.assets.__main__:main",
    ),
    "smollm2": (
        "SmolLM2-135M-Instruct: set-up, layer pruning, scoring, the real demo",
        "kdtune.smollm2.cli:main",
    ),
}
"""Subcommands with an argument parser of their own: ``kdtune NAME ARGS`` calls
``entry(ARGS)``; ``kdtune NAME --help`` shows that parser's help."""


def _run_delegated(name: str, argv: list[str]) -> int:
    module_name, function_name = DELEGATED[name][1].split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    return int(entry(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdtune", description="Knowledge-distillation recipes in the style of torchtune."
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="{" + ",".join([*COMMANDS, *DELEGATED]) + "}"
    )
    for name, command in COMMANDS.items():
        usage_tail = " [key=value ...]" if command.takes_overrides else ""
        sub = subparsers.add_parser(name, help=command.help, description=command.help + usage_tail)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.handler)
    for name, (help_line, _) in DELEGATED.items():
        subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdtune`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"] and "--real" in argv:  # the real-model demo: kdtune smollm2 demo
        argv = ["smollm2", "demo", *(arg for arg in argv[1:] if arg != "--real")]
    if argv and argv[0] in DELEGATED:
        return _run_delegated(argv[0], argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if COMMANDS[args.command].takes_overrides:
        bad = [arg for arg in extra if "=" not in arg and not arg.startswith("~")]
        if bad:
            parser.error(f"unrecognized arguments: {bad} (overrides are key=value)")
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {extra}")
    from kdtune.training.config.errors import ConfigError
    from kdtune.training.console import print_user_error, verbose

    try:
        return args.handler(args)
    except UnknownNameError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:  # a bad config file, cache or key of a command: one line
        if verbose():
            raise
        print_user_error(error)
        return 1


def console_main() -> int:
    """The ``kdtune`` console script: :func:`main`, with a checkpoint that cannot be resumed or
    saved printed as one line (in-process callers of :func:`main` get the exception)."""
    from kdtune.training.console import CHECKPOINT_ERRORS, print_user_error, verbose

    try:
        return main()
    except CHECKPOINT_ERRORS as error:
        if verbose():
            raise
        print_user_error(error)
        return 1


if __name__ == "__main__":
    sys.exit(console_main())
