"""todi-distill: offline-teacher distillation with the ToDi loss.

Everything installed lives under this one namespace: `todi.storage`, `todi.services` and
`todi.trainer` are the repository's root folders `storage/`, `services/` and `trainer/`
(pyproject.toml maps them with setuptools `package-dir`; a wheel holds them as
`todi/storage/...`).
"""

from pathlib import Path

__version__ = "0.1.0"

# Source checkout: when this `todi/` folder is imported straight from the repository (the repo
# root on sys.path, e.g. a Ray job's working_dir or `python -m` from the root, where no
# editable-install finder maps the packages), the layer packages are its siblings. Search the
# root for `todi.<layer>` too, so the same import names resolve there as in an install.
_ROOT = Path(__file__).resolve().parent.parent
_LAYERS = ("storage", "services", "trainer")
if (
    (_ROOT / "pyproject.toml").is_file()
    and not (Path(__file__).parent / "storage").exists()
    and all((_ROOT / layer / "__init__.py").is_file() for layer in _LAYERS)
):
    __path__.append(str(_ROOT))
