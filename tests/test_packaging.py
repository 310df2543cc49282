"""The install a new user runs: the wheel holds every shipped asset and setuptools warns about nothing."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_builds_without_warnings_and_ships_every_asset(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-v", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert "BuildBackendWarning" not in log and "absent from the" not in log, [
        line for line in log.splitlines() if "Warning" in line][:5]
    (wheel,) = tmp_path.glob("latent_patch-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "latent_patch" / "assets").rglob("*") if p.is_file()}
    assert assets and not assets - shipped, sorted(assets - shipped)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "latent_patch").rglob("*.py")}
    assert not modules - shipped, sorted(modules - shipped)


def test_editable_install_builds_without_warnings(tmp_path):
    """`pip install -e .` (what the Makefile and a new user run) asks the backend for an editable wheel:
    with the flat layout and no package-dir, setuptools picks its meta-path finder, which warns
    "Editable installation" on every install (setuptools 65-80; later ones log a notice that
    package-data "may have no effect"). The explicit ``package-dir`` selects the plain .pth path."""
    code = "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert "Warning" not in log, [line for line in log.splitlines() if "Warning" in line][:5]
    (wheel,) = tmp_path.glob("latent_patch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".pth") for n in names), names
    assert not any("finder" in n for n in names), names  # the strategy that warns
