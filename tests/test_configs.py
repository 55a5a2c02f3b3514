"""Every shipped YAML loads, and every ``_component_`` in it (at any depth) imports."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.yaml"))


def _component_paths(node: object) -> list[str]:
    """Every ``_component_`` value in a loaded config, depth first."""
    found: list[str] = []
    if isinstance(node, DictConfig):
        for key, value in node.items_ex(resolve=False):
            if key == "_component_":
                found.append(str(value))
            else:
                found.extend(_component_paths(value))
    elif isinstance(node, ListConfig):
        for value in node:
            found.extend(_component_paths(value))
    return found


def test_component_walker_sees_nested_nodes():
    cfg = OmegaConf.create(
        {"a": {"_component_": "x.y", "b": [{"_component_": "z.w"}]}, "c": {"_component_": "q"}}
    )
    assert _component_paths(cfg) == ["x.y", "z.w", "q"]


def test_configs_exist():
    assert CONFIG_FILES, f"no YAML found under {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_loads_and_components_import(path: Path):
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig), f"{path} is not a mapping"
    for dotpath in _component_paths(cfg):
        assert _get_component_from_path(dotpath) is not None, dotpath


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_opens_with_its_command(path: Path):
    """Each config's comment block gives the exact command that runs it."""
    head = path.read_text().splitlines()[:15]
    assert any("kdtune run" in line or "tune run" in line for line in head), path
