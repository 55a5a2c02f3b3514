"""README.md and docs/*.md stay true to the code: commands parse, config names exist, links
resolve, the key table is the schema's.

Rules, applied to the lines of ```bash, ```sh and ```console fences (a line ending in ``\\``
continues on the next; ``$ `` prompts and ``#`` comments are dropped; ``&&`` and ``;`` separate
commands):

- a command whose program is ``kdtune`` (or a path ending in ``/kdtune``) parses with the CLI's
  own parsers: :func:`kdtune.cli.main.build_parser`, then the delegated ``demo``/``eval``
  parser, with the CLI's rule that what is left over must be ``key=value`` overrides;
- ``<...>`` is a placeholder and ``$(...)`` a shell expression: each is replaced by one word
  before parsing, and is not looked up as a config name;
- every config named by ``--config`` (in ``kdtune``, ``tune run`` and ``torchrun`` lines) or by
  ``kdtune cp NAME`` is a shipped config (:func:`list_configs`), a YAML file in the repository,
  or a ``.yaml`` path that a ``kdtune cp`` in the same fence creates;
- every relative link ``](path)`` names an existing file (anchors are not checked).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from kdtune.cli.main import COMMANDS, DELEGATED, build_parser
from kdtune.demo.cli import demo_parser, eval_parser
from kdtune.training.config.loading import list_configs
from kdtune.training.config.schema import BLOCK_FIELDS, FIELDS, markdown_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_LANGS = {"bash", "sh", "console", "shell"}
PLACEHOLDER = "PLACEHOLDER"


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def shell_fences(text: str) -> list[list[str]]:
    """The logical lines (continuations joined) of each shell fence, in order."""
    fences, current, pending = [], None, ""
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if match and current is None:
            current = [] if match.group(1) in SHELL_LANGS else False
            continue
        if line.strip() == "```" and current is not None:
            if current is not False:
                fences.append(current)
            current, pending = None, ""
            continue
        if not current and current != []:
            continue
        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        current.append(pending + stripped)
        pending = ""
    return fences


def replace_shell_expressions(line: str) -> str:
    """``$(...)`` (nested parentheses and quotes included) and ``<...>`` become one word."""
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, quote, j = 0, None, i + 1
            while j < len(line):
                char = line[j]
                if quote:
                    quote = None if char == quote else quote
                elif char in "'\"":
                    quote = char
                else:
                    depth += {"(": 1, ")": -1}.get(char, 0)
                    if depth == 0:
                        break
                j += 1
            out.append(PLACEHOLDER)
            i = j + 1
        else:
            out.append(line[i])
            i += 1
    return re.sub(r"<[^<>]*>", PLACEHOLDER, "".join(out))


def commands(line: str) -> list[list[str]]:
    """The argv of each command on a logical shell line (comments dropped)."""
    words = shlex.split(replace_shell_expressions(line), comments=True)
    argvs, current = [], []
    for word in words:
        if word in ("&&", ";", "||"):
            argvs.append(current)
            current = []
        else:
            current.append(word)
    argvs.append(current)
    return [argv for argv in argvs if argv]


def is_kdtune(program: str) -> bool:
    return program == "kdtune" or program.endswith("/kdtune")


def config_names(argv: list[str]) -> list[str]:
    names = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--config"]
    names += [word.split("=", 1)[1] for word in argv if word.startswith("--config=")]
    if is_kdtune(argv[0]) and argv[1:2] == ["cp"] and len(argv) > 2:
        names.append(argv[2])
    return names


def collect() -> list[tuple[str, list[str], set[str]]]:
    """(page, argv, .yaml paths created by ``kdtune cp`` in the same fence) per command."""
    found = []
    for page in PAGES:
        for fence in shell_fences(page.read_text()):
            argvs = [argv for line in fence for argv in commands(line)]
            created = {
                argv[3]
                for argv in argvs
                if is_kdtune(argv[0]) and argv[1:2] == ["cp"] and len(argv) > 3
            }
            found += [(page_id(page), argv, created) for argv in argvs]
    return found


ALL_COMMANDS = collect()
KDTUNE_COMMANDS = [(page, argv) for page, argv, _ in ALL_COMMANDS if is_kdtune(argv[0])]


def test_the_docs_hold_commands_to_check():
    pages = {page for page, _ in KDTUNE_COMMANDS}
    assert "README.md" in pages and len(pages) >= 6, pages
    assert len(KDTUNE_COMMANDS) >= 25


def parse(argv: list[str]) -> None:
    """Parse ``kdtune`` arguments as :func:`kdtune.cli.main.main` does, without running."""
    if argv[:1] == ["demo"] and "--real" in argv:
        argv = ["smollm2", "demo", *(arg for arg in argv[1:] if arg != "--real")]
    if argv and argv[0] in DELEGATED:
        sub = {"demo": demo_parser, "eval": eval_parser}.get(argv[0])
        if sub is None:  # assets, smollm2: their own entry points; the name must exist
            return
        _, extra = sub().parse_known_args(argv[1:])
        bad = [word for word in extra if "=" not in word]
        assert not bad, f"unrecognized arguments {bad}"
        return
    args, extra = build_parser().parse_known_args(argv)
    assert args.command is not None, "no subcommand"
    if COMMANDS[args.command].takes_overrides:
        bad = [word for word in extra if "=" not in word and not word.startswith("~")]
    else:
        bad = extra
    assert not bad, f"unrecognized arguments {bad}"


@pytest.mark.parametrize(
    ("page", "argv"), KDTUNE_COMMANDS, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in KDTUNE_COMMANDS]
)
def test_every_kdtune_command_parses(page, argv):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            parse(argv[1:])
    except SystemExit as exit_:  # --help exits 0; a parse error exits 2
        assert exit_.code == 0, f"{page}: `{' '.join(argv)}`: {stderr.getvalue().strip()}"
    except AssertionError as error:
        raise AssertionError(f"{page}: `{' '.join(argv)}`: {error}") from None


def test_every_config_named_exists():
    shipped = set(list_configs())
    problems, checked = [], 0
    for page, argv, created in ALL_COMMANDS:
        for name in config_names(argv):
            if PLACEHOLDER in name:
                continue
            checked += 1
            if name in shipped or name in created or (ROOT / name).is_file():
                continue
            problems.append(f"{page}: `{' '.join(argv)}`: config {name!r} does not exist")
    assert not problems, "\n".join(problems)
    assert checked >= 20


def relative_links(text: str) -> list[str]:
    """The targets of the relative ``](path)`` links outside code fences."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [
        target
        for target in re.findall(r"\]\(([^)\s]+)\)", text)
        if not re.match(r"[a-z]+://|#|mailto:", target)
    ]


