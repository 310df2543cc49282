"""The in-memory cache at cluster scale (issue 13, item 1): built by one process however many start,
waited for by polling (no collective), a killed build continued (not redone) by a waiter that
takes over its stale lock, leftovers of killed writers removed, temporary names that cannot
collide. Each process here is a real OS process: the lock is a file, not a thread primitive."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from latent_patch import filelock, fsutil, latent_cache, loader, stream
from latent_patch.config import DataConfig
from tests.test_loader import COUNTS, SHAPE, write_shards

ROOT = Path(__file__).resolve().parent.parent
N = sum(COUNTS)

# A process that builds (or waits for) the cache of shards argv[1]; every shard it reads leaves a
# file read-PID-SHARD in argv[2]; each read sleeps argv[3] s so that the others must wait.
BUILDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from latent_patch import filelock, latent_cache, loader
    from latent_patch.config import DataConfig
    filelock.POLL_S, filelock.HEARTBEAT_S, latent_cache.FLUSH_S = 0.05, 0.1, 0.0
    filelock.STALE_S = float(os.environ.get("STALE_S", "300"))
    original = loader.read_shard
    def read_shard(ref, *args, **kw):
        Path(sys.argv[2], f"read-{os.getpid()}-{Path(ref.url).stem}").touch()
        time.sleep(float(sys.argv[3]))
        return original(ref, *args, **kw)
    loader.read_shard = read_shard
    ld = loader.build_loader(DataConfig(shards=sys.argv[1], batch_size=4, in_memory=True, cache="auto", num_workers=0), infinite=False)
    print(",".join(str(int(v)) for v in ld.latents[:, 0, 0, 0, 0].tolist()), flush=True)
""")


def _spawn(shards: Path, marks: Path, delay: float, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(shards), str(marks), str(delay)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})


def _reads(marks: Path) -> list[tuple[int, str]]:
    return sorted((int(p.name.split("-")[1]), p.name.split("-", 2)[2]) for p in marks.glob("read-*"))


@pytest.fixture
def shards(tmp_path) -> Path:
    write_shards(tmp_path / "shards")
    return tmp_path / "shards"


def test_many_processes_build_the_cache_once_and_all_map_it(shards, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    procs = [_spawn(shards, marks, 0.3) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    reads = _reads(marks)
    assert len({pid for pid, _ in reads}) == 1, reads  # one builder ...
    assert len(reads) == len(COUNTS)  # ... that read each shard once
    for out, _ in outs:  # every process sees every sample in manifest order (mean filled with the index)
        assert out.strip() == ",".join(str(i) for i in range(N))
    files = latent_cache.CacheFiles(shards / "latents-cache.npy")
    assert files.meta.is_file() and not files.lock.exists() and not files.partial.exists()


def test_killed_build_is_continued_by_a_waiter_from_its_last_flushed_shard(shards, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    files = latent_cache.CacheFiles(shards / "latents-cache.npy")
    stale_tmp = files.latents.with_name(f".{files.latents.name}.4242.tmp")  # an older version's leftover
    stale_tmp.write_bytes(b"half a cache")
    victim = _spawn(shards, marks, 0.5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once two shards are flushed, before the build ends
        if files.progress.is_file() and len(fsutil.read_json(files.progress)["done"]) >= 2:
            break
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    flushed = set(fsutil.read_json(files.progress)["done"])
    assert 2 <= len(flushed) < len(COUNTS), "the kill must land mid-build"
    assert files.lock.exists() and not files.meta.exists()  # a dead builder's lock stays behind

    waiter = _spawn(shards, marks, 0.0, STALE_S="1.0")  # judges the lock stale after 1 s, takes over
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err[-2000:]
    assert out.strip() == ",".join(str(i) for i in range(N))
    second = [shard for pid, shard in _reads(marks) if pid == waiter.pid]
    assert sorted(second) == sorted(f"shard-{j:06d}" for j in range(len(COUNTS)) if j not in flushed)
    assert "taking over" in err
    assert not stale_tmp.exists() and not files.lock.exists() and not files.progress.exists()


def test_a_live_builders_lock_is_waited_for_not_broken(shards, monkeypatch):
    files = latent_cache.CacheFiles(shards / "latents-cache.npy")
    files.lock.write_text(json.dumps({"host": "node-7", "pid": 12, "token": "t"}))  # a live builder elsewhere
    monkeypatch.setattr(filelock, "POLL_S", 0.05)
    info = stream.DatasetInfo.from_manifest(loader.open_manifest(loader.manifest_file(shards)))
    with pytest.raises(TimeoutError, match="not ready after 0.5 s; .*latents-cache.npy.lock is held by node-7 pid 12"):
        latent_cache.ensure(files.latents, "digest", (N, 2, *SHAPE), len(COUNTS),
                            lambda todo: loader.iter_shards([], info, todo), timeout_s=0.5)
    assert json.loads(files.lock.read_text())["host"] == "node-7"


def test_a_stale_cache_of_another_manifest_is_rebuilt(shards):
    cfg = DataConfig(shards=str(shards), batch_size=4, in_memory=True, cache="auto")
    loader.build_loader(cfg, infinite=False)
    files = latent_cache.CacheFiles(shards / "latents-cache.npy")
    meta = fsutil.read_json(files.meta)
    fsutil.atomic_write_json(files.meta, {**meta, "manifest_sha256": "another manifest"})
    np.save(files.latents, np.zeros((N, 2, *SHAPE), np.float16))  # what another data set would hold
    ld = loader.build_loader(cfg, infinite=False)
    assert ld.latents[:, 0, 0, 0, 0].tolist() == list(range(N))


def test_temporary_names_cannot_collide_and_only_dead_local_writers_are_swept(tmp_path):
    final = tmp_path / "manifest.json"
    a, b = fsutil.tmp_path(final), fsutil.tmp_path(final)
    assert a != b and a.name.endswith(".tmp") and a.name.startswith(".manifest.json.")
    assert fsutil.tmp_writer(a, final.name) == (socket.gethostname(), os.getpid())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = {
        "dead_here": f".manifest.json.{socket.gethostname()}~{dead_pid}~00ff00ff.tmp",
        "dead_old_format": f".manifest.json.{dead_pid}.tmp",
        "other_host": f".manifest.json.node-elsewhere~{dead_pid}~00ff00ff.tmp",
        "alive_here": a.name,
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert fsutil.remove_dead_writers_tmp(final) == 2
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {names["other_host"], names["alive_here"]}
