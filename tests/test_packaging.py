"""The distribution builds cleanly and installs: `python -m build` makes a wheel and an sdist
with no deprecation warning (the license is an SPDX expression, PEP 639), and the wheel,
installed into a fresh virtualenv, gives a working `todi` and the three layers.

Offline and fast: the build uses this environment's setuptools (`--no-isolation`), and the
fresh venv installs only the wheel (`--no-deps`); the project's dependencies come from this
environment's site-packages through a `.pth` line, which adds them after the venv's own
site-packages (so `todi` itself is the wheel's copy, checked below) and does not run this
environment's editable-install hook.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("`build` is not installed (a dev dependency: `make setup`)", pytrace=False)
    out = tmp_path_factory.mktemp("dist")
    leftovers = [ROOT / "todi_distill.egg-info", ROOT / "build"]
    existed = {p for p in leftovers if p.exists()}
    try:
        proc = _run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)]
        )
    finally:  # setuptools writes these into the source tree: leave it as it was
        for p in set(leftovers) - existed:
            shutil.rmtree(p, ignore_errors=True)
    log = proc.stdout + proc.stderr
    # setuptools reports deprecated metadata (e.g. a TOML-table license) as a
    # SetuptoolsDeprecationWarning in the build's output.
    bad = [line for line in log.splitlines() if "deprecat" in line.lower()]
    assert not bad, "the build warned:\n" + "\n".join(bad)
    return out


def test_wheel_and_sdist_carry_the_spdx_license_and_every_package(dist: Path) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    wheels = list(dist.glob(f"todi_distill-{version}-*.whl"))
    sdists = list(dist.glob(f"todi_distill-{version}.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        meta = whl.read(f"todi_distill-{version}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines(), meta[:2000]
    for layer in ("storage", "services", "trainer", "common"):
        assert f"todi/{layer}/__init__.py" in names, f"the wheel has no todi/{layer}"
    assert "todi/services/backends/__init__.py" in names
    with tarfile.open(sdists[0]) as sdist:
        members = sdist.getnames()
    top = f"todi_distill-{version}"
    for path in ("pyproject.toml", "README.md", "storage/__init__.py", "trainer/__init__.py"):
        assert f"{top}/{path}" in members, f"the sdist has no {path}"


def test_the_wheel_installs_and_runs_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    # Nothing of this checkout on the path (PYTHONPATH would make pip see it as installed).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    vpy = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(vpy), "-c", purelib], env=env).stdout.strip())
    wheel = next(dist.glob("*.whl"))
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps",
          "--no-index", "--quiet", str(wheel)], env=env, cwd=tmp_path)  # fmt: skip
    assert (venv / "bin" / "todi").is_file(), "the wheel installed no `todi` console script"
    # Then the dependencies, from this environment (appended to sys.path: the venv's own
    # first; added after the install, or pip would see this checkout's editable install).
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "todi-test-deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    help_text = _run([str(venv / "bin" / "todi"), "--help"], env=env, cwd=tmp_path).stdout
    for command in ("serve", "precompute", "train", "eval"):
        assert command in help_text, help_text
    code = (
        "import todi.storage, todi.services, todi.trainer, todi.cli\n"
        "for m in (todi.storage, todi.services, todi.trainer, todi.cli):\n"
        "    print(m.__file__)\n"
    )
    files = _run([str(vpy), "-c", code], env=env, cwd=tmp_path).stdout.split()
    assert len(files) == 4
    for f in files:  # the wheel's copy, not this checkout nor its editable install
        assert Path(f).is_relative_to(site), f"{f} is not from the installed wheel ({site})"
