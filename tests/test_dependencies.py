"""The package's dependency direction (DESIGN.md): entry points → engine → methods → {models,
masking, losses, flops, data}; no two parts import each other, directly or round a loop."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_kd"
# Parts that must stay free of the config, the engine and the methods.
PURE = ("masking", "adaptive", "models", "losses", "flops", "schedules", "seeding", "files",
        "errors")  # fmt: skip
ENTRY_POINTS = ("cli", "cli_eval", "launch", "engine", "run_config")


def part_of(module: str) -> str:
    """`ssl_kd.engine.trainer` → `engine`: a sub-package or a top-level module."""
    return module.split(".")[1]


def import_graph() -> dict[str, set[str]]:
    """Part → the parts it imports (anywhere in its files, also inside functions)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = part_of(".".join(relative.parts)) if len(relative.parts) > 1 else "ssl_kd"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("ssl_kd.") and part_of(name) != source:
                    graph[source].add(part_of(name))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_no_import_cycle_between_parts_of_the_package():
    assert find_cycle(import_graph()) is None, find_cycle(import_graph())


def test_the_cycle_finder_finds_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_pure_parts_never_import_the_config_the_engine_or_a_method():
    graph = import_graph()
    for part in PURE:
        assert not graph.get(part, set()) & {"config", "engine", "methods", "run_config"}, part


def test_methods_never_import_the_engine_or_an_entry_point():
    assert not import_graph()["methods"] & set(ENTRY_POINTS)
