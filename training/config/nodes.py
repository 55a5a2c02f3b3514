"""Readers of config nodes, shared by the checks and the code that builds what they name.

A ``_component_`` node names a class or function by dotted path; these read what it names,
the options it will be built with, and the files a checkpointer node loads, the same way for
the preflight and for the recipe.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

from kdtune.losses import KDLoss
from kdtune.losses.fused import FusedLinearKDLoss

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def closest(name: str, candidates: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def interpolated_keys(cfg: DictConfig) -> set[str]:
    """Top-level names that some value refers to as ``${name...}`` (e.g. ``assets_dir``)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            found.update(_INTERPOLATION.findall(node))

    walk(container)
    return found


def component_class(node: Any) -> Any:
    """The object a ``_component_`` node names (imported), or None for a null node."""
    if node is None:
        return None
    return _get_component_from_path(str(node["_component_"]))


def component_options(node: DictConfig) -> dict[str, Any]:
    """The options a component is built with: its signature defaults, then the node's values.

    Used to read e.g. ``kd_loss.temperature`` when the YAML relies on the class default.
    """
    target = component_class(node)
    options: dict[str, Any] = {}
    for name, param in inspect.signature(target).parameters.items():
        if param.default is not inspect.Parameter.empty:
            options[name] = param.default
    for key, value in node.items():
        if key != "_component_":
            options[str(key)] = value
    return options


def is_kdtune_loss(cls: Any) -> bool:
    """The one test of "a kdtune loss" (it takes ``num_tokens``, the step's token count)."""
    return isinstance(cls, type) and issubclass(cls, KDLoss)


def is_fused_loss(node: Any) -> bool:
    """True when a loss node names :class:`kdtune.losses.fused.FusedLinearKDLoss` (or a subclass)."""
    if node is None:
        return False
    cls = component_class(node)
    return isinstance(cls, type) and issubclass(cls, FusedLinearKDLoss)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def component_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    """Every ``_component_`` node under ``node`` (depth first) with its dotted path."""
    if isinstance(node, DictConfig):
        if "_component_" in node:
            yield path, node
        for key in node:
            yield from component_nodes(node._get_node(key), f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from component_nodes(node._get_node(index), f"{path}[{index}]")


def accepted_options(target: Callable) -> list[str] | None:
    """The keyword options ``target`` accepts, or None when it takes ``**kwargs`` that cannot be
    followed. A class whose ``__init__`` passes ``**kwargs`` up its bases (kdtune's losses) is
    followed through its MRO until an ``__init__`` without ``**kwargs`` closes the list."""
    signatures = []
    if inspect.isclass(target):
        signatures = [vars(k)["__init__"] for k in target.__mro__ if "__init__" in vars(k)]
    else:
        signatures = [target]
    names: list[str] = []
    for function in signatures:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return None
        names += [n for n, p in parameters.items() if p.kind not in _VARIADIC and n != "self"]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return list(dict.fromkeys(names))
    return None


_VARIADIC = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def checkpoint_files(node: DictConfig) -> list[str]:
    """The file names a torchtune checkpointer node loads (list form or filename_format form)."""
    files = node.checkpoint_files
    if isinstance(files, DictConfig):
        count = int(str(files.max_filename))
        width = len(str(files.max_filename))
        return [
            str(files.filename_format).format(str(i).zfill(width), str(files.max_filename))
            for i in range(1, count + 1)
        ]
    return [str(file) for file in files]


def normalize_null_components(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` where a top-level ``{_component_: null, ...}`` node is null.

    torchtune's override rule rewrites ``teacher_model=null`` on the command line into
    ``teacher_model._component_=null`` (the key holds a component); this makes such an override
    mean what it says. ``cfg`` itself is left unchanged.
    """
    cfg = cfg.copy()
    for key in list(cfg.keys()):
        node = cfg._get_node(key)
        is_component = isinstance(node, DictConfig) and "_component_" in node
        if is_component and node._get_node("_component_")._is_none():
            cfg[key] = None
    return cfg


def kd_vocab_columns(cfg: DictConfig) -> int | None:
    """``kd_loss.vocab_columns`` (None: the vocabularies must match)."""
    if cfg.kd_loss is None:
        return None
    return component_options(cfg.kd_loss).get("vocab_columns")
