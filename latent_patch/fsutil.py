"""Crash-safe file writing: every artefact is written under a temporary name and renamed.

A process killed at any instant leaves either the old file or the new one, never half of one;
readers (resume, manifests) can therefore trust that any file with its final name is complete.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import secrets
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np


def tmp_path(path: str | Path) -> Path:
    """The temporary sibling used while ``path`` is written: ``.NAME.HOST~PID~RANDOM.tmp``.

    Why all three: containers reuse process ids (two nodes' pid 1 writing one shared file would
    collide), and the host and pid let a later writer judge whether the writer is still alive.
    """
    p = Path(path)
    return p.with_name(f".{p.name}.{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(4)}.tmp")


def tmp_writer(tmp: str | Path, name: str) -> tuple[str | None, int | None]:
    """(host, pid) of the writer of temporary ``tmp`` of file ``name`` (host None: an old pid-only name)."""
    tag = Path(tmp).name[len(name) + 2: -len(".tmp")]
    if tag.isdigit():
        return None, int(tag)
    parts = tag.split("~")
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, None


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry so a rename survives a power loss, where the OS allows it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str | Path, final: str | Path) -> None:
    """Make a fully written temporary file visible under its final name (atomic on POSIX)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either absent/old or complete."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(p)
    with open(tmp, "wb") as f:
        f.write(data)
    commit(tmp, p)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON twin of :func:`atomic_write_bytes` (sorted keys, indented, so files diff well)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read JSON, naming the file in the error when it is missing or malformed."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: file not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from err


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (shards can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_tmp(directory: str | Path) -> int:
    """Delete leftover ``.*.tmp`` files of killed writers; returns how many were removed."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    n = 0
    for p in d.glob(".*.tmp"):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def remove_dead_writers_tmp(path: str | Path) -> int:
    """Delete ``path``'s temporaries (see :func:`tmp_path`) left by this host's processes that no longer exist.

    Why: a writer killed between writing its temporary and renaming it leaves the temporary
    behind, and the file's next writer has a different PID. Live writers' temporaries (several
    jobs finishing at once) are kept; PIDs are per host, so callers must tolerate a writer on
    another host losing its temporary (see ``shards.write_manifest``).
    """
    p = Path(path)
    n = 0
    for tmp in p.parent.glob(f".{p.name}.*.tmp"):
        host, pid = tmp_writer(tmp, p.name)
        if pid is None or (host is not None and host != socket.gethostname()) or pid == os.getpid() or pid_alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (PIDs mean nothing on another one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True



@functools.lru_cache(maxsize=16)
def npy_header(shape: tuple[int, ...], dtype: str = "<f2") -> bytes:
    """The exact .npy (version 1.0) header ``np.save`` writes for a C-order array of ``shape``.

    Why: shards and ``samples.npz`` are streamed piece by piece, so the header is written on
    its own; every sample of a shard set shares it, hence the cache.
    """
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


class BackgroundWriter:
    """Runs writes (shard commits, sample parts) on one thread so the GPU never waits for fsync.

    Writes run in submission order; at most ``depth`` are pending (None: unbounded), which bounds
    the memory held by queued data. A failed write raises in the caller's thread at the next
    :meth:`submit` or at :meth:`wait`.
    """

    def __init__(self, depth: int | None = None, name: str = "writer") -> None:
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.pending: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        for f in [f for f in self.pending if f.done()]:
            self.pending.remove(f)
            f.result()
        while self.depth is not None and len(self.pending) >= self.depth:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(fn, *args))

    def wait(self) -> None:
        """Block until every submitted write is done; re-raises the first failure."""
        while self.pending:
            self.pending.pop(0).result()

    def shutdown(self) -> None:
        """Stop the thread after the writes already running (errors are not re-raised here)."""
        self.pool.shutdown(wait=True)

    def close(self) -> None:
        """:meth:`wait`, then :meth:`shutdown` (also when a write failed)."""
        try:
            self.wait()
        finally:
            self.shutdown()
