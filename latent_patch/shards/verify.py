"""Verification of a shard set against its manifest (``encode_latents.py --verify``,
``data.verify=true``): every listed shard present with its sha256, and (deep) its sample count
and sample index true to its tar's headers; no unlisted shard in the folder. With feature grids
(the manifest's ``repr``): each shard's sidecar has the manifest's grid shape and (deep) every
sample one ``repr.npy`` of that shape's size."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

from .. import fsutil
from .manifest import plain_relative, manifest_file, repr_shape
from .reader import REPR_EXT, index_problem


def _count_samples(path: Path) -> tuple[int, int, list[int]]:
    """(samples, distinct keys, sizes of the repr.npy members) in a tar, read with tarfile only."""
    keys: list[str] = []
    feats: list[int] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.endswith(".latent.npy"):
                keys.append(m.name[: -len(".latent.npy")])
            elif m.isfile() and m.name.endswith("." + REPR_EXT):
                feats.append(m.size)
    return len(keys), len(set(keys)), feats


def _repr_problem(path: Path, n: int, feats: list[int], shape: list[int] | None) -> str | None:
    """Every sample has one float16 grid of the manifest's shape (by member size), or none has."""
    if shape is None:
        return f"{path}: {len(feats)} {REPR_EXT} members, but the manifest has no 'repr'" if feats else None
    size = len(fsutil.npy_header(tuple(shape), "<f2")) + 2 * math.prod(shape)
    if len(feats) != n or any(f != size for f in feats):
        wrong = sum(f != size for f in feats)
        return (f"{path}: {len(feats)} {REPR_EXT} members for {n} samples, {wrong} not of the "
                f"manifest's {shape} float16 ({size} bytes)")
    return None


def _sidecar_problem(tar: Path, shape: list[int] | None, num_samples: int) -> str | None:
    """A sidecar beside the tar (the encoder's; shards copied without them have none) agrees
    with the manifest's grid shape (none in an empty shard)."""
    side = tar.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        got = fsutil.read_json(side).get("repr_shape")
    except (ValueError, AttributeError) as err:
        return f"{side}: unreadable sidecar ({err})"
    want = shape if num_samples else None
    return None if got == want else f"{side}: repr_shape {got} != manifest's {want}"


def verify_shards(path_or_dir: str | Path, deep: bool = True, strays: bool = True) -> list[str]:
    """Check every shard against the manifest: present, sha256 equal, (deep) sample count equal
    and its sample index (where there is one) true to its headers, and (strays) no shard tar in
    the folder that the manifest does not list. Returns the problems found, empty when intact.

    Reads every byte (slow on big sets): ``encode_latents.py --verify`` and ``data.verify=true``.
    """
    mpath = manifest_file(path_or_dir)
    out = mpath.parent
    if not mpath.is_file():
        return [f"{mpath}: missing (the encoding is not finished)"]
    man = fsutil.read_json(mpath)
    problems: list[str] = []
    listed = set()
    shape = repr_shape(man.get("repr"))
    for sh in man["shards"]:
        p = out / sh["name"]
        listed.add(sh["name"])
        if not plain_relative(sh["name"]):
            problems.append(f"manifest shard name {sh['name']!r} refused: only plain relative paths")
            continue
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        if side := _sidecar_problem(p, shape, sh["num_samples"]):
            problems.append(side)
        if not sh.get("sha256"):
            problems.append(f"{p}: manifest has no 'sha256' for this shard")
            continue
        digest = fsutil.sha256_file(p)
        if digest != sh["sha256"]:
            problems.append(f"{p}: sha256 {digest[:16]}... != manifest {sh['sha256'][:16]}...")
            continue
        if deep:
            n, uniq, feats = _count_samples(p)
            if n != sh["num_samples"] or uniq != n:
                problems.append(f"{p}: {n} samples ({uniq} distinct) != manifest "
                                f"{sh['num_samples']}")
            elif stale := index_problem(p, n) or _repr_problem(p, n, feats, shape):
                problems.append(stale)
    extra = sorted(p.name for p in out.glob("shard-*.tar") if strays and p.name not in listed)
    problems += [f"{out / name}: not in the manifest" for name in extra]
    return problems
