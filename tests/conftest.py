"""Shared offline fixtures: a tiny random VAE (no hub access needed) and image-tree builders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Idle OpenMP threads sleep rather than spin (as encode_latents.py sets for itself): on a shared,
# oversubscribed CPU spinning threads made the tiny VAE 10-100x slower. Must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from faults.common import pinned_threads  # noqa: E402  (imports no torch)

_MODES = ("RGB", "L", "RGBA", "P", "CMYK")

# Thread counts: every run whose bits a test compares runs at faults.THREADS torch threads, in
# this process (these fixtures, faults.call_cli) and in the processes tests start
# (faults.child_env): CPU kernels split their sums by thread count, so two counts may round
# differently on some CPU. Tiny tensors also run faster on one thread, without OpenMP stalls on a
# shared CPU.


@pytest.fixture(scope="module")
def one_thread_per_module():
    """faults.THREADS torch threads for the whole module (the caller's count restored after)."""
    with pinned_threads():
        yield


@pytest.fixture
def one_thread():
    """faults.THREADS torch threads for one test: the count of the processes tests start (torchrun
    workers), so in-process references are bitwise comparable with them (the sampling tests)."""
    with pinned_threads():
        yield


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random diffusers AutoencoderKL (4 latent channels, downsampling 4) saved to a folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                        sample_size=32)
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return path


def save_image(path: Path, rng: np.random.Generator, mode: str, size: tuple[int, int]) -> None:
    """A random image converted to ``mode`` (PNG for alpha/palette modes, JPEG otherwise)."""
    w, h = size
    im = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)
    im.save(path, "PNG" if path.suffix.lower() == ".png" else "JPEG")


def make_class_tree(root: Path, per_class: int = 33, classes: int = 3, seed: int = 0,
                    bad: bool = True, empty_class: bool = True) -> dict[str, int]:
    """``root/c<k>/img_<k>_<i>.<ext>`` in mixed modes and sizes, plus bad files and noise.

    Returns counts: good images, bad files. Hidden files and an empty class folder are added to
    check they are ignored / kept as a class."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = root / f"c{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mode = _MODES[i % len(_MODES)]
            ext = "png" if mode in ("RGBA", "P") else "JPEG"
            size = tuple(int(x) for x in rng.integers(12, 72, size=2))
            save_image(d / f"img_{k}_{i}.{ext}", rng, mode, size)
    n_bad = 0
    if bad:
        d = root / "c0"
        (d / "zero.JPEG").write_bytes(b"")
        (d / "text.JPEG").write_text("not an image\n")
        buf = io.BytesIO()
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
        (d / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
        n_bad = 3
    (root / "c1" / ".hidden.JPEG").write_text("ignored")
    (root / ".hidden_dir").mkdir(exist_ok=True)
    if empty_class:
        (root / f"c{classes}_empty").mkdir(exist_ok=True)
    return {"good": per_class * classes, "bad": n_bad}


@pytest.fixture(scope="session")
def class_tree():
    """The :func:`make_class_tree` builder, as a fixture (test files import nothing from here)."""
    return make_class_tree


@pytest.fixture
def fresh_accelerate():
    """faults.THREADS torch threads (the runs a training test compares run at one count; the 2-core
    test machine is shared: more threads only contend) and a clean accelerate singleton, since
    tests switch mixed precision."""
    from accelerate.state import AcceleratorState, GradientState

    with pinned_threads():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        yield
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training tests' shards (tests/trainkit.py): 64 learnable 4 x 8 x 8 latents in 10
    classes. Loader tests define their own ``shards`` fixture, which takes precedence."""
    from tests.trainkit import write_train_shards

    return write_train_shards(tmp_path_factory.mktemp("shards"))
