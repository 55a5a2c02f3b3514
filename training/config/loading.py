"""Finding and loading a config: shipped names, YAML paths, and ``key=value`` overrides.

A config name is a YAML's path under ``kdtune/configs`` without ``.yaml``
(``tiny/full_chunked``); the recipe a config belongs to is the one its opening comment runs
(``kdtune run <recipe> --config <name>``). :func:`load_config` builds the config exactly as
the recipe's ``@config.parse`` does, so every tool reads it the same way.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune.config._utils import _merge_yaml_and_cli_args

import kdtune.configs
from kdtune.training.config.errors import ConfigError

CONFIG_DIR = Path(kdtune.configs.__file__).resolve().parent


_RUN_COMMAND = re.compile(r"kdtune run\s+(?:--nproc_per_node\s+\S+\s+)?([\w.]+)")


class UnknownNameError(LookupError):
    """An unknown recipe or config name; the message lists the close matches."""


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


def unknown_name(kind: str, name: str, known: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} '{name}'.{hint} `kdtune ls` lists them.")


def resolve_config(name_or_path: str) -> Path:
    """A shipped config name (``tiny/full_chunked``) or the path of a YAML file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise unknown_name("config", name_or_path, list_configs())


def load_config(path: Path, overrides: list[str]) -> DictConfig:
    """The YAML merged with ``key=value`` overrides, exactly as ``@config.parse`` builds it.

    Raises:
        ConfigError: the file is not a YAML mapping of keys (binary, a scalar, a list, bad
            YAML), naming the file.
    """
    try:
        loaded = OmegaConf.load(path)
    except OSError as error:
        if "Invalid loaded object type" not in str(error):  # OmegaConf's words for a scalar
            raise ConfigError(f"config {path} cannot be read: {error}") from None
        kind = str(error).rsplit(":", 1)[-1].strip()
        raise ConfigError(
            f"config {path} holds a {kind}, not a mapping of recipe keys: pass a YAML file "
            "of key: value lines (copy one with `kdtune cp`)"
        ) from None
    except Exception as error:  # YAML or encoding errors: a file the user must fix
        raise ConfigError(
            f"config {path} cannot be read as YAML ({type(error).__name__}: {error}): "
            "pass a YAML file of recipe keys (copy one with `kdtune cp`)"
        ) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"config {path} holds a {type(loaded).__name__}, not a mapping of recipe keys: "
            "pass a YAML file of key: value lines (copy one with `kdtune cp`)"
        )
    yaml_args = argparse.Namespace(**OmegaConf.to_container(loaded, resolve=False))
    return _merge_yaml_and_cli_args(yaml_args, overrides)
