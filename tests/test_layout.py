"""The package's shape: no import cycle, no private name crossing modules, layers in one direction.

Layers, top to bottom (a module may call into its own layer or any layer below it):

    startup (init), training/, cluster/ and model/ (tools)  ->  handles (the asynchronous API)
      ->  fusion  ->  timing/  ->  uneven, stall
      ->  collectives (the front doors)  ->  agreement  ->  algorithms/  ->  transport/
      ->  context, config, choice, ops, files, cli

The import test reads the source (imports inside functions count; imports under
`if TYPE_CHECKING:` do not, as they never run). The call-path test traces real all-reduces
(tests/test_mpi_layout.py) with these same layers.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ringsync"

LAYERS = [
    ("ringsync.startup", "ringsync.training", "ringsync.cluster", "ringsync.model"),
    ("ringsync.handles",),
    ("ringsync.fusion",),
    ("ringsync.timing",),
    ("ringsync.uneven", "ringsync.stall"),
    ("ringsync.collectives",),
    ("ringsync.agreement",),
    ("ringsync.algorithms",),
    ("ringsync.transport",),
    ("ringsync.context", "ringsync.config", "ringsync.choice", "ringsync.ops", "ringsync.files", "ringsync.cli"),
]


def layer(module: str) -> int | None:
    """The layer index of a ringsync module (0 is the top), or None for the package itself."""
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(imported ringsync module, line, imported names) for every import that runs."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] == "ringsync"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ringsync":
                continue
            names = [a.name for a in node.names]
            # `from . import timing` imports the module ringsync.timing
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            if submodules:
                found += [(m, node.lineno, []) for m in submodules]
            else:
                found.append((target, node.lineno, names))
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m, _, _ in imports(name, path, known) if m in known and m != name}
            for name, path in mods.items()}


def test_no_import_cycle_among_ringsync_modules():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_only_go_down_the_layers():
    # The package's own __init__ gathers the public API, and the ringsync-train command drives
    # the package through it (import ringsync as rs): both sit above every layer.
    wrong = []
    for name, targets in import_graph().items():
        for target in targets:
            a, b = layer(name), layer(target)
            if a is not None and b is not None and b < a:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that climb back up a layer: " + "; ".join(sorted(wrong))


def test_no_private_name_is_used_across_modules():
    mods = modules()
    known = set(mods)
    found = []
    for name, path in mods.items():
        text = path.read_text()
        for target, line, names in imports(name, path, known):
            found += [f"{name}:{line} imports {n} from {target}" for n in names if n.startswith("_")]
        if "__wrapped__" in text:
            found.append(f"{name} uses __wrapped__")
        # module._name on a module imported from ringsync
        tree = ast.parse(text)
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                aliases.update(a.asname or a.name for a in node.names)
            if isinstance(node, ast.Import):
                aliases.update((a.asname or a.name).split(".")[0] for a in node.names if "ringsync" in a.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "private names used across modules: " + "; ".join(found)


def test_no_private_names_that_look_like_dunders():
    looks_like_dunder = re.compile(r"\bdef (_[a-z][a-z0-9_]*[a-z0-9]_)\(")
    found = [f"{name}: {m}" for name, path in modules().items()
             for m in looks_like_dunder.findall(path.read_text())]
    assert not found, found


def test_every_module_has_a_layer():
    assert [n for n in modules() if n != "ringsync" and layer(n) is None] == []


def test_the_cluster_tool_is_off_the_data_path():
    """ringsync.cluster (emulated hosts) is a tool: no library module imports it, it imports
    nothing of the library but the command-line helpers, and importing it starts no MPI."""
    graph = import_graph()
    users = [m for m, targets in graph.items() if not m.startswith("ringsync.cluster")
             and any(t.startswith("ringsync.cluster") for t in targets)]
    assert not users, users
    used = {t for m, targets in graph.items() if m.startswith("ringsync.cluster") for t in targets}
    assert {t for t in used if not t.startswith("ringsync.cluster")} == {"ringsync.cli"}
    code = "import sys, ringsync.cluster.cli, ringsync.cluster.agent; print('mpi4py.MPI' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=60, cwd=ROOT.parent)
    assert done.stdout.strip() == "False", done


def test_every_public_name_is_what_it_says_after_any_import():
    """ringsync's names load on first use (ringsync/__init__.py): importing a submodule first
    must not leave its module where a function of the same name belongs (rs.join once was)."""
    names = sorted(modules())
    code = ("import importlib, types, ringsync as rs\n"
            f"for m in {names!r}:\n"
            "    importlib.import_module(m)\n"
            "print([n for n in rs.__all__ if isinstance(getattr(rs, n), types.ModuleType) and n != 'timing'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=60, cwd=ROOT.parent)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done