def dead_links(text: str, folder: Path) -> list[str]:
    return [t for t in relative_links(text) if not (folder / t.split("#", 1)[0]).exists()]


def test_every_relative_link_resolves():
    problems, checked = [], 0
    for page in [*PAGES, ROOT / "benchmarks" / "README.md"]:
        text = page.read_text()
        checked += len(relative_links(text))
        problems += [
            f"{page_id(page)}: link ({t}) names no file" for t in dead_links(text, page.parent)
        ]
    assert not problems, "\n".join(problems)
    assert checked >= 15


def test_key_table_is_the_schema():
    page = (ROOT / "docs" / "configs.md").read_text()
    assert markdown_table() in page, (
        "docs/configs.md's key table differs from the schema; regenerate it with "
        "`python -m kdtune.training.config.schema` and paste the output under '## Keys'"
    )


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in (  # .ci/run and newcomers rely on these exact lines
        "bash scripts/setup.sh && .venv/bin/kdtune demo",
        "bash scripts/setup.sh --dev && .venv/bin/python -m pytest -q",
        "bash scripts/setup.sh --real && .venv/bin/kdtune demo --real",
    ):
        assert command in readme


def test_the_parsing_rules_bite():
    """The checks above fail on a broken command, a missing config and a dead link."""
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parse(["run", "knowledge_distillation"])  # --config is required
    with pytest.raises(AssertionError):
        parse(["validate", "--config", "x.yaml", "stray"])
    with pytest.raises(AssertionError):
        parse(["demo", "--no-such-option"])
    (fence,) = shell_fences(
        "```bash\nkdtune cp a/b ./x.yaml && \\\n  kdtune run r --config ./x.yaml\n```\n"
    )
    assert [commands(line) for line in fence] == [
        [["kdtune", "cp", "a/b", "./x.yaml"], ["kdtune", "run", "r", "--config", "./x.yaml"]]
    ]
    assert commands("kdtune run r --config $(python -c \"print('(')\") # c") == [
        ["kdtune", "run", "r", "--config", PLACEHOLDER]
    ]
    assert config_names(["kdtune", "cp", "tiny/x", "./y.yaml"]) == ["tiny/x"]
    assert dead_links("[a](docs/configs.md#keys) [b](docs/nothing.md) [c](#x)", ROOT) == [
        "docs/nothing.md"
    ]


