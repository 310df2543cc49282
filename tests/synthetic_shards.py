"""Latent shards + manifest in the design.md format, written with webdataset's TarWriter
independently of shards.py (so the loader and trainer tests do not trust the code they test).

Each test file says what its samples hold (``sample(i) -> (mean, std, label)``); the layout,
keys, members and manifest fields are written here once."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import webdataset as wds

from latent_patch.fsutil import sha256_file

Sample = Callable[[int], tuple[np.ndarray, np.ndarray, int]]


def npy_bytes(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=allow_pickle)
    return b.getvalue()


def write_latent_shards(root: Path, counts: Sequence[int], sample: Sample, num_classes: int,
                        latent_shape: Sequence[int], *, extra: dict | None = None,
                        sha256: bool = True, source: dict | None = None,
                        vae: dict | None = None, class_prefix: str = "c",
                        features: Callable[[int], np.ndarray] | None = None) -> Path:
    """Shard j holds ``counts[j]`` samples, numbered on across shards; sample i stores
    ``stack([mean, std])`` in fp16, its label and a json record. ``extra`` adds members to
    sample 0 (planted payloads). ``features(i)``: a (gh, gw, K) grid stored as ``repr.npy`` and
    described in the manifest's ``repr``. Returns the manifest's path."""
    root.mkdir(parents=True, exist_ok=True)
    c, r = latent_shape[0], latent_shape[1]
    entries, labels, i = [], [], 0
    for j, n in enumerate(counts):
        name = f"shard-{j:06d}.tar"
        with wds.TarWriter(str(root / name), encoder=False, mtime=0) as w:
            for _ in range(n):
                mean, std, label = sample(i)
                rec = {"__key__": f"{i:08d}_img{i}",
                       "latent.npy": npy_bytes(np.stack([mean, std]).astype(np.float16)),
                       "cls": str(label).encode(),
                       "json": json.dumps({"source": f"c/img{i}.JPEG", "flip": False}).encode()}
                if features is not None:
                    rec["repr.npy"] = npy_bytes(np.asarray(features(i), dtype=np.float16))
                if i == 0 and extra:
                    rec.update(extra)
                w.write(rec)
                labels.append(label)
                i += 1
        entries.append({"name": name, "num_samples": n,
                        "sha256": sha256_file(root / name) if sha256 else ""})
    vae = vae or {"id": str(root / "no-such-vae"), "scaling_factor": 0.5, "shift_factor": 0.0,
                  "latent_channels": c, "downsample": 4}
    manifest = {
        "format": "latent-patch-shards/1", "num_samples": i, "num_images": i,
        "class_counts": [labels.count(k) for k in range(num_classes)],
        "class_names": [f"{class_prefix}{k}" for k in range(num_classes)],
        "resolution": r * vae["downsample"], "latent_shape": list(latent_shape), "vae": vae,
        "flips": "none", "latent_stats": {"mean": [0.0] * c, "std": [1.0] * c},
        "shards": entries, "skipped": [], "source": source or {},
    }
    if features is not None:
        gh, gw, k = np.shape(features(0))
        manifest["repr"] = {"member": "repr.npy", "spec": "synthetic", "grid": [gh, gw], "dim": k, "dims": k,
                            "dtype": "float16", "pca": None}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def indexed(shape: Sequence[int], classes: int, scale: float = 1.0) -> Sample:
    """Sample i: mean filled with ``i * scale``, std with that + 0.5, class ``i % classes``: any
    batch tells which samples it holds and whether mean, std and label stayed together."""
    def sample(i: int) -> tuple[np.ndarray, np.ndarray, int]:
        return np.full(shape, i * scale), np.full(shape, i * scale + 0.5), i % classes
    return sample
