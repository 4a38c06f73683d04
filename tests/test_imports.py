"""The import graph of xinfluence's core modules has no circles."""

from __future__ import annotations

import ast
from pathlib import Path

import xinfluence

ROOT = Path(xinfluence.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["xinfluence", *path.relative_to(ROOT).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _edges(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the xinfluence modules it imports anywhere (module level, under
    TYPE_CHECKING and inside functions); a submodule's import of its own parent
    packages is left out (Python runs those first anyway)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    edges[mod].add(name)
    return edges


def test_modules_import_no_circle() -> None:
    mods = _modules()
    edges = {m: {t for t in ts if t in mods} for m, ts in _edges(mods).items()}
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(mod) :] + [mod]))
        if mod in done:
            return
        for target in sorted(edges[mod]):
            visit(target, [*path, mod])
        done.add(mod)

    for mod in sorted(edges):
        visit(mod, [])
