"""Issue 13 item 4: the source is listed (and a .tar.gz unpacked) once per output folder, not once
per process; the others read OUT/listing.json.gz. A dead lister's lock does not block."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import latent_patch
from latent_patch import encode as enc
from latent_patch import filelock, sources
from latent_patch.config import EncodeConfig
from latent_patch.sources import Listing, list_source

PKG_ROOT = Path(latent_patch.__file__).resolve().parents[1]  # the package under test, for subprocesses

# Runs encode.prepare (list, load the VAE, claim OUT) for each config, counting listings and opens
# of the .tar.gz; the processes start together (a file barrier) and the lister is slowed down, so
# the others arrive while it lists.
PROCESS = r"""
import gzip, json, os, sys, tarfile, time
from pathlib import Path
from latent_patch import encode, sources
from latent_patch.config import EncodeConfig

me, n, barrier, tgz = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
counts = {}

def counting(fn, key, slow=0.0):
    def wrapped(*a, **kw):
        if key == "lists" or str(a[0]) == tgz:
            counts[key] = counts.get(key, 0) + 1
            time.sleep(slow)
        return fn(*a, **kw)
    return wrapped

for name in ("list_class_tree", "list_tars", "list_flat"):
    setattr(sources, name, counting(getattr(sources, name), "lists", slow=1.5))
tarfile.open = counting(tarfile.open, "unpacks")
gzip.open = counting(gzip.open, "unpacks")
(barrier / f"ready-{me}").touch()
while len(list(barrier.glob("ready-*"))) < n:
    time.sleep(0.01)
results = []
for step in json.loads(sys.argv[5]):
    counts.clear()
    os.environ.update(step.pop("env", {}))
    listing, codec, params, num_shards, _ = encode.prepare(EncodeConfig(**step))
    results.append({**counts, "sha": listing.sha256(), "n": len(listing),
                    "first": listing.read_bytes(0).hex()[:64]})
