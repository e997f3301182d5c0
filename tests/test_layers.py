"""The house rules of the import graph, checked on the source (no imports run).

Everything installed lives under `todi.`: the root folders `storage/`, `services/`, `trainer/`
install as `todi.storage`, `todi.services`, `todi.trainer`, never under their bare names.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> its import name.
PACKAGES = {
    "todi": "todi",
    "storage": "todi.storage",
    "services": "todi.services",
    "trainer": "todi.trainer",
}
BARE = {"storage", "services", "trainer"}


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_bare_top_level_package_imports() -> None:
    """`import storage` works only from the repo root by accident; installed, it is absent."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: import {name}"
        for path in _python_files(*PACKAGES, "tests", "bench")
        for line, name in _imports(path)
        if name.split(".")[0] in BARE
    ]
    assert not bad, "use the todi.* import names:\n" + "\n".join(bad)


def test_wheel_maps_every_package_under_todi() -> None:
    """pyproject.toml lists every source package under its `todi.` name."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]
    expected = set()
    for folder, name in PACKAGES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((name, *rel)))
        if folder != name:
            assert dirs[name] == folder
    assert set(tool["packages"]) == expected
