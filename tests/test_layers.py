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


# The house map: which package may import which (besides itself and third-party code).
#   todi.common                 imports nothing of the project (the ground floor)
#   todi.storage                todi.common
#   todi.services, todi.trainer todi.storage, todi.common (never each other)
#   todi.cli, todi.demo         everything (the roof: entry points that wire the layers)
ALLOWED = {
    "todi.common": {"todi.common"},
    "todi.storage": {"todi.common", "todi.storage"},
    "todi.services": {"todi.common", "todi.storage", "todi.services"},
    "todi.trainer": {"todi.common", "todi.storage", "todi.trainer"},
}


def _layer(module: str) -> str | None:
    """The layer a `todi.` module belongs to (todi.cli and todi.demo: the roof, None)."""
    parts = module.split(".")
    if parts[0] != "todi" or len(parts) < 2:
        return None
    name = ".".join(parts[:2])
    return name if name in ALLOWED else None


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join((PACKAGES[rel[0]], *rel[1:]))
    return name.removesuffix(".__init__")


def test_layers_import_only_what_is_below_them() -> None:
    bad = []
    for path in _python_files(*PACKAGES):
        layer = _layer(_module_of(path))
        if layer is None:
            continue
        for line, name in _imports(path):
            target = _layer(name) or (name if name.split(".")[0] == "todi" else None)
            if target is not None and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name}")
    assert not bad, "forbidden imports (see the map in README's developer section):\n" + "\n".join(
        bad
    )


def test_the_layer_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself: a trainer module importing the service is found."""
    bad = tmp_path / "x.py"
    bad.write_text("from todi.services.models import prepare_model\nimport todi.trainer.data\n")
    found = [name for _, name in _imports(bad) if _layer(name) not in ALLOWED["todi.trainer"]]
    assert found == ["todi.services.models"]
