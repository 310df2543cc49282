"""The in-memory mode's memory-mapped cache of every latent: built once, waited for by polling.

Why a module of its own: at ImageNet scale the cache is ~42 GB, built from ~50 GB of shards, and
every process of every node wants it at start. Three things must hold there:

- **Once.** Whoever takes ``<cache>.lock`` builds; every other process, on any node that sees
  the same file system, polls for the finished cache (:func:`filelock.do_once`). A cache on
  node-local disk is built once per node, the same way. No collective runs while waiting, so no
  NCCL timeout can kill a job whose first start spends an hour here (``train_latent.py
  --build-cache`` builds it ahead of the GPU job).
- **Resumable.** The build writes into fixed names (``<cache>.partial``, ``<cache>.labels.partial``)
  and records finished shards in ``<cache>.partial.json`` after flushing them, so a build killed
  at 90 % continues from there: a dead builder's lock is taken over by one waiter.
- **Trusted.** The sidecar ``<cache>.json`` (the manifest's sha256 and the shape) is written last:
  a cache without it, or of another manifest, is never used.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import filelock
from .fsutil import atomic_write_json, fsync_dir, read_json

log = logging.getLogger(__name__)

F16 = np.dtype("<f2")
FLUSH_S = 30.0  # the builder records its finished shards this often (what a killed build keeps)

# (shard indices to read) -> yields (shard index, first row, latents (n, 2, C, h, w), labels (n,))
ShardSource = Callable[[list[int]], Iterator[tuple[int, int, np.ndarray, np.ndarray]]]


class CacheFiles:
    """Every file name of one cache; the final names are what readers map."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        self.latents, self.labels, self.meta = p, p.with_name(p.name + ".labels.npy"), p.with_name(p.name + ".json")
        self.partial = p.with_name(p.name + ".partial")
        self.labels_partial = p.with_name(p.name + ".labels.partial")
        self.progress = p.with_name(p.name + ".partial.json")
        self.lock = p.with_name(p.name + ".lock")

    def stale_temporaries(self) -> list[Path]:
        """Temporaries of earlier writers (``.NAME.*.tmp``; older versions named them by pid)."""
        return [t for f in (self.latents, self.labels, self.meta, self.progress)
                for t in f.parent.glob(f".{f.name}.*.tmp")]


def open_cache(path: str | Path, digest: str, shape: tuple) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, memory-mapped, when their sidecar matches this manifest; else None."""
    files = CacheFiles(path)
    if not files.meta.is_file() or read_json(files.meta).get("manifest_sha256") != digest:
        return None
    lat = np.load(files.latents, mmap_mode="c", allow_pickle=False)  # copy-on-write: shared pages
    lab = np.load(files.labels, allow_pickle=False)
    if lat.shape != tuple(shape) or lat.dtype != F16 or lab.shape != tuple(shape[:1]) or lab.dtype != np.int64:
        return None
    return lat, lab


def _progress(files: CacheFiles, digest: str, shape: tuple, num_shards: int) -> set[int]:
    """Shards a killed build already flushed into the partial files (empty if none or another build)."""
    if not (files.progress.is_file() and files.partial.is_file() and files.labels_partial.is_file()):
        return set()
    state = read_json(files.progress)
    if (state.get("manifest_sha256") != digest or state.get("shape") != list(shape)
            or state.get("num_shards") != num_shards):
        return set()
    return {int(j) for j in state.get("done", [])}


def build(path: str | Path, digest: str, shape: tuple, num_shards: int, read: ShardSource) -> None:
    """Fill the cache from ``read`` (the caller holds the lock); continues a killed build's partial files."""
    files = CacheFiles(path)
    files.latents.parent.mkdir(parents=True, exist_ok=True)
    for tmp in files.stale_temporaries():
        log.info("removing a killed writer's temporary %s", tmp)
        tmp.unlink(missing_ok=True)
    done = _progress(files, digest, shape, num_shards)
    mode = "r+" if done else "w+"
    lat = np.lib.format.open_memmap(files.partial, mode=mode, dtype=F16, shape=tuple(shape))
    lab = np.lib.format.open_memmap(files.labels_partial, mode=mode, dtype=np.int64, shape=tuple(shape[:1]))
    todo = [j for j in range(num_shards) if j not in done]
    log.info("building %s: %d of %d shards to read%s", files.latents, len(todo), num_shards,
             f" ({len(done)} kept from a killed build)" if done else "")

    def save_progress() -> None:
        lat.flush()
        lab.flush()  # data before the record that claims it
        atomic_write_json(files.progress, {"manifest_sha256": digest, "shape": list(shape),
                                           "num_shards": num_shards, "done": sorted(done)})

    last = time.monotonic()
    for j, start, rows, labels in read(todo):
        lat[start : start + len(rows)] = rows
        lab[start : start + len(rows)] = labels
        done.add(j)
        if time.monotonic() - last >= FLUSH_S:
            save_progress()
            last = time.monotonic()
            log.info("cache %s: %d / %d shards", files.latents.name, len(done), num_shards)
    save_progress()
    os.replace(files.partial, files.latents)
    os.replace(files.labels_partial, files.labels)
    fsync_dir(files.latents.parent)
    atomic_write_json(files.meta, {"manifest_sha256": digest, "shape": list(shape)})  # the completion mark
    files.progress.unlink(missing_ok=True)


def ensure(path: str | Path, digest: str, shape: tuple, num_shards: int, read: ShardSource,
           timeout_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The finished cache's arrays; builds it if this process wins the lock, else waits for it.

    Waiting polls the sidecar, so it can last as long as the build does (``timeout_s``: None is
    no limit) without any collective; a builder that died is replaced by one of the waiters.
    """
    files = CacheFiles(path)
    files.latents.parent.mkdir(parents=True, exist_ok=True)  # the lock lives there

    def ready() -> tuple[np.ndarray, np.ndarray] | None:
        return open_cache(path, digest, shape)

    def work() -> tuple[np.ndarray, np.ndarray] | None:
        build(path, digest, shape, num_shards, read)
        return ready()

    def progress() -> str:
        try:
            done = len(read_json(files.progress).get("done", []))
        except (OSError, ValueError):  # not flushed yet
            done = 0
        return f"{done} of {num_shards} shards so far"

    return filelock.do_once(files.lock, ready, work, f"the cache {files.latents}", timeout_s, progress)
