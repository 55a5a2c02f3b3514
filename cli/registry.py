"""Names of shipped recipes and configs, and loading a config the way the recipe does.

A recipe name is a module of :mod:`kdtune.recipes` that defines ``recipe_main``
(``knowledge_distillation``). A config name is a YAML's path under ``kdtune/configs`` without
``.yaml`` (``tiny/full_chunked``); the recipe a config belongs to is the one its opening
comment runs (``kdtune run <recipe> --config <name>``).
"""

from __future__ import annotations

import argparse
import difflib
import pkgutil
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune.config._utils import _merge_yaml_and_cli_args

import kdtune.configs
import kdtune.recipes

CONFIG_DIR = Path(kdtune.configs.__file__).resolve().parent
RECIPE_PACKAGE = kdtune.recipes.__name__
_RUN_COMMAND = re.compile(r"kdtune run\s+(?:--nproc_per_node\s+\S+\s+)?([\w.]+)")


class UnknownNameError(LookupError):
    """An unknown recipe or config name; the message lists the close matches."""


def list_recipes() -> list[str]:
    """Recipe names: public modules of :mod:`kdtune.recipes`."""
    names = [
        info.name
        for info in pkgutil.iter_modules(kdtune.recipes.__path__)
        if not info.name.startswith("_")
    ]
    return sorted(names)


def list_configs() -> list[str]:
    """Config names, e.g. ``tiny/full_chunked``."""
    return sorted(
        path.relative_to(CONFIG_DIR).with_suffix("").as_posix()
        for path in CONFIG_DIR.rglob("*.yaml")
    )


def config_recipe(name: str) -> str | None:
    """The recipe a shipped config's opening comment runs (``kdtune run <recipe> ...``)."""
    head = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[:20]
    for line in head:
        match = _RUN_COMMAND.search(line)
        if match:
            return match.group(1)
    return None


def _unknown(kind: str, name: str, known: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} '{name}'.{hint} `kdtune ls` lists them.")


def resolve_recipe(name: str) -> str:
    """The module to run: a shipped recipe name, or a dotted module path as given.

    ``kdtune/recipes/knowledge_distillation.py`` style paths are accepted too (like ``tune run``).
    """
    if name in list_recipes():
        return f"{RECIPE_PACKAGE}.{name}"
    if name.endswith(".py"):
        name = name[: -len(".py")].replace("/", ".")
    if "." in name:
        return name
    raise _unknown("recipe", name, list_recipes())


def resolve_config(name_or_path: str) -> Path:
    """A shipped config name (``tiny/full_chunked``) or the path of a YAML file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise _unknown("config", name_or_path, list_configs())


def load_config(path: Path, overrides: list[str]) -> DictConfig:
    """The YAML merged with ``key=value`` overrides, exactly as ``@config.parse`` builds it."""
    yaml_args = argparse.Namespace(**OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    return _merge_yaml_and_cli_args(yaml_args, overrides)
