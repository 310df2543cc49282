"""Encoding with decode workers (the GPU default: DataLoader worker processes decode and crop the
images) writes the very shards that inline decoding (workers=0, the CPU default) writes.

Same VAE, same torch thread count (the VAE's fp32 numerics depend on it), so the tars must be
byte-identical and the manifests equal; bad files are skipped in workers the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latent_patch import encode as enc
from latent_patch.encode import run_encode
from tests.test_encode import cfg_for, read_out, shard_bytes


def shard_hashes(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in shard_bytes(out).items()}

pytestmark = pytest.mark.slow  # worker processes


def _count_workers(monkeypatch) -> list:
    used: list = []
    real = enc.make_loader

    def make_loader(*a, **k):
        dl = real(*a, **k)
        used.append(dl.num_workers)
        return dl

    monkeypatch.setattr(enc, "make_loader", make_loader)
    return used


def test_decode_workers_write_the_shards_of_inline_decoding(tmp_path, class_tree, tiny_vae_dir, monkeypatch):
    src = tmp_path / "src"
    counts = class_tree(src, per_class=10, classes=3)  # mixed modes and sizes, 3 bad files, an empty class
    used = _count_workers(monkeypatch)
    run_encode(cfg_for(src, tmp_path / "inline", tiny_vae_dir, workers=0))
    run_encode(cfg_for(src, tmp_path / "workers", tiny_vae_dir, workers=2))
    assert used == [0, 2]
    inline, workers = shard_hashes(tmp_path / "inline"), shard_hashes(tmp_path / "workers")
    assert len(inline) >= 3 and inline == workers
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("inline", "workers"))
    assert a == b and [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["num_images"] == counts["good"] and len(a["skipped"]) == counts["bad"] + 1  # + the empty class


def test_decode_workers_read_tar_sources_the_same(tmp_path, tiny_vae_dir, monkeypatch):
    """Tar members are read by offset in each worker (no file handle shared across the fork)."""
    rng = np.random.default_rng(7)
    for t in range(2):
        with tarfile.open(tmp_path / f"data-{t:06d}.tar", "w") as tf:
            for n in range(9):
                buf = io.BytesIO()
                Image.fromarray((rng.random((20 + n, 24, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(n % 3).encode())):
                    ti = tarfile.TarInfo(f"s{t}_{n}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    used = _count_workers(monkeypatch)
    spec = str(tmp_path / "data-{000000..000001}.tar")
    run_encode(cfg_for(spec, tmp_path / "inline", tiny_vae_dir, workers=0, flips="none"))
    run_encode(cfg_for(spec, tmp_path / "workers", tiny_vae_dir, workers=3, flips="none"))
    assert used == [0, 3]
    assert shard_hashes(tmp_path / "inline") == shard_hashes(tmp_path / "workers")
    got = read_out(tmp_path / "workers")
    assert len(got) == 18 and {v[1] for v in got.values()} == {0, 1, 2}