print("RESULT " + json.dumps(results))
"""


def _tgz(path: Path, n: int = 5, extra: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (20 + i, 24), (40 * i, 90, 200)).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _cfg(src, out, vae, **kw) -> dict:
    return dict(source=str(src), out=str(out), vae=str(vae), resolution=32, shard_size=4,
                batch_size=4, progress=False, device="cpu", threads=1, **kw)


def _run_processes(tmp_path: Path, tgz: Path, steps_for) -> list[list[dict]]:
    n = 3
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{PKG_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, str(i), str(n), str(barrier), str(tgz),
                               json.dumps(steps_for(i))], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in reversed(range(n))]  # the last rank starts first: whoever comes first lists
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.split("RESULT ", 1)[1]))
    return results


@pytest.mark.slow
def test_three_processes_list_the_source_and_unpack_a_tar_gz_once(tmp_path, class_tree, tiny_vae_dir):
    """Three ranks of one job (RANK/WORLD_SIZE) on a class tree, then three --num-jobs jobs on a
    .tar.gz: one listing and one unpack in all, every process with the same listing. (Before:
    three listings and three unpacks, one per process into its own temp folder.)"""
    tree, out_tree, out_tgz = tmp_path / "tree", tmp_path / "out_tree", tmp_path / "out_tgz"
    class_tree(tree, per_class=4, classes=3)
    tgz = _tgz(tmp_path / "part-0.tar.gz")

    def steps(i: int) -> list[dict]:
        ranks = {"RANK": str(i), "WORLD_SIZE": "3", "LOCAL_RANK": str(i)}
        jobs = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        return [{**_cfg(tree, out_tree, tiny_vae_dir), "env": ranks},
                {**_cfg(tgz, out_tgz, tiny_vae_dir, num_jobs=3, job_index=i), "env": jobs}]

    results = _run_processes(tmp_path, tgz, steps)
    for k, (src, out) in enumerate(((tree, out_tree), (tgz, out_tgz))):
        got = [r[k] for r in results]
        assert sum(g.get("lists", 0) for g in got) == 1, got
        want = list_source(src)
        assert {(g["sha"], g["n"], g["first"]) for g in got} == {
            (want.sha256(), len(want), want.read_bytes(0).hex()[:64])}
        assert (out / enc.LISTING_FILE).is_file() and not (out / enc.LISTING_LOCK).exists()
        assert not list(out.glob(".*.tmp"))
    assert sum(r[1].get("unpacks", 0) for r in results) == 1, results
    assert sorted(p.name for p in (out_tgz / enc.UNPACKED_DIR).iterdir()) == [
        "00000-part-0.tar", "00000-part-0.tar.done"]
    assert not (out_tree / enc.UNPACKED_DIR).exists()


@pytest.fixture()
def counted(monkeypatch):
    """Counts listings (every kind) in this process; ``slow`` seconds each."""
    calls = {"lists": 0, "slow": 0.0}
    for name in ("list_class_tree", "list_tars", "list_flat"):
        fn = getattr(sources, name)

        def wrapped(*a, _fn=fn, **kw):
            calls["lists"] += 1
            time.sleep(calls["slow"])
            return _fn(*a, **kw)

        monkeypatch.setattr(sources, name, wrapped)
    return calls


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _within(seconds: float, fn, *args):
    """``fn(*args)`` must return within ``seconds`` (a blocked waiter fails the test, not hangs it)."""
    got: list = []
    t = threading.Thread(target=lambda: got.append(fn(*args)), daemon=True)
    t.start()
    t.join(seconds)
    assert got, f"still waiting after {seconds} s"
    return got[0]


def _same(a: Listing, b: Listing) -> bool:
    return (a.kind, a.path, a.base, a.sources, a.labels, a.class_names, a.locations, a.problems,
            a.warnings) == (b.kind, b.path, b.base, b.sources, b.labels, b.class_names, b.locations,
                            b.problems, b.warnings)


def test_jobs_one_after_another_list_once_and_a_resume_reads_the_file(tmp_path, class_tree, counted):
    src, out = tmp_path / "src", tmp_path / "out"
    class_tree(src, per_class=3, classes=2)
    ref, counted["lists"] = list_source(src), 0
    cfgs = [EncodeConfig(source=str(src), out=str(out), num_jobs=3, job_index=i) for i in (2, 0, 1)]
    got = [enc.shared_listing(c) for c in cfgs]
    assert counted["lists"] == 1 and all(_same(g, ref) for g in got)
    enc.shared_listing(cfgs[0])  # a resume: read, not listed
    assert counted["lists"] == 1
    # a changed source (a file added) is listed again; claim_out_dir then compares it with job.json
    Image.new("RGB", (8, 8)).save(src / "c1" / "new.png")
    again = enc.shared_listing(cfgs[0])
    assert counted["lists"] == 2 and "c1/new.png" in again.sources
    assert _same(again, list_source(src))  # (a third, direct listing)


def test_a_listing_of_another_source_is_refused(tmp_path, class_tree, counted):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    class_tree(a, per_class=2, classes=2)
    class_tree(b, per_class=2, classes=2)
    enc.shared_listing(EncodeConfig(source=str(a), out=str(out)))
    with pytest.raises(ValueError, match=r"listing\.json\.gz is the listing of --source .*/a, not of "
                                         r"--source .*/b: use another --out"):
        enc.shared_listing(EncodeConfig(source=str(b), out=str(out)))
    assert counted["lists"] == 1
    with pytest.raises(FileNotFoundError, match="no such file or folder"):  # nothing made for a typo
        enc.shared_listing(EncodeConfig(source=str(tmp_path / "missing"), out=str(tmp_path / "o2")))
    assert not (tmp_path / "o2").exists()


def test_a_dead_listers_lock_does_not_block(tmp_path, class_tree, counted, monkeypatch, capsys):
    """A lock whose pid is gone on this host is taken over at once; one from another host that
    is never touched, after filelock.STALE_S; a live lister that heartbeats is waited for."""
    src = tmp_path / "src"
    class_tree(src, per_class=2, classes=2)
    out = tmp_path / "dead_pid"
    out.mkdir()
    (out / enc.LISTING_LOCK).write_text(json.dumps({"host": socket.gethostname(),
                                                    "pid": _dead_pid(), "token": "x"}))
    _within(10, enc.shared_listing, EncodeConfig(source=str(src), out=str(out)))
    assert counted["lists"] == 1
    assert not (out / enc.LISTING_LOCK).exists() and "is gone" in capsys.readouterr().err

    monkeypatch.setattr(filelock, "STALE_S", 0.5)
    out = tmp_path / "other_host"
    out.mkdir()
    (out / enc.LISTING_LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    _within(10, enc.shared_listing, EncodeConfig(source=str(src), out=str(out)))
    assert counted["lists"] == 2 and "not touched for" in capsys.readouterr().err
    assert not list(out.glob(f"{enc.LISTING_LOCK}*"))

    # a slow lister (2.5 s, five times the stale limit) keeps its lock fresh: the other waits
    monkeypatch.setattr(filelock, "HEARTBEAT_S", 0.05)
    counted["slow"] = 2.5
    out = tmp_path / "slow"
    results: list[Listing] = []
    cfg = EncodeConfig(source=str(src), out=str(out))
    threads = [threading.Thread(target=lambda: results.append(enc.shared_listing(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(60)
    assert counted["lists"] == 3 and len(results) == 2 and _same(*results)
    assert "waiting for" in capsys.readouterr().err


def test_a_killed_unpack_is_redone_and_leftovers_removed(tmp_path, counted):
    tgz = _tgz(tmp_path / "data.tgz")
    ref, counted["lists"] = list_source(tgz), 0
    out = tmp_path / "out"
    unpacked = out / enc.UNPACKED_DIR
    unpacked.mkdir(parents=True)
    (unpacked / ".00000-data.tar.0123.tmp").write_bytes(b"half a tar")  # killed mid-unpack
    (unpacked / "00000-data.tar").write_bytes(b"renamed but no marker")  # killed before the marker
    (unpacked / "00007-gone.tar").write_bytes(b"a tar no longer in the source")
    (out / enc.LISTING_LOCK).write_text(json.dumps({"host": socket.gethostname(),
                                                    "pid": _dead_pid(), "token": "z"}))
    (out / f".{enc.LISTING_FILE}.{_dead_pid()}.tmp").write_bytes(b"half")
    cfg = EncodeConfig(source=str(tgz), out=str(out))
    got = _within(10, enc.shared_listing, cfg)
    assert sorted(p.name for p in unpacked.iterdir()) == ["00000-data.tar", "00000-data.tar.done"]
    assert not list(out.glob(".*.tmp")) and not (out / enc.LISTING_LOCK).exists()
    assert got.locations[0][0] == str(unpacked / "00000-data.tar")
    assert got.sources[0] == "data.tgz/s0.png" and got.read_bytes(0) == ref.read_bytes(0)
    # an unpacked copy removed later is made again (the listing file alone is not trusted for it)
    (unpacked / "00000-data.tar").unlink()
    again = enc.shared_listing(cfg)
    assert counted["lists"] == 2 and again.read_bytes(4) == got.read_bytes(4)
    # the output folder can move: unpacked copies are recorded relative to it
    moved = tmp_path / "moved"
    out.rename(moved)
    there = enc.shared_listing(EncodeConfig(source=str(tgz), out=str(moved)))
    assert counted["lists"] == 2 and there.read_bytes(2) == ref.read_bytes(2)


def test_listing_record_round_trip(tmp_path, class_tree) -> None:
    """Every kind survives to_record -> JSON -> from_record whole (problems, warnings, offsets)."""
    tree = tmp_path / "tree"
    class_tree(tree, per_class=2, classes=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in range(3):
        Image.new("L", (9, 9), n).save(flat / f"v{n}.png")
    (tmp_path / "labels.txt").write_text("v0.png 1\nv2.png 0\nmissing.png 1\n")
    tar = tmp_path / "t-000000.tar"
    with tarfile.open(_tgz(tmp_path / "x.tar.gz")) as src, tarfile.open(tar, "w") as dst:
        for m in src:
            if m.name != "s3.cls":  # one sample without a label: a problem
                dst.addfile(m, src.extractfile(m))
    for lst in (list_source(tree), list_source(flat, tmp_path / "labels.txt"), list_source(str(tar))):
        back = Listing.from_record(json.loads(json.dumps(lst.to_record(tmp_path / "o"))), tmp_path / "o")
        assert _same(back, lst) and back.sha256() == lst.sha256()
    assert list_source(str(tar)).problems == {3: "no valid .cls member in this sample"}


def test_encoding_a_tar_gz_keeps_its_copy_in_the_output_folder(tmp_path, tiny_vae_dir):
    """End to end, two jobs: the manifest as before, the unpacked copy under OUT/unpacked."""
    tgz = _tgz(tmp_path / "part-0.tar.gz", n=6)
    out = tmp_path / "out"
    for i in range(2):
        enc.run_encode(EncodeConfig(**_cfg(tgz, out, tiny_vae_dir, num_jobs=2, job_index=i, flips="none")))
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_images"] == 6 and man["source"]["kind"] == "tars" and man["class_counts"] == [2, 2, 2]
    assert man["source"]["listing_sha256"] == list_source(str(tgz)).sha256()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == [
        "job.json", enc.LISTING_FILE, "manifest.json", enc.UNPACKED_DIR]
