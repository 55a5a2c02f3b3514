"""The ``kdtune`` command: names, ls, cp, validate and how run launches recipes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdtune.cli import main as cli
from kdtune.cli.registry import list_recipes, resolve_recipe
from kdtune.training.config.loading import (
    CONFIG_DIR,
    UnknownNameError,
    config_recipe,
    list_configs,
    load_config,
    resolve_config,
)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_names_resolve_to_shipped_recipes_and_configs():
    assert "knowledge_distillation" in list_recipes()
    assert resolve_recipe("knowledge_distillation") == "kdtune.recipes.knowledge_distillation"
    assert resolve_recipe("kdtune/recipes/knowledge_distillation.py") == (
        "kdtune.recipes.knowledge_distillation"
    )
    assert REPO_CONFIGS.resolve() == CONFIG_DIR
    expected = {
        p.relative_to(REPO_CONFIGS).with_suffix("").as_posix() for p in REPO_CONFIGS.rglob("*.yaml")
    }
    assert set(list_configs()) == expected
    assert resolve_config("tiny/full_chunked") == CONFIG_DIR / "tiny" / "full_chunked.yaml"
    assert all(config_recipe(name) == "knowledge_distillation" for name in list_configs())


def test_unknown_names_suggest_close_ones(capsys):
    with pytest.raises(UnknownNameError, match="tiny/full_chunked"):
        resolve_config("tiny/full_chunkd")
    with pytest.raises(UnknownNameError, match="knowledge_distillation"):
        resolve_recipe("knowledge_distilation")
    assert cli.main(["run", "knowledge_distilation", "--config", "tiny/full_chunked"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


def test_config_path_wins_over_names(tmp_path):
    local = tmp_path / "mine.yaml"
    shutil.copyfile(CONFIG_DIR / "tiny" / "full_chunked.yaml", local)
    assert resolve_config(str(local)) == local


def test_ls_lists_every_config_under_its_recipe(capsys):
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RECIPE", "CONFIG"]
    assert out[1].split()[0] == "knowledge_distillation"
    assert {line.split()[-1] for line in out[1:]} == set(list_configs())


def test_cp_copies_and_refuses_to_overwrite(tmp_path, capsys):
    destination = tmp_path / "edit" / "my_kd.yaml"
    assert cli.main(["cp", "tiny/lora_chunked", str(destination)]) == 0
    assert destination.read_text() == (CONFIG_DIR / "tiny" / "lora_chunked.yaml").read_text()
    destination.write_text("edited")
    assert cli.main(["cp", "tiny/lora_chunked", str(destination)]) == 1
    assert "exists" in capsys.readouterr().err and destination.read_text() == "edited"
    assert cli.main(["cp", "tiny/lora_chunked", str(destination), "--force"]) == 0
    assert destination.read_text() != "edited"
    assert cli.main(["cp", "llama3_2/8B_to_1B_lora", str(tmp_path)]) == 0
    assert (tmp_path / "8B_to_1B_lora.yaml").is_file()


def test_overrides_merge_like_the_recipe_parser():
    cfg = load_config(
        CONFIG_DIR / "tiny" / "full_chunked.yaml", ["kd_ratio=0.25", "teacher_model=null"]
    )
    assert cfg.kd_ratio == 0.25
    # torchtune's rule for component keys: the override lands on _component_ (the recipe's
    # config checks then treat the node as null)
    assert cfg.teacher_model._component_ is None


def test_arguments_that_are_not_overrides_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "knowledge_distillation", "--config", "tiny/full_chunked", "oops"])
    assert "key=value" in capsys.readouterr().err


def test_single_process_run_executes_the_recipe_module(monkeypatch):
    seen = {}

    def fake_run_module(module, run_name, alter_sys):
        seen.update(module=module, run_name=run_name, argv=list(sys.argv))

    monkeypatch.setattr(cli.runpy, "run_module", fake_run_module)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main(["run", "knowledge_distillation", "--config", "tiny/full_chunked", "a=1"]) == 0
    assert seen["module"] == "kdtune.recipes.knowledge_distillation"
    assert seen["run_name"] == "__main__"
    config_path = str(CONFIG_DIR / "tiny" / "full_chunked.yaml")
    assert seen["argv"] == ["kdtune.recipes.knowledge_distillation", "--config", config_path, "a=1"]


def test_nproc_per_node_launches_torchrun_with_the_module(monkeypatch):
    import torch.distributed.run as torchrun

    launched = []
    monkeypatch.setattr(torchrun, "run", launched.append)
    argv = [
        "run",
        "--nproc_per_node",
        "2",
        "knowledge_distillation",
        "--config",
        "tiny/full_chunked",
        "a=1",
    ]
    assert cli.main(argv) == 0
    (args,) = launched
    assert args.nproc_per_node == "2" and args.standalone and args.module
    assert args.training_script == "kdtune.recipes.knowledge_distillation"
    assert args.training_script_args == [
        "--config",
        str(CONFIG_DIR / "tiny" / "full_chunked.yaml"),
        "a=1",
    ]


def test_command_table_is_open_for_more_subcommands(monkeypatch, capsys):
    called = []
    extra = cli.Command(
        "say hello",
        lambda parser: parser.add_argument("--name"),
        lambda a: called.append(a.name) or 0,
    )
    monkeypatch.setitem(cli.COMMANDS, "hello", extra)
    assert cli.main(["hello", "--name", "kd"]) == 0
    assert called == ["kd"]


@pytest.mark.slow
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "kdtune"
    result = subprocess.run([str(script), "ls"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tiny/full_chunked" in result.stdout


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x00\x01\x02\xff\xfe binary", "cannot be read as YAML"),
        (b"42\n", "holds a"),
        (b"- a\n- b\n", "holds a"),
    ],
)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_config_file_that_is_not_a_mapping_is_one_line_naming_it(
    command, content, words, tmp_path, capsys
):
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    argv = ["run", "knowledge_distillation"] if command == "run" else ["validate"]
    assert cli.main([*argv, "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kdtune: error: config ") and str(path) in err and words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
