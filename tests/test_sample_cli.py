"""sample.py's flags that users rely on: --cfg-interval parsing, --classes, --weights model / --no-ema.

Runs sample.py's main in process on a tiny DiT checkpoint and a tiny VAE (the helpers of
tests/test_sampling.py), on the CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sample as sample_cli
from latent_patch import checkpoint as ck
from latent_patch import fsutil
from tests.test_sampling import _tiny_vae, _write_checkpoint, load_npz

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run whose model.safetensors differs from its ema.safetensors (same shapes, so DONE's sizes hold)."""
    root = tmp_path_factory.mktemp("cli")
    _tiny_vae(root / "vae")
    _write_checkpoint(root / "run", root / "vae")
    ckpt = ck.find_latest(root / "run")
    ema = ck.load_weights(ckpt, ck.EMA_FILE)
    gen = torch.Generator().manual_seed(5)
    model = {k: v + 0.2 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in ema.items()}
    ck.save_weights(ckpt / ck.MODEL_FILE, model, {})
    ck.verify(ckpt)  # still a complete, undamaged checkpoint
    return root / "run"


def _sample(run: Path, out: Path, *flags: str) -> tuple[np.ndarray, np.ndarray, dict]:
    sample_cli.main(["--checkpoint", str(run), "--out", str(out), "--num-samples", "5", "--batch-size", "5",
                     "--steps", "2", "--save", "npz", "--grid", "0", "--no-progress", *flags])
    arr, labels = load_npz(out)
    return arr, labels, json.loads((out / "sampling.json").read_text())["identity"]


def test_cfg_interval_is_parsed_and_lo_above_hi_refused(run, tmp_path, capsys):
    _, _, ident = _sample(run, tmp_path / "ok", "--cfg-scale", "2.0", "--cfg-interval", "0.3,5")
    assert ident["sampler"]["cfg_interval"] == [0.3, 5.0] and ident["sampler"]["cfg_scale"] == 2.0
    capsys.readouterr()
    for bad, why in (("5,0.3", "expected LO,HI with LO <= HI"), ("1,2,3", "expected LO,HI"), ("x,1", "invalid")):
        with pytest.raises(SystemExit) as err:
            _sample(run, tmp_path / "bad", "--cfg-interval", bad)
        assert err.value.code == 2  # argparse's usage error, before any work
        msg = capsys.readouterr().err
        assert "--cfg-interval" in msg and why in msg, msg
        assert not (tmp_path / "bad").exists()


def test_classes_cycle_through_the_list(run, tmp_path, capsys):
    arr, labels, ident = _sample(run, tmp_path / "out", "--classes", "7,2,9")
    assert labels.tolist() == [7, 2, 9, 7, 2] and ident["classes"] == [7, 2, 9]
    # the labels reach the model: sample i with class c is sample i of a run whose list is just c
    one, one_labels, _ = _sample(run, tmp_path / "seven", "--classes", "7")
    assert one_labels.tolist() == [7] * 5
    assert np.array_equal(arr[0], one[0]) and np.array_equal(arr[3], one[3])
    assert not np.array_equal(arr[1], one[1])  # same noise, class 2 instead of 7
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a class the model does not have is refused, naming the range
        _sample(run, tmp_path / "bad", "--classes", "3,10")
    assert "every class must lie in 0..9" in capsys.readouterr().err


def test_weights_model_uses_model_safetensors(run, tmp_path):
    ckpt = ck.find_latest(run)
    ema, _, ident_ema = _sample(run, tmp_path / "ema")
    model, _, ident_model = _sample(run, tmp_path / "model", "--weights", "model")
    no_ema, _, ident_no_ema = _sample(run, tmp_path / "no_ema", "--no-ema")
    assert not np.array_equal(ema, model)  # the two files really differ
    assert np.array_equal(model, no_ema) and ident_model == ident_no_ema
    assert ident_model["weights"] == "model" and ident_ema["weights"] == "ema"
    assert ident_model["weights_sha256"] == fsutil.sha256_file(ckpt / ck.MODEL_FILE)
    assert ident_ema["weights_sha256"] == fsutil.sha256_file(ckpt / ck.EMA_FILE)
    # the model weights' images are exactly what the EMA path makes from the same tensors
    swapped = tmp_path / "swapped"
    shutil.copytree(ckpt, swapped)
    shutil.copyfile(ckpt / ck.MODEL_FILE, swapped / ck.EMA_FILE)
    via_ema, _, _ = _sample(swapped, tmp_path / "via_ema")
    assert np.array_equal(via_ema, model)
