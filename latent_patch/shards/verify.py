"""Verification of a shard set against its manifest (``encode_latents.py --verify``,
``data.verify=true``): every listed shard present with its sha256, and (deep) its sample count
and sample index true to its tar's headers; no unlisted shard in the folder."""

from __future__ import annotations

import tarfile
from pathlib import Path

from .. import fsutil
from .manifest import plain_relative, manifest_file
from .reader import index_problem


def _count_samples(path: Path) -> tuple[int, int]:
    """(samples, distinct keys) in a tar, read with tarfile only."""
    keys: list[str] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.endswith(".latent.npy"):
                keys.append(m.name[: -len(".latent.npy")])
    return len(keys), len(set(keys))


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
    for sh in man["shards"]:
        p = out / sh["name"]
        listed.add(sh["name"])
        if not plain_relative(sh["name"]):
            problems.append(f"manifest shard name {sh['name']!r} refused: only plain relative paths")
            continue
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        if not sh.get("sha256"):
            problems.append(f"{p}: manifest has no 'sha256' for this shard")
            continue
        digest = fsutil.sha256_file(p)
        if digest != sh["sha256"]:
            problems.append(f"{p}: sha256 {digest[:16]}... != manifest {sh['sha256'][:16]}...")
            continue
        if deep:
            n, uniq = _count_samples(p)
            if n != sh["num_samples"] or uniq != n:
                problems.append(f"{p}: {n} samples ({uniq} distinct) != manifest "
                                f"{sh['num_samples']}")
            elif stale := index_problem(p, n):
                problems.append(stale)
    extra = sorted(p.name for p in out.glob("shard-*.tar") if strays and p.name not in listed)
    problems += [f"{out / name}: not in the manifest" for name in extra]
    return problems
