"""The shards' sample index (issue 27): a stream's piece of a shard costs what it yields.

Each shard's ``.idx.npy`` holds every sample's byte offset: the encoder writes it with the shard,
the loader makes it once for shards written before (webdataset's TarWriter here, as older
encodes), and a reader of samples ``[start, stop)`` seeks straight to ``start``. Checked here:
the index is what the tar's headers say (plain ustar and PAX headers alike), every range reads
what a scan from the shard's start reads, a pass reads each shard's bytes about once (not once
per stream that reads a piece of it), and a stale or unwritable index is remade, named or kept
in memory, never trusted blindly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from latent_patch import fsutil
from latent_patch.config import DataConfig
from latent_patch.loader import build_loader
from latent_patch.shards import (
    SampleDecoder, ShardBuilder, ShardError, ShardRef, index_path, read_shard, remove_stale, scan_offsets,
    verify_shards, with_indexes,
)
from latent_patch.shards.reader import read_index
from tests.synthetic_shards import indexed, write_latent_shards

SHAPE = (4, 4, 4)
CLASSES = 3


def synthetic(root: Path, counts) -> Path:
    """Shards without an index (webdataset's TarWriter, as shards written before indexes)."""
    write_latent_shards(root, counts, indexed(SHAPE, CLASSES), CLASSES, SHAPE)
    return root


def refs(root: Path, indexed_: bool) -> list[ShardRef]:
    m = json.loads((root / "manifest.json").read_text())
    plain = [ShardRef(str(root / s["name"]), s["num_samples"]) for s in m["shards"]]
    return with_indexes(plain) if indexed_ else plain


def ids(samples) -> list[tuple[int, int]]:
    return [(int(lat[0, 0, 0, 0]), y) for lat, y in samples]


def encoded_shard(root: Path, n: int = 9) -> Path:
    """One shard written by the encoder's writer: short keys (plain ustar headers) and, for
    samples 3 and 6, source names past 100 bytes (PAX headers) and flips."""
    b = ShardBuilder(root, 0, (0, n), 0.5, 0.0, "job")
    for i in range(n):
        source = f"c/{'long_' * 30 if i % 3 == 0 and i else ''}img{i}.JPEG"
        lat = np.stack([np.full(SHAPE, i), np.full(SHAPE, i + 0.5)])
        b.add(i, source, i % CLASSES, lat, flip=i == 6)
    b.commit()
    return root / "shard-000000.tar"


def test_encoder_writes_the_index_its_headers_give(tmp_path):
    tar = encoded_shard(tmp_path)
    ref = ShardRef(str(tar), 9)
    offsets = read_index(index_path(tar), 9, tar.stat().st_size)
    assert offsets is not None and offsets.tolist() == scan_offsets(ref)
    got = ids(read_shard(with_indexes([ref])[0], SampleDecoder(SHAPE, CLASSES), 2, 8))
    assert got == [(i, i % CLASSES) for i in range(2, 8)]  # PAX samples 3 and 6 among them


@pytest.mark.parametrize("writer", ["webdataset", "encoder"])
def test_every_range_reads_what_a_scan_reads(tmp_path, writer):
    if writer == "encoder":
        tar, n = encoded_shard(tmp_path), 9
        plain = [ShardRef(str(tar), n)]
    else:
        plain, n = refs(synthetic(tmp_path, (11,)), indexed_=False), 11
    fast = with_indexes(plain)[0]
    assert fast.offsets is not None
    dec = SampleDecoder(SHAPE, CLASSES)
    for start in range(n):
        for stop in range(start + 1, n + 1):
            assert ids(read_shard(fast, dec, start, stop)) == ids(read_shard(plain[0], dec, start, stop)), (start, stop)


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through Linux's /proc/self/io")
def test_a_pass_reads_each_shard_about_once(tmp_path):
    """256 streams over 3 shards of 40: each shard is cut among ~85 streams. Reading each piece
    from its shard's start read ~40x the set per pass (issue 27: 18x slower than the tars)."""
    root = synthetic(tmp_path, (40, 40, 40))
    cfg = DataConfig(shards=str(root), batch_size=8, num_workers=0, shuffle_buffer=0)
    loader = build_loader(cfg, infinite=False)  # makes the index (not counted: once per set)
    size = sum(p.stat().st_size for p in root.glob("*.tar"))
    before = _bytes_read()
    got = sorted(int(i) for b in loader for i in b.mean[:, 0, 0, 0])
    read = _bytes_read() - before
    assert got == list(range(120))
    assert read < 1.5 * size, f"one pass read {read:,} bytes of a {size:,}-byte set"


def test_index_is_made_once_for_shards_written_before(tmp_path):
    root = synthetic(tmp_path, (5, 7))
    assert not list(root.glob("*.idx.npy"))
    cfg = DataConfig(shards=str(root), batch_size=4, num_workers=0)
    build_loader(cfg, infinite=False)
    made = {p.name: p.stat().st_mtime_ns for p in root.glob("*.idx.npy")}
    assert sorted(made) == ["shard-000000.idx.npy", "shard-000001.idx.npy"]
    for r in refs(root, indexed_=False):
        assert read_index(index_path(r.url), r.num_samples, Path(r.url).stat().st_size).tolist() == scan_offsets(r)
    build_loader(cfg, infinite=False)  # a second run reads them
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("*.idx.npy")} == made


