"""Every entry point refuses bad input with one ``prog: error: ...`` line and a non-zero exit,
never a traceback (issue 14): sample.py (sampling, fid, options) and the demo."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample as sample_cli  # noqa: E402
from latent_patch import demo  # noqa: E402


def _refusal(capsys, fn, argv: list[str]) -> str:
    """The one error line of a refused command (argparse's usage lines before it are allowed)."""
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.mark.parametrize("argv, prog, says", [
    (["--checkpoint", "RUN", "--out", "OUT", "--save", "foo"], "sample.py", "--save foo: only npz and png"),
    (["--checkpoint", "RUN", "--out", "OUT", "--num-samples", "-3"], "sample.py", "--num-samples: -3 must be at least 1"),
    (["--checkpoint", "RUN", "--out", "OUT", "--batch-size", "0"], "sample.py", "--batch-size: 0 must be at least 1"),
    (["fid", "--samples", "README.md", "--fid-ref", "ref.npz"], "sample.py", "README.md: not a samples .npz"),
    (["fid", "--samples", "/nonexistent/out", "--fid-ref", "ref.npz"], "sample.py",
     "--samples /nonexistent/out: no such folder or .npz file"),
    (["fid", "--samples", "configs", "--fid-ref", "ref.npz"], "sample.py", "this folder holds no samples.npz"),
])
def test_sample_py_refusals_are_one_error_line(capsys, argv, prog, says):
    line = _refusal(capsys, sample_cli.main, [str(ROOT / a) if a in ("README.md", "configs") else a for a in argv])
    assert line.startswith(f"{prog}: error: ") and says in line


def test_an_npz_without_images_is_named(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    line = _refusal(capsys, sample_cli.main, ["fid", "--samples", str(tmp_path / "other.npz"), "--fid-ref", "x"])
    assert "other.npz: no arr_0" in line and "'mu.npy'" in line


@pytest.mark.parametrize("extra, says", [
    (["bogus.key=1"], "'bogus' is not a config key"),
    (["--config", "/no/such/demo.yaml"], "config file not found: /no/such/demo.yaml"),
    (["--num-samples", "0"], "--num-samples: 0 must be at least 1"),
])
def test_demo_refusals_are_one_error_line(tmp_path, capsys, extra, says):
    line = _refusal(capsys, demo.main, ["--out", str(tmp_path / "demo"), *extra])
    assert line.startswith("python -m latent_patch.demo: error: ") and says in line
