"""The shard set's manifest: names of the files and the manifest (assembled from the shards'
sidecars, written atomically, read back with every field checked); ``verify`` checks a set.

Layout of a shard folder (docs/design.md)::

    shard-000000.tar  shard-000000.json (sidecar)  ...  manifest.json  job.json

Shard locations come from the manifest as plain relative paths only; a manifest cannot make the
reader open a URL, an absolute path or a file outside its folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .. import fsutil

FORMAT = "latent-patch-shards/1"
MANIFEST = "manifest.json"
JOB_FILE = "job.json"
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class ShardError(ValueError):
    """A shard or manifest is missing, truncated or inconsistent; the message names the file."""


def shard_name(j: int) -> str:
    return f"shard-{j:06d}.tar"


def sidecar_name(j: int) -> str:
    return f"shard-{j:06d}.json"


def manifest_file(path_or_dir: str | Path) -> Path:
    """``manifest.json`` inside a folder, or the given file itself."""
    p = Path(path_or_dir)
    return p / "manifest.json" if p.is_dir() else p


def open_manifest(path_or_dir: str | Path) -> dict:
    """Read and check a shard manifest, so a wrong folder fails here and not hours into training."""
    path = manifest_file(path_or_dir)
    m = fsutil.read_json(path)
    if not isinstance(m, dict):
        raise ShardError(f"{path}: manifest must be a JSON object")
    if m.get("format") != FORMAT:
        raise ShardError(f"{path}: field 'format' is {m.get('format')!r}, expected {FORMAT!r}")
    for key in ("latent_shape", "shards", "class_names", "vae", "num_samples"):
        if key not in m:
            raise ShardError(f"{path}: field '{key}' is missing")
    shape = m["latent_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ShardError(f"{path}: field 'latent_shape' must be [C, h, w] positive ints, got {shape!r}")
    for i, s in enumerate(m["shards"]):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("num_samples"), int)):
            raise ShardError(f"{path}: shards[{i}] needs 'name' (str) and 'num_samples' (int), got {s!r}")
    total = sum(s["num_samples"] for s in m["shards"])
    if total != m["num_samples"]:
        raise ShardError(f"{path}: shards hold {total} samples but field 'num_samples' says {m['num_samples']}")
    return m


def plain_relative(name: str) -> bool:
    """A manifest may only name files under its own folder: no URL, no absolute path, no '..'."""
    p = Path(name)
    return bool(name) and not URL_SCHEME.match(name) and not p.is_absolute() and ".." not in p.parts and "\n" not in name


def shard_paths(manifest: dict, root: str | Path) -> list[Path]:
    """Paths of the manifest's shards under ``root``; a refused or missing one is named in the error."""
    paths = []
    for s in manifest["shards"]:
        name = s["name"]
        if not plain_relative(name):
            raise ShardError(f"manifest shard name {name!r} refused: only plain paths relative to {root} are allowed")
        p = Path(root) / name
        if not p.is_file():
            raise ShardError(f"{p}: shard named in the manifest is missing")
        paths.append(p)
    return paths


def read_sidecars(out_dir: str | Path, num_shards: int) -> list[dict]:
    """All sidecars in shard order (raises naming the first missing one)."""
    out = Path(out_dir)
    return [fsutil.read_json(out / sidecar_name(j)) for j in range(num_shards)]


def _latent_stats(sides: list[dict]) -> dict[str, list[float]]:
    with_data = [s["stats"] for s in sides if s["stats"]["count"]]
    if not with_data:
        return {"mean": [], "std": []}
    total = sum(np.asarray(s["sum"], dtype=np.float64) for s in with_data)
    totsq = sum(np.asarray(s["sumsq"], dtype=np.float64) for s in with_data)
    n = sum(s["count"] for s in with_data)
    mean = total / n
    std = np.sqrt(np.maximum(totsq / n - mean * mean, 0.0))
    return {"mean": mean.tolist(), "std": std.tolist()}


def assemble_manifest(out_dir: str | Path, num_shards: int, header: dict[str, Any]) -> dict:
    """Build manifest.json's content from the sidecars plus the job-level ``header``.

    ``header`` carries what sidecars do not know: ``class_names``, ``resolution``, ``vae``,
    ``flips``, ``source``, ``job_id``, listing-level ``skipped`` entries (empty classes...) and,
    with features, ``repr`` (completed here with the encoder's summed ``seconds`` and ``flops``).
    """
    sides = read_sidecars(out_dir, num_shards)
    for s in sides:
        if s.get("job_id") != header["job_id"]:
            raise ValueError(f"{Path(out_dir) / sidecar_name(s['index'])}: written by a different "
                             "job (parameters differ); use a fresh --out")
        _check_repr_shape(Path(out_dir) / sidecar_name(s["index"]), s, header.get("repr"))
    counts = [0] * len(header["class_names"])
    for s in sides:
        for k, v in s["class_counts"].items():
            counts[int(k)] += v
    shape = next((s["latent_shape"] for s in sides if s["latent_shape"]), None)
    skipped = list(header.get("skipped", [])) + [x for s in sides for x in s["skipped"]]
    man = {k: v for k, v in header.items() if k != "skipped"}
    man.update({
        "format": FORMAT,
        "num_samples": sum(s["num_samples"] for s in sides),
        "num_images": sum(s["num_images"] for s in sides),
        "class_counts": counts, "latent_shape": shape,
        "latent_stats": _latent_stats(sides),
        "shards": [{"name": s["name"], "num_samples": s["num_samples"], "sha256": s["sha256"]}
                   for s in sides],
        "skipped": skipped,
    })
    if header.get("repr"):
        man["repr"] = _repr_totals(header["repr"], sides, man["num_samples"])
    return man


def repr_shape(entry: dict | None) -> list[int] | None:
    """[gh, gw, K] of the samples' ``repr.npy`` grids that a manifest's ``repr`` entry describes."""
    return None if not entry else [*entry["grid"], entry["dims"]]


def _check_repr_shape(path: Path, side: dict, entry: dict | None) -> None:
    """A sidecar's feature grid is the job's (none without --repr; none in an empty shard)."""
    want = repr_shape(entry) if side.get("num_samples") else None
    if side.get("repr_shape") != want:
        raise ValueError(f"{path}: repr_shape {side.get('repr_shape')} but the job stores "
                         f"{want if want else 'no feature grids'}; use a fresh --out")


def _repr_totals(entry: dict, sides: list[dict], num_samples: int) -> dict:
    """The ``repr`` entry with the encoder's cost over the whole set: its own seconds summed over
    the sidecars (timed apart from the VAE) and its forward FLOPs over every sample encoded."""
    seconds = sum(s.get("repr_seconds") or 0.0 for s in sides)
    return {**entry, "flops": int(entry["flops_per_image"]) * num_samples, "seconds": round(seconds, 3)}


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Atomic: concurrent writers of the same content (several jobs finishing) are harmless.

    Also removes the temporary of a writer killed before its rename (it would stay forever).
    """
    path = Path(out_dir) / MANIFEST
    try:
        fsutil.atomic_write_json(path, manifest)
    except FileNotFoundError:
        if not path.is_file():  # not "another finishing job removed our temporary and wrote the same file"
            raise
    fsutil.remove_dead_writers_tmp(path)
    return path


def num_shards_for(num_inputs: int, inputs_per_shard: int) -> int:
    return max(1, math.ceil(num_inputs / inputs_per_shard))
