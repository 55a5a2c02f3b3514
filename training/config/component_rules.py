"""Phase-1 rules for ``_component_`` nodes: they import, take the keys they are given, and
accept their values.

Every node's keys are compared with what its target accepts (followed through ``**kwargs``
up a class's bases); number-typed options are type-checked; the losses, optimizer and
scheduler are built with their real options, so a value their constructor rejects is named
by its key here, from the one place that range is written (the constructor).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from kdtune.training.config.errors import Problems
from kdtune.training.config.nodes import (
    accepted_options,
    closest,
    component_class,
    component_nodes,
    is_number,
)


def _check_component_keys(path: str, node: DictConfig, problems: Problems) -> Callable | None:
    """The component imports, and each of the node's keys is a parameter it takes."""
    try:
        target = component_class(node)
    except Exception as error:  # import problems of any kind are reported, not raised
        # torchtune's message spans lines ("Error loading ...", the cause, a question): the cause
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = next((line for line in lines if "Error(" in line), lines[-1] if lines else "")
        problems.error(
            f"{path}._component_ = {node['_component_']!r} cannot be imported: {cause}; check "
            "the dotted path and that its package is installed",
            path,
        )
        return None
    names = accepted_options(target)
    if names is None:
        return target  # takes **kwargs that go nowhere we can see: any key may be meant for it
    for key in node:
        key = str(key)
        if key != "_component_" and key not in names:
            problems.error(
                f"{path}.{key}: {node['_component_']} has no option '{key}'"
                f"{closest(key, names)}; its options are {names}",
                f"{path}.{key}",
            )
    return target


def check_by_building(cfg: DictConfig, problems: Problems) -> None:
    """Build the cheap components with their real options (the losses, and the optimizer and
    scheduler on one stand-in parameter), so a value they reject is reported here, naming the
    key, not at step 1. A key with a problem already reported is not built again."""
    from torchtune import config

    for key in ("loss", "kd_loss", "optimizer", "lr_scheduler"):
        if isinstance(cfg.get(key), DictConfig):
            _check_option_types(key, cfg[key], problems)
    for key in ("loss", "kd_loss"):
        node = cfg.get(key)
        if node is None or problems.blocks(key):
            continue
        try:
            config.instantiate(node)
        except Exception as error:
            _report_rejected_option(key, node, error, problems)
    optimizer_node = cfg.get("optimizer")
    if optimizer_node is None or problems.blocks("optimizer"):
        return
    try:
        optimizer = config.instantiate(optimizer_node, [nn.Parameter(torch.zeros(1))])
    except Exception as error:
        problems.error(
            f"optimizer: {optimizer_node['_component_']} rejects its options: {error}", "optimizer"
        )
        return
    scheduler_node = cfg.get("lr_scheduler")
    if scheduler_node is None or problems.blocks("lr_scheduler"):
        return
    try:
        config.instantiate(scheduler_node, optimizer, num_training_steps=1)
    except Exception as error:
        problems.error(
            f"lr_scheduler: {scheduler_node['_component_']} rejects its options: {error}",
            "lr_scheduler",
        )


def _report_rejected_option(
    key: str, node: DictConfig, error: Exception, problems: Problems
) -> None:
    """A constructor's error, keyed by the option it names first (kdtune's losses start their
    messages with the argument's name: ``temperature must be ...``), else by the node."""
    message = str(error)
    for name in node:
        name = str(name)
        if name != "_component_" and message.startswith(f"{name} "):
            problems.error(
                f"{key}.{name} = {node[name]!r}: {node['_component_']} rejects it: {message}",
                f"{key}.{name}",
            )
            return
    problems.error(f"{key}: {node['_component_']} rejects its options: {message}", key)


def _check_option_types(key: str, node: DictConfig, problems: Problems) -> None:
    """An option whose default (or, without one, its annotation) is a number, or whose default
    is a tuple of numbers (``betas``), must be one: ``optimizer.lr=fast`` is named here instead
    of surfacing as a ``TypeError`` inside the component."""
    try:
        parameters = inspect.signature(component_class(node)).parameters
    except Exception:
        return  # import problems are reported by check_components
    for name, value in node.items():
        param = parameters.get(str(name))
        if param is None:
            continue
        expected = _expected_type(param)
        if expected is None or _has_type(value, expected):
            continue
        default = (
            ""
            if param.default is inspect.Parameter.empty
            else f"; its default is {param.default!r}"
        )
        problems.error(
            f"{key}: {node['_component_']} rejects its options: {key}.{name} = {value!r} is "
            f"not {expected}{default}",
            f"{key}.{name}",
        )


def _expected_type(param: inspect.Parameter) -> str | None:
    """ "a number", "a list of N numbers" or None (not checked) for a component parameter."""
    default = param.default
    if default is inspect.Parameter.empty:
        numeric = param.annotation in (int, float, "int", "float")
        return "a number" if numeric else None
    if is_number(default):
        return "a number"
    if isinstance(default, tuple) and default and all(is_number(v) for v in default):
        return f"a list of {len(default)} numbers"
    return None


def _has_type(value: Any, expected: str) -> bool:
    if expected == "a number":
        return is_number(value)
    size = int(expected.split()[3])
    sequence = isinstance(value, ListConfig | list | tuple)
    return sequence and len(value) == size and all(is_number(v) for v in value)


def check_components(cfg: DictConfig, problems: Problems) -> None:
    for key in cfg:
        for path, node in component_nodes(cfg._get_node(key), str(key)):
            _check_component_keys(path, node, problems)
