"""The code's structure: imports point down the layers (docs/layout.md), with no cycle.

Every import in every project module counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runtime.local import ROOT

# package -> the packages it may import (itself always). Product code never imports tooling.
ALLOWED = {
    "embcap": set(),
    "gateway": {"embcap"},
    "export": {"embcap"},
    "model_repository": {"embcap"},
    "runtime": {"embcap", "gateway", "export"},
    "tooling": {"embcap", "export", "runtime"},  # shared by the tools below
    "bench": {"embcap", "gateway", "export", "runtime", "tooling"},
    "evaluate": {"embcap", "gateway", "export", "runtime", "tooling"},
    "doctor": {"embcap", "gateway", "export", "runtime", "tooling"},
    "training": {"embcap", "export", "runtime", "tooling", "evaluate", "bench"},
    "server": {"runtime"},
    "inference": {"gateway"},
}
ENTRY_POINTS = ("server", "inference")  # single files at the root
MAX_LINES = 250  # a longer module states why at its top ("Longer than ...")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the project outside tests/."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        top = relative.parts[0].removesuffix(".py")
        if top not in ALLOWED or (len(relative.parts) == 1) != (top in ENTRY_POINTS):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (the deepest module each import names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def package(module: str) -> str:
    return module.split(".")[0]


def test_the_project_modules_are_found():
    modules = project_modules()
    for name in ("embcap.contract", "gateway.protocol", "runtime.serve", "export.options", "server", "inference",
                 "model_repository.decoder.1.model"):
        assert name in modules


def test_imports_point_down_the_layers():
    wrong = [f"{module} imports {target}" for module, targets in graph().items() for target in sorted(targets)
             if package(target) != package(module) and package(target) not in ALLOWED[package(module)]]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]) if target in path
                              else f"{node} -> {target}")
            elif target not in state:
                visit(target, path + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(project_modules().values()), ids=lambda p: str(p.relative_to(ROOT)))
def test_long_modules_say_why_at_their_top(path):
    lines = path.read_text().splitlines()
    if len(lines) > MAX_LINES:
        head = "\n".join(lines[:40])
        assert "Longer than" in head, f"{len(lines)} lines and no reason stated at the top"


def test_the_http_process_never_imports_torch():
    """server.py's own process (gateway + supervisor) stays light: torch loads only in the export, the probe
    and the Triton stubs, which are other processes."""
    import subprocess
    import sys

    code = ("import sys, server, runtime.serve, gateway.app, runtime.supervisor; "
            "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers', 'onnxruntime') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("path", sorted(project_modules().values()), ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_take_no_abbreviations(path):
    """argparse's default takes a prefix for a flag: `--engine` would silently mean `--engine-cache-dir`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "ArgumentParser", "add_parser"):
            flags = {k.arg: k.value for k in node.keywords}
            assert "allow_abbrev" in flags and getattr(flags["allow_abbrev"], "value", None) is False, \
                f"line {node.lineno}: {path.name} builds a parser without allow_abbrev=False"
