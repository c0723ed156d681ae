"""The layout of the test suite, read from the sources with `ast`:

- shared code comes from tests/helpers.py (or tests/slurm_cluster.py): no file under tests/
  imports a test module (`tests.test_*`) or conftest.py;
- a real `ssl-kd` process is started only by tests/helpers.py (`run_cli`, `start_cli`,
  `run_python`): no other file builds a `python -m ssl_kd.cli` command, and a file that starts
  processes itself (subprocess, os.system, ...) names the CLI nowhere, so its processes are
  other programs (tensorboard, the eval/bench scripts, the Slurm daemons and clients).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SHARED = {"tests.helpers", "tests.slurm_cluster"}  # the modules other files may import
RUNNER = "helpers.py"  # the one file that starts `ssl-kd` processes
CLI_MODULE = "ssl_kd.cli"
# what starts a process: these modules, and these functions of `os`
PROCESS_MODULES = {"subprocess", "pty", "multiprocessing"}
PROCESS_OS_CALLS = ("system", "popen", "exec", "spawn", "posix_spawn", "fork")


def sources() -> list[Path]:
    return sorted(TESTS.glob("*.py"))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_test_modules(tree: ast.Module) -> list[str]:
    """The `tests.*` modules a file imports (anywhere, also inside functions), as dotted names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("tests.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from .test_x import y`, `from . import conftest`
                base = "tests" + (f".{node.module}" if node.module else "")
            elif node.module == "tests" or (node.module or "").startswith("tests."):
                base = node.module or ""
            else:
                continue
            if base == "tests":  # `from tests import helpers`: the names are modules
                found += [f"tests.{alias.name}" for alias in node.names]
            else:
                found.append(base)
    return found


def strings(tree: ast.Module) -> list[str]:
    """String constants that are values, not docstrings or other bare string statements."""
    bare = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare
    ]


def names_the_cli(text: str) -> bool:
    return CLI_MODULE in text or text.strip() == "ssl-kd" or text.endswith("/ssl-kd")


def cli_commands(tree: ast.Module) -> list[int]:
    """Lines of list or tuple displays holding "-m", "ssl_kd.cli" in a row: a CLI argv."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple):
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            if ("-m", CLI_MODULE) in itertools.pairwise(values):
                lines.append(node.lineno)
    return lines


def starts_processes(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(
            alias.name.split(".")[0] in PROCESS_MODULES for alias in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            PROCESS_MODULES
        ):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name.startswith(PROCESS_OS_CALLS) for alias in node.names)
        ):
            return True
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr.startswith(PROCESS_OS_CALLS)
        ):
            return True
        if (  # asyncio.create_subprocess_exec / _shell
            isinstance(node, ast.Attribute) and node.attr.startswith("create_subprocess")
        ):
            return True
    return False


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.name)
def test_shared_code_comes_from_the_helper_modules(path: Path) -> None:
    imported = imported_test_modules(parse(path))
    assert set(imported) <= SHARED, (
        f"{path.name} imports {sorted(set(imported) - SHARED)}: move what it needs to "
        "tests/helpers.py (test modules and conftest.py are not for importing)"
    )


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.name)
def test_only_the_helpers_start_the_cli(path: Path) -> None:
    tree = parse(path)
    if path.name == RUNNER:
        assert cli_commands(tree), "helpers.py no longer builds the `-m ssl_kd.cli` command"
        return
    assert not cli_commands(tree), (
        f"{path.name} builds a `-m ssl_kd.cli` command at lines {cli_commands(tree)}: "
        "use tests.helpers.run_cli or start_cli"
    )
    if starts_processes(tree):
        named = [text for text in strings(tree) if names_the_cli(text)]
        assert not named, (
            f"{path.name} starts processes and names the CLI ({named[0]!r}): start `ssl-kd` "
            "with tests.helpers.run_cli, start_cli or run_python"
        )


def test_the_rules_catch_what_they_forbid() -> None:
    """The checks above on sources that break them (so that they are not vacuous)."""
    bad_imports = (
        "from tests.conftest import tiny_config\nimport tests.test_dmae\n"
        "from .test_data import write_digit_folder\nfrom tests import conftest, helpers\n"
        "def f():\n    from tests.test_x import y\n"
    )
    assert imported_test_modules(ast.parse(bad_imports)) == [
        "tests.conftest", "tests.test_dmae", "tests.test_data", "tests.conftest",
        "tests.helpers", "tests.test_x",
    ]  # fmt: skip
    runner = ast.parse(
        'import subprocess, sys\nSSL_KD = [sys.executable, "-m", "ssl_kd.cli"]\n'
        'subprocess.run([sys.executable, "-c", "from ssl_kd.cli import main"])\n'
    )
    assert cli_commands(runner) == [2]
    assert starts_processes(runner)
    assert [s for s in strings(runner) if names_the_cli(s)] == [
        "ssl_kd.cli",
        "from ssl_kd.cli import main",
    ]
    assert starts_processes(ast.parse("import os\nos.system('ssl-kd train x.yaml')\n"))
    assert starts_processes(ast.parse("from subprocess import Popen\n"))
    assert not starts_processes(ast.parse('"""subprocess"""\nfrom ssl_kd.cli import main\n'))
    assert strings(ast.parse('"""Runs `python -m ssl_kd.cli`."""\n')) == []
