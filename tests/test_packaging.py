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
