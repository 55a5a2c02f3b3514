"""Names of shipped recipes (and, from :mod:`kdtune.training.config.loading`, of configs).

A recipe name is a module of :mod:`kdtune.recipes` that defines ``recipe_main``
(``knowledge_distillation``). Configs are found and loaded one floor down, where the tools
that are not the CLI (the teacher-cache build, the demos) read them too.
"""

from __future__ import annotations

import pkgutil

import kdtune.recipes
from kdtune.training.config.loading import (  # noqa: F401  (the CLI's names, in one place)
    CONFIG_DIR,
    UnknownNameError,
    config_recipe,
    list_configs,
    load_config,
    resolve_config,
    unknown_name,
)

RECIPE_PACKAGE = kdtune.recipes.__name__


def list_recipes() -> list[str]:
    """Recipe names: public modules of :mod:`kdtune.recipes`."""
    names = [
        info.name
        for info in pkgutil.iter_modules(kdtune.recipes.__path__)
        if not info.name.startswith("_")
    ]
    return sorted(names)


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
    raise unknown_name("recipe", name, list_recipes())