def test_architecture_lists_every_module():
    """docs/architecture.md names every module of every package (regenerate its lists from the
    tree when one is added: each row is `pkg/module.py` and the first line of its docstring)."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    packages = [path.parent for path in ROOT.glob("*/__init__.py")]
    packages += [path.parent for path in ROOT.glob("training/*/__init__.py")]
    missing = [
        path.relative_to(ROOT).as_posix()
        for package in packages
        if package.name not in ("tests", "configs")
        for path in sorted(package.glob("*.py"))
        if path.name != "__init__.py" and f"`{path.relative_to(ROOT).as_posix()}`" not in page
    ]
    assert not missing, f"docs/architecture.md does not list {missing}"


def test_every_benchmark_result_file_says_its_command():
    """benchmarks/README.md names every file kept in benchmarks/results/ (with its command)."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    table = readme[readme.index("# Result files") :]
    missing = [
        path.name
        for path in sorted((ROOT / "benchmarks" / "results").iterdir())
        if f"`{path.name}/" not in table  # a folder of one run's files: `name/{...}`
        and f"`{path.name.split('.')[0]}." not in table
    ]
    assert not missing, f"benchmarks/README.md does not say what made {missing}"


def test_yaml_excerpts_use_known_keys():
    """Every ```yaml excerpt in README.md and docs/ loads, and its keys are schema keys (top
    level, and the keys of blocks such as on_policy)."""
    import yaml

    problems, checked = [], 0
    for page in PAGES:
        for block in re.findall(r"^```yaml\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            data = yaml.safe_load(block)
            checked += 1
            for name, value in data.items():
                if name not in FIELDS:
                    problems.append(f"{page_id(page)}: unknown key {name!r}")
                elif isinstance(value, dict) and f"{name}." in "".join(BLOCK_FIELDS):
                    problems += [
                        f"{page_id(page)}: unknown key {name}.{sub}"
                        for sub in value
                        if f"{name}.{sub}" not in BLOCK_FIELDS
                    ]
    assert not problems, "\n".join(problems)
    assert checked >= 2


def resolves(dotted: str) -> bool:
    """``kdtune.a.b.C`` names an importable module, or an attribute chain under one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_every_named_kdtune_object_exists():
    """Every `kdtune.x.y` in backticks names a module or an object in it."""
    names = {
        (page_id(page), name)
        for page in PAGES
        for name in re.findall(r"`(kdtune\.[A-Za-z0-9_.]*[A-Za-z0-9_])", page.read_text())
    }
    missing = [f"{page}: {name}" for page, name in sorted(names) if not resolves(name)]
    assert not missing, "\n".join(missing)
    assert len(names) >= 20
    assert not resolves("kdtune.training.no_such_module")
    assert not resolves("kdtune.losses.NoSuchLoss")
