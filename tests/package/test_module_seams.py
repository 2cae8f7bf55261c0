"""Modules use each other's public names only: no import of, or attribute access to, another
module's ``_``-prefixed name anywhere in the package or the benchmarks."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
OWN_PACKAGES = ("prefopt_kernels", "benchmarks")
# The compiled extension is private to the package as a whole; only its bridge imports it.
EXTENSION = {"prefopt_kernels.backends.native": "_C"}


def _sources():
    return sorted(p for package in OWN_PACKAGES for p in (ROOT / package).rglob("*.py"))


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _violations(path: pathlib.Path, root: pathlib.Path = ROOT) -> list:
    module = _module_name(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    found, imported_modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            source = _resolve(module, node, path.name == "__init__.py")
            if not source.startswith(OWN_PACKAGES):
                continue
            if any(_private(part) for part in source.split(".")):
                found.append(f"{path.name}:{node.lineno} imports from private module {source}")
            for alias in node.names:
                if _private(alias.name) and EXTENSION.get(module) != alias.name:
                    found.append(f"{path.name}:{node.lineno} imports {source}.{alias.name}")
                imported_modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(OWN_PACKAGES):
                    imported_modules.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in imported_modules and EXTENSION.get(module) != node.attr):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_names(path):
    assert _violations(path) == []


def test_the_check_catches_private_imports_and_attributes(tmp_path):
    """The check itself fails on each kind of violation."""
    package = tmp_path / "prefopt_kernels"
    package.mkdir()
    sample = package / "sample.py"
    sample.write_text("from . import ops\nfrom .ops import _RowLayout\nfrom ._common import x\n"
                      "import prefopt_kernels.linear as lin\nops._pick_backend()\nlin._run()\nops.public()\n")
    found = _violations(sample, tmp_path)
    assert len(found) == 4, found
