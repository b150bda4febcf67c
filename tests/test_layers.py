"""The package's layers (docs/architecture.md): each module imports only from its own layer or
the layers above it, never from one below.  Every import is read with ``ast``, those inside
functions included (a deferred import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: docs/architecture.md's order, top (imported by all) to bottom (imports all): package -> (layer,
#: side); the two sides of layer 1 sit side by side and do not import each other
LAYERS: dict[str, tuple[int, str]] = {
    "ggraft.errors": (0, "base"), "ggraft.compat": (0, "base"),
    "ggraft.hf": (1, "hf"), "ggraft.gguf_io": (1, "gguf_io"),
    "ggraft.mmproj": (2, "mmproj"), "ggraft.converters": (2, "mmproj"),
    "ggraft.pair": (3, "pair"),
    "ggraft.jobs": (4, "jobs"),
    "ggraft.cli": (5, "cli"),
}
#: where each package's files lie (ggraft.converters ships from converters/)
SOURCES = {"ggraft": ROOT / "ggraft", "ggraft.converters": ROOT / "converters"}


def layer_of(module: str) -> tuple[int, str] | None:
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def module_name(package: str, folder: Path, path: Path) -> str:
    parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
    return ".".join([package, *parts])


def imported(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, name) of everything ``tree`` imports, as a dotted name: ``from a import b`` is
    ``a.b`` (so ``from ggraft import compat`` is ``ggraft.compat``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - node.level + 1]
                base = ".".join(here + ([node.module] if node.module else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def upward_imports() -> list[str]:
    problems = []
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            module = module_name(package, folder, path)
            own = layer_of(module)
            if own is None:  # the package root (ggraft/__init__.py) sits above the layers
                continue
            for line, target in imported(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"):
                theirs = layer_of(target)
                if theirs is None:
                    continue
                if theirs[0] > own[0] or (theirs[0] == own[0] and theirs[1] != own[1]):  # below, or beside
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer {own[0]}) imports {target} "
                                    f"(layer {theirs[0]})")
    return problems


def test_no_module_imports_from_a_layer_below_it():
    problems = upward_imports()
    assert not problems, "imports against the layers of docs/architecture.md:\n" + "\n".join(problems)


def test_imports_are_resolved_deferred_and_relative_ones_included():
    tree = ast.parse("def f():\n    from ..pair.check import check_pair\nfrom ggraft import jobs\nimport gguf\n")
    targets = sorted(t for _, t in imported(tree, "ggraft.mmproj.writer", False))
    assert targets == ["ggraft.jobs", "ggraft.pair.check.check_pair", "gguf"]
    assert [layer_of(t) for t in targets] == [(4, "jobs"), (3, "pair"), None]
