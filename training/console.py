"""A quiet, useful console: what a run prints, and what goes to its log files instead.

Files under ``<output_dir>/logs/`` (rank 0): ``run.log`` (every log line of the run, as on the
console), ``config.yaml`` (the resolved config; the console gets its path, not its 90 lines)
and ``error.log`` (the full traceback of an error that stopped the run; a config error before
the output folder exists creates nothing). On the console, an error the user can fix (a config
error, a stopped run) is one short message naming the key or the step, from
:func:`run_recipe_main`; ``--verbose`` (``kdtune run``) or ``KDTUNE_VERBOSE=1`` shows the
traceback as well. Log lines go through the progress bar (``tqdm.write``), so they
sit on their own lines above it.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf
from torchtune import utils
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kdtune.training import process_group
from kdtune.training.checkpoint.layout import CheckpointError, CheckpointSaveError
from kdtune.training.checkpoint.resume import UntrustedCheckpointError
from kdtune.training.config.errors import ConfigError
from kdtune.training.guard import TrainingStopped
from kdtune.training.run_lock import OutputDirLockedError
from kdtune.training.stop_signals import PREEMPTED_EXIT_CODE, Preempted

LOGS_DIRNAME = "logs"
VERBOSE_ENV = "KDTUNE_VERBOSE"
USER_ERRORS = (ConfigError, TrainingStopped)
"""Errors whose message is the whole story: printed short unless verbose."""
CHECKPOINT_ERRORS = (CheckpointError, CheckpointSaveError, UntrustedCheckpointError)
"""A checkpoint that cannot be resumed or saved: raised to in-process callers (the Python API),
printed short by the command line (``kdtune``'s console script; a recipe under torchrun)."""

DEPENDENCY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # (message regex, category, module regex): narrow, so kdtune's own warnings stay visible.
    # torchdata's StatefulDataLoader calls its own deprecated set_vital on every iterator.
    (r"'set_vital' is deprecated", UserWarning, r"torchdata\.stateful_dataloader"),
)
"""Deprecation and environment notices of dependencies that a kdtune user can do nothing
about (each matched on message, category and emitting module)."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def filter_dependency_warnings() -> None:
    """Hide :data:`DEPENDENCY_WARNINGS` (only those)."""
    for message, category, module in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def logs_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / LOGS_DIRNAME


def start_run_log(cfg: DictConfig, is_main: bool) -> None:
    """Copy every line of the run's logger (torchtune's, which kdtune uses) to
    ``<output_dir>/logs/run.log`` and write the resolved config (its path is logged, not its
    lines). Only on the main rank (``is_main``)."""
    if not is_main:
        return
    path = _add_log_file(cfg.output_dir)
    utils.get_logger().info(f"resolved config: {write_config(cfg, cfg.output_dir)}; log: {path}")


def _add_log_file(output_dir: str | Path) -> Path:
    """A handler writing the run's log lines to ``logs/run.log`` (removed when the run's
    :func:`run_context` context ends, so runs in one process keep their own files)."""
    path = logs_dir(output_dir) / "run.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    utils.get_logger().addHandler(handler)
    _run_log_handlers.append(handler)
    return path


_run_log_handlers: list[logging.Handler] = []


def write_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """The resolved config as ``<output_dir>/logs/config.yaml`` (rank 0 only)."""
    path = logs_dir(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def _worth_showing(record: logging.LogRecord) -> bool:
    """Not a debug line (torchtune's ``set_seed`` sets the shared logger to DEBUG and logs
    "Enabling cuDNN deterministic mode" even on CPU), nor an info line of torchtune's
    checkpointer."""
    if record.levelno >= logging.WARNING:
        return True
    parts = Path(record.pathname).parts
    return record.levelno >= logging.INFO and not (
        "torchtune" in parts and "checkpointing" in parts
    )


@contextmanager
def log_above_progress_bar() -> Iterator[None]:
    """A context in which log lines are written with ``tqdm.write`` (above the bar); an error
    raised inside closes the open bars first, so its message starts a line of its own."""
    with logging_redirect_tqdm(loggers=[utils.get_logger()]):
        try:
            yield
        except BaseException:
            for bar in list(tqdm._instances):  # tqdm's registry of open bars
                bar.close()
            raise


def figures(values: dict[str, Any]) -> str:
    """``"key value, ..."`` with 4 significant digits (None values left out)."""
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items() if v is not None)


@contextmanager
def run_context(output_dir: Any) -> Iterator[None]:
    """A recipe's run: dependency warnings filtered (:func:`filter_dependency_warnings`); a
    user error raised inside is recorded (:func:`record_error`), a collective's timeout
    explained (:func:`~kdtune.training.process_group.explain_timeout`), then raised again;
    debug lines and torchtune's checkpointer's info lines are dropped meanwhile; at the end the run's
    ``run.log`` handler is removed."""
    filter_dependency_warnings()
    # torchtune's checkpointer logs the staging folder it writes to (gone after the atomic
    # rename) and "saved successfully.You can ...": its info lines are dropped during the run;
    # kdtune logs the real folder ("saved checkpoint ..."). Debug lines are dropped too.
    utils.get_logger().addFilter(_worth_showing)
    try:
        yield
    except (*USER_ERRORS, *CHECKPOINT_ERRORS) as error:
        record_error(error, output_dir)
        raise
    except RuntimeError as error:
        process_group.explain_timeout(error)
        raise
    finally:
        utils.get_logger().removeFilter(_worth_showing)
        while _run_log_handlers:
            handler = _run_log_handlers.pop()
            utils.get_logger().removeHandler(handler)
            handler.close()


def record_error(error: BaseException, output_dir: Any) -> None:
    """Write the traceback of ``error`` to ``<output_dir>/logs/error.log`` when the output
    folder exists (a config error does not create it) and add a note saying where the
    traceback is (printed by :func:`run_recipe_main`)."""
    hint = f"full traceback: kdtune run --verbose, or {VERBOSE_ENV}=1"
    if os.environ.get("RANK", "0") != "0":
        return
    foreign = isinstance(error, OutputDirLockedError)  # the folder is another run's
    if isinstance(output_dir, str | Path) and Path(output_dir).is_dir() and not foreign:
        path = logs_dir(output_dir) / "error.log"
        try:
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(traceback.format_exception(error)))
            hint = f"full traceback: {path}"
        except OSError:
            pass
    error.add_note(hint)


def run_recipe_main(recipe_main: Callable[[], Any]) -> int:
    """A recipe's ``__main__`` (``kdtune run``, ``tune run``, ``torchrun -m``): a user error is
    a short message on stderr (rank 0) and exit status 1; a run stopped by a signal after its
    checkpoint says how to resume and exits with :data:`PREEMPTED_EXIT_CODE`; anything else, or
    ``KDTUNE_VERBOSE=1``, raises with its traceback."""
    try:
        recipe_main()
    except Preempted as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"kdtune: {error}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except USER_ERRORS as error:
        if verbose():
            raise
        print_user_error(error)
        return 1
    except CHECKPOINT_ERRORS as error:
        if verbose() or "TORCHELASTIC_RUN_ID" not in os.environ:
            raise  # in one process the console script prints it (kdtune.cli.main.console_main)
        print_user_error(error)
        return 1
    return 0


def exit_recipe(code: int) -> NoReturn:
    """End a recipe's process with exit status ``code`` (a recipe's ``__main__``).

    A torchrun worker whose multi-process group was torn down skips the interpreter's teardown
    (``os._exit`` after closing the log handlers and flushing stdout/stderr): at that teardown
    a rank sometimes aborted with "terminate called without an active exception" (C++ threads
    of torch.distributed's objects, still referenced by the sharded model, meeting a finalising
    interpreter; reproduced in about 1 of 12 two-process runs under load), turning a finished
    run into a failed one. Everything the run writes is closed by then. Elsewhere:
    ``sys.exit(code)``.
    """
    if process_group.group_was_torn_down():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def print_user_error(error: BaseException) -> None:
    """``kdtune: error: <message>`` and its notes on stderr, on rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        notes = "".join(f"\n{note}" for note in getattr(error, "__notes__", []))
        print(f"kdtune: error: {error}{notes}", file=sys.stderr)
