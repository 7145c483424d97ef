"""Which core-library files a piece of code runs: a file's ``simlm_core`` imports, followed
through every module they import in turn.

The workflow lists these files as each stage's inputs, so editing any module a stage runs
reruns that stage (DESIGN.md §4c) and no hand-kept list can miss one. Imports are read from the
source (``ast``), nothing is imported: lazy imports inside functions count too, and a package's
``__init__`` counts for its modules.
"""
from __future__ import annotations

import ast
import os
from collections.abc import Iterable

__all__ = ["core_imports", "core_module_closure"]

PACKAGE = "simlm_core"


def core_imports(path: str | os.PathLike[str]) -> set[str]:
    """The dotted ``simlm_core`` names a file imports, anywhere in it (``from pkg import name``
    gives both ``pkg`` and ``pkg.name``: the name may be a module). Relative imports are refused:
    the library uses none, and they could not be followed from the source alone."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"{path}:{node.lineno}: relative import; write simlm_core.<module>")
            if node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == PACKAGE}


def _module_file(root: str, name: str) -> str | None:
    """The file of dotted module ``name`` under ``root`` (the folder holding ``simlm_core``)."""
    path = os.path.join(root, *name.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    return path if os.path.isfile(path) else None


def core_module_closure(files: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str]) -> list[str]:
    """``files`` and every ``simlm_core`` file they import, directly or not, sorted. ``root``: the
    folder that holds the ``simlm_core`` package."""
    root = os.fspath(root)
    todo = [os.fspath(f) for f in files]
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such core-library file: {path}")
        seen.add(path)
        names = set(core_imports(path))
        relative = os.path.relpath(path, root)
        if relative.split(os.sep)[0] == PACKAGE:  # a library file: importing it runs its packages' __init__
            names.add(os.path.splitext(relative)[0].replace(os.sep, "."))
        for name in names:
            parts = name.split(".")
            for depth in range(2, len(parts) + 1):  # a package's __init__ runs before its modules
                found = _module_file(root, ".".join(parts[:depth]))
                if found is not None:
                    todo.append(found)
    return sorted(seen)
