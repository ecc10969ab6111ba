"""The code's structure: no import cycles, every module imports alone, short functions, module docstrings."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("splitwiser", "jobs")
MAX_FUNCTION_LINES = 50


def modules() -> dict[str, Path]:
    """Every module of PACKAGES by dotted name, a package by its own name: {"splitwiser.job": .../job.py}."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its file (in functions, under
    TYPE_CHECKING): `from a import b` imports a.b where that is a module, and a unless all its names are."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""  # from .x import y
            source = ".".join(part for part in (base, node.module) if part)
            submodules = {f"{source}.{alias.name}" for alias in node.names} & known
            targets |= submodules if len(submodules) == len(node.names) else submodules | {source}
    while any(target not in known and "." in target for target in targets):  # import a.b.c → the module a.b
        targets = {target if target in known else target.rpartition(".")[0] for target in targets}
    return {target for target in targets if target in known} - {name}


def chain(graph: dict[str, list[str]], start: str, goal: str) -> list[str] | None:
    """The shortest import chain [start, ..., goal] of at least one step, or None."""
    chains, queue = {start: [start]}, [start]
    for name in queue:
        for target in graph[name]:
            if target == goal:
                return chains[name] + [goal]
            if target not in chains:
                chains[target] = chains[name] + [target]
                queue.append(target)
    return None


def import_cycles() -> list[list[str]]:
    """The shortest import cycle [a, b, ..., a] through each module, less those that share an import (an
    edge) with a shorter one: each cycle listed needs its own fix."""
    found = modules()
    graph = {name: sorted(imported(name, path, set(found))) for name, path in found.items()}
    cycles, edges = [], set()
    for cycle in sorted(filter(None, (chain(graph, name, name) for name in graph)), key=lambda c: (len(c), c)):
        if not edges & set(zip(cycle, cycle[1:])):
            cycles.append(cycle)
            edges |= set(zip(cycle, cycle[1:]))
    return cycles


# The libraries the modules import, imported once by the process that forks one child per module: each child then
# imports its module (and what that imports of ours) first, as a fresh interpreter would, in well under a second.
LIBRARIES = ["numpy", "torch", "transformers", "datasets", "pyarrow.parquet", "hydra", "omegaconf", "tqdm"]
FORK_EACH = """
import importlib, os, sys
for library in sys.argv[1].split(","):
    importlib.import_module(library)
for at, name in enumerate(sys.argv[2:]):
    if at >= 4:  # four at a time
        os.wait()
    if os.fork() == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}\t{type(e).__name__}: {e}".replace("\\n", " "), flush=True)
            os._exit(1)
        os._exit(0)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def imported_alone(names: list[str]) -> dict[str, str]:
    """The modules that cannot be imported first in an interpreter, each with its error."""
    result = subprocess.run([sys.executable, "-c", FORK_EACH, ",".join(LIBRARIES), *names], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method in `tree`, nested ones as outer.inner."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        scoped = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        yield from functions(node, f"{prefix}{node.name}." if scoped else prefix)


def test_no_import_cycles():
    """No module of splitwiser or jobs imports, even lazily, a module that imports it back."""
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_every_module_imports_alone():
    """Each module imports first in an interpreter (beside the libraries): none depends on another of ours having
    been imported."""
    failed = imported_alone(sorted(modules()))
    assert not failed, "modules that cannot be imported alone:\n" + "\n".join(f"{n}: {e}" for n, e in failed.items())


def test_functions_are_at_most_50_lines():
    """No function or method is longer than 50 lines, from its def to its last line."""
    long = [f"{path.relative_to(ROOT)}:{name}:{length}"
            for path in modules().values()
            for name, node in functions(ast.parse(path.read_text()))
            if (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_every_module_has_a_docstring():
    """Every module says what it is for (an empty __init__.py needs not)."""
    missing = [str(path.relative_to(ROOT)) for path in modules().values()
               if path.read_text().strip() and ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, "modules without a docstring:\n" + "\n".join(missing)