def test_a_replaced_tar_gets_a_new_index(tmp_path):
    root = synthetic(tmp_path / "a", (6,))
    with_indexes(refs(root, indexed_=False))
    other = synthetic(tmp_path / "b", (6,))  # same count, other bytes: 6 samples of another writer
    tar = root / "shard-000000.tar"
    tar.write_bytes((other / "shard-000000.tar").read_bytes() + bytes(10240))  # a different size
    fresh = with_indexes(refs(root, indexed_=False))[0]
    assert fresh.offsets.tolist() == scan_offsets(fresh)
    assert ids(read_shard(fresh, SampleDecoder(SHAPE, CLASSES), 2, 6)) == [(i, i % CLASSES) for i in range(2, 6)]


def test_a_wrong_index_is_named_not_trusted(tmp_path):
    root = synthetic(tmp_path, (6,))
    ref = with_indexes(refs(root, indexed_=False))[0]
    tar, idx = Path(ref.url), index_path(ref.url)
    bad = ref.offsets.copy()
    bad[3] = bad[2]  # not increasing: read as stale and remade
    idx.write_bytes(fsutil.npy_header((len(bad) + 1,), "<i8") + np.append(bad, tar.stat().st_size).astype("<i8").tobytes())
    assert with_indexes([ShardRef(str(tar), 6)])[0].offsets.tolist() == scan_offsets(ref)
    shifted = ref.offsets.copy()
    shifted[3:6] += 512  # increasing and in range, but not where samples begin
    idx.write_bytes(fsutil.npy_header((len(shifted) + 1,), "<i8")
                    + np.append(shifted, tar.stat().st_size).astype("<i8").tobytes())
    stale = with_indexes([ShardRef(str(tar), 6)])[0]
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*shard-000000\.idx\.npy"):
        list(read_shard(stale, SampleDecoder(SHAPE, CLASSES), 2, 6))
    assert any("shard-000000.idx.npy" in p for p in verify_shards(root))
    idx.unlink()
    assert verify_shards(root) == []  # no index is no problem: the loader makes it


def test_garbage_index_is_remade(tmp_path, caplog):
    root = synthetic(tmp_path, (4,))
    idx = index_path(root / "shard-000000.tar")
    idx.write_bytes(b"not an npy file")
    with caplog.at_level(logging.WARNING):
        ref = with_indexes(refs(root, indexed_=False))[0]
    assert "shard-000000.idx.npy" in caplog.text
    assert ref.offsets.tolist() == scan_offsets(ref)
    assert read_index(idx, 4, (root / "shard-000000.tar").stat().st_size) is not None


def test_read_only_folder_keeps_the_index_in_memory(tmp_path, monkeypatch, caplog):
    root = synthetic(tmp_path, (4, 3))

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fsutil, "atomic_write_bytes", refuse)
    with caplog.at_level(logging.WARNING):
        loader = build_loader(DataConfig(shards=str(root), batch_size=2, num_workers=0), infinite=False)
        got = sorted(int(i) for b in loader for i in b.mean[:, 0, 0, 0])
    assert got == list(range(7))
    assert not list(root.glob("*.idx.npy")) and "kept in memory" in caplog.text


def test_truncated_shard_fails_naming_it_with_an_index(tmp_path):
    root = synthetic(tmp_path, (6,))
    ref = with_indexes(refs(root, indexed_=False))[0]
    tar = Path(ref.url)
    with open(tar, "r+b") as f:
        f.truncate(int(ref.offsets[4]) + 100)  # inside sample 4
    dec = SampleDecoder(SHAPE, CLASSES)
    assert len(list(read_shard(ref, dec, 0, 4))) == 4  # a piece before the cut still reads
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*truncated"):
        list(read_shard(ref, dec, 2, 6))


def test_a_killed_writer_leaves_no_index_behind(tmp_path):
    (tmp_path / ".shard-000000.idx.npy.host~1~ab.tmp").write_bytes(b"x")
    (tmp_path / ".shard-000000.tar.host~1~ab.tmp").write_bytes(b"x")
    assert remove_stale(tmp_path, 0) == 2
