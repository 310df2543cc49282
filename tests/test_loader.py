"""Loader contract: exact passes across ranks x workers, shuffling, exact in-memory resume, and
refusal of bad shards (missing, wrong shape, truncated, planted pickles) with the file named.

Fixtures are written here with webdataset's TarWriter in the design.md format, independently of
shards.py; each sample's mean is filled with its index and its std with index + 0.5, so any batch
tells which samples it holds and whether mean, std and label stayed together.
"""

from __future__ import annotations

import itertools
import json
import re
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_patch.codec import draw_latent, latent_norm
from latent_patch.config import DataConfig
from latent_patch.loader import build_loader
from latent_patch.shards import ShardError, open_manifest, shard_paths, verify_shards
from latent_patch.stream import plan_pieces
from tests.synthetic_shards import indexed, npy_bytes, write_latent_shards

SHAPE = (4, 4, 4)
CLASSES = 3
COUNTS = (7, 13, 5, 11, 9)  # uneven on purpose: 45 samples


def write_shards(root: Path, counts=COUNTS, shape=SHAPE, extra: dict | None = None) -> Path:
    """Shards + manifest as shards.py writes them; ``extra`` adds members to sample 0."""
    return write_latent_shards(root, counts, indexed(shape, CLASSES), CLASSES, shape, extra=extra,
                               vae={"id": "demo", "scaling_factor": 0.5, "shift_factor": 0.1,
                                    "latent_channels": 4, "downsample": 8})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards(root)
    return root


def ids_of(batch) -> list[int]:
    """Sample indices of a batch, checking that mean, std and label belong together."""
    ids = batch.mean[:, 0, 0, 0].long()
    assert batch.mean.dtype == torch.float16 and batch.mean.shape[1:] == SHAPE
    assert batch.label.dtype == torch.int64
    assert torch.equal(batch.mean, ids.view(-1, 1, 1, 1).expand_as(batch.mean).half())
    assert torch.equal(batch.std, batch.mean + 0.5)
    assert torch.equal(batch.label, ids % CLASSES)
    return ids.tolist()


def collect(loader, max_batches: int | None = None) -> list[int]:
    out = []
    for b in itertools.islice(loader, max_batches):
        out += ids_of(b)
    return out


def test_exact_pass_two_ranks_two_workers(shards):
    per_rank = []
    for rank in range(2):
        cfg = DataConfig(shards=str(shards), batch_size=4, num_workers=2, shuffle_buffer=8)
        per_rank.append(collect(build_loader(cfg, rank, 2, infinite=False)))
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == list(range(sum(COUNTS)))
    assert sorted(len(r) for r in per_rank) == [22, 23]  # floor/ceil of 45 / 2, shard sizes aside


def test_exact_passes_repeat_reshuffled(shards):
    loader = build_loader(DataConfig(shards=str(shards), batch_size=5, num_workers=0), infinite=False)
    first, second = collect(loader), collect(loader)
    assert sorted(first) == sorted(second) == list(range(45))
    assert first != second
    assert loader.state_dict()["passes"] == 2


def test_infinite_runs_past_one_pass(shards):
    loader = build_loader(DataConfig(shards=str(shards), batch_size=4, num_workers=0, shuffle_buffer=10))
    ids = collect(loader, max_batches=30)
    assert len(ids) == 120 and set(ids) == set(range(45))
    assert loader.state_dict()["samples"] == 120  # all ranks' draws: the run's sample count


def test_shuffle_depends_on_seed(shards):
    def order(seed):
        cfg = DataConfig(shards=str(shards), batch_size=45, num_workers=0, seed=seed)
        return collect(build_loader(cfg, infinite=False))

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(1)) == list(range(45))


def test_plan_pieces_balanced_and_complete():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 20, rng.integers(1, 8)).tolist()
        n_slots = int(rng.integers(1, 9))
        order = rng.permutation(len(counts)).tolist()
        plan = plan_pieces(counts, order, n_slots)
        seen = [(p.shard, i) for slot in plan for p in slot for i in range(p.start, p.stop)]
        assert sorted(seen) == [(j, i) for j, c in enumerate(counts) for i in range(c)]
        sizes = [sum(p.stop - p.start for p in slot) for slot in plan]
        assert max(sizes) - min(sizes) <= 1


def test_user_urls_with_pipe(shards):
    """The user's own argument may use pipe:; counts unknown -> ranks split by whole shards."""
    urls = [f"pipe:cat {p}" for p in sorted(shards.glob("*.tar"))]
    got = []
    for rank in range(2):
        cfg = DataConfig(shards=str(shards), batch_size=6, num_workers=0, urls=urls)
        got += collect(build_loader(cfg, rank, 2, infinite=False))
    assert sorted(got) == list(range(45))


def test_in_memory_rows_and_exact_pass(shards):
    got = []
    for rank in range(2):
        cfg = DataConfig(shards=str(shards), batch_size=4, in_memory=True, num_workers=0)
        loader = build_loader(cfg, rank, 2, infinite=False)
        assert loader.latent_shape == SHAPE and loader.num_classes == CLASSES
        assert loader.vae["scaling_factor"] == 0.5
        got += collect(loader)
    assert sorted(got) == list(range(45))


def test_in_memory_resume_is_exact(shards, tmp_path):
    cache = tmp_path / "cache.npy"
    cfg = DataConfig(shards=str(shards), batch_size=4, in_memory=True, num_workers=2, cache=str(cache), seed=3)
    a = build_loader(cfg, rank=1, world_size=2)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [next(it) for _ in range(15)]  # 22-23 samples per rank-epoch: crosses epochs
    assert cache.is_file()

    b = build_loader(cfg, rank=1, world_size=2)  # reads the cache this time
    b.load_state_dict(state)
    for want, got in zip(expected, b):
        assert torch.equal(want.mean, got.mean) and torch.equal(want.std, got.std)
        assert torch.equal(want.label, got.label)
        ids_of(got)
    assert b.state_dict() == a.state_dict()


def test_draw_latent_formula_and_device():
    mean = torch.randn(3, 4, 8, 8).half()
    z = draw_latent(mean, torch.zeros_like(mean), scaling_factor=0.5, shift_factor=0.1)
    assert z.dtype == torch.float32 and z.device == mean.device
    torch.testing.assert_close(z, (mean.float() - 0.1) * 0.5)
    std = torch.full_like(mean, 2.0)
    z1 = draw_latent(mean, std, 0.5, 0.1, generator=torch.Generator().manual_seed(1))
    z2 = draw_latent(mean, std, 0.5, 0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2)
    eps = (z1 / 0.5 + 0.1 - mean.float()) / 2.0
    assert abs(eps.mean().item()) < 0.2 and abs(eps.std().item() - 1) < 0.2


def test_channel_norm_standardises_to_sigma_data_and_undoes_exactly():
    mean, std = [-1.0, 0.0, 0.5, 2.0], [0.4, 1.0, 1.6, 0.25]
    norm = latent_norm("channel", {"latent_stats": {"mean": mean, "std": std}}, 0.5)
    z = torch.randn(4096, 4, 2, 2) * torch.tensor(std).view(1, 4, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1)
    y = norm.apply(z)
    per_channel = y.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(4), atol=0.05)
    assert torch.allclose(per_channel.std(1), torch.full((4,), 0.5), atol=0.03)
    torch.testing.assert_close(norm.undo(y), z)
    assert latent_norm("scale", None, 0.5) is None  # the VAE's factors only: nothing on top


@pytest.mark.parametrize("manifest, match", [
    ({}, "needs latent_stats"),
    ({"latent_stats": {"mean": [0.0, 1.0], "std": [1.0]}}, "needs latent_stats"),
    ({"latent_stats": {"mean": [0.0], "std": [0.0]}}, "zero std"),
])
def test_channel_norm_errors_name_the_manifest(manifest, match):
    with pytest.raises(ValueError, match=match) as err:
        latent_norm("channel", manifest, 0.5, where="shards/manifest.json")
    assert "shards/manifest.json" in str(err.value)
    with pytest.raises(ValueError, match="data.latent_norm='per-pixel'"):
        latent_norm("per-pixel", manifest, 0.5)


# ------------------------------------------------------------------------------------ errors


def stream_all(root: Path, **kw) -> list[int]:
    cfg = DataConfig(shards=str(root), batch_size=8, num_workers=0, **kw)
    return collect(build_loader(cfg, infinite=False))


def test_missing_shard_is_named(tmp_path):
    write_shards(tmp_path, counts=(3, 3))
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match="shard-000001.tar"):
        stream_all(tmp_path)


def test_manifest_may_not_name_a_pipe(tmp_path):
    m = json.loads(write_shards(tmp_path, counts=(3,)).read_text())
    m["shards"][0]["name"] = "pipe:touch /tmp/owned"
    with pytest.raises(ShardError, match="refused"):
        shard_paths(m, tmp_path)


def test_wrong_latent_shape_is_named(tmp_path):
    manifest = write_shards(tmp_path, counts=(2, 2), shape=(4, 8, 8))
    m = json.loads(manifest.read_text())
    m["latent_shape"] = list(SHAPE)
    manifest.write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"shard-00000[01]\.tar.*latent\.npy.*\(2, 4, 8, 8\).*latent_shape"):
        stream_all(tmp_path)
    with pytest.raises(ShardError, match=r"shard-00000[01]\.tar"):
        stream_all(tmp_path, in_memory=True)


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_tar_is_named(tmp_path, cut):
    write_shards(tmp_path, counts=(4, 6))
    path = tmp_path / "shard-000001.tar"
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    third = members[9]  # sample 3's first member header: cut there, or inside its data
    size = third.offset if cut == "member_boundary" else third.offset_data + 10
    with open(path, "r+b") as f:
        f.truncate(size)
    with pytest.raises(ShardError, match="shard-000001.tar.*(truncated|corrupt)"):
        stream_all(tmp_path)
    with pytest.raises(ShardError, match="shard-000001.tar"):
        stream_all(tmp_path, in_memory=True)


def test_manifest_count_mismatch_is_named(tmp_path):
    path = write_shards(tmp_path, counts=(4, 3))
    m = json.loads(path.read_text())
    m["shards"][0]["num_samples"], m["num_samples"] = 5, 8
    path.write_text(json.dumps(m))
    with pytest.raises(ShardError, match="shard-000000.tar: holds 4 samples, manifest says 5"):
        stream_all(tmp_path)


class _Planted:
    """Unpickling this creates a file: proof that a payload was (not) executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "owned"
    payload = pickle.dumps(_Planted(marker))
    root = tmp_path / "s"
    write_shards(root, counts=(3, 2), extra={"pyd": payload, "pickle": payload, "pth": payload})
    assert sorted(stream_all(root)) == list(range(5))  # extra members skipped unread
    assert sorted(stream_all(root, in_memory=True)) == list(range(5))
    assert not marker.exists()

    # an object-dtype latent.npy would need pickle to load: refused, never executed
    evil = np.empty((2, *SHAPE), dtype=object)
    evil.flat[0] = _Planted(marker)
    root2 = tmp_path / "s2"
    write_shards(root2, counts=(2,), extra={"latent.npy": npy_bytes(evil, allow_pickle=True)})
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*00000000_img0.*latent\.npy"):
        stream_all(root2)
    assert not marker.exists()


def test_label_out_of_range_is_named(tmp_path):
    write_shards(tmp_path, counts=(2,), extra={"cls": b"7"})
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*00000000_img0.*class 7"):
        stream_all(tmp_path)


def test_manifest_checks_and_verify(tmp_path):
    path = write_shards(tmp_path, counts=(2, 3))
    m = open_manifest(tmp_path)
    assert open_manifest(path) == m
    assert verify_shards(tmp_path) == []
    good = path.read_text()
    bad = json.loads(good)
    bad["shards"][1]["sha256"] = "0" * 64
    path.write_text(json.dumps(bad))
    assert any(re.search("shard-000001.tar.*sha256", p) for p in verify_shards(tmp_path))
    with pytest.raises(ShardError, match="shard-000001.tar.*sha256"):  # data.verify=true refuses the set
        build_loader(DataConfig(shards=str(tmp_path), batch_size=1, num_workers=0, verify=True))
    path.write_text(good)
    bad = json.loads(path.read_text())
    bad["num_samples"] = 99
    path.write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="num_samples"):
        open_manifest(tmp_path)
    bad["format"] = "other/1"
    path.write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="format"):
        open_manifest(path)


def test_a_stream_reader_interleaves_its_shards(tmp_path):
    """Issue 13: one reader reads several shards at once, so shards of one class each (a class-
    sorted set) mix early; the pass still yields every sample exactly once."""
    write_shards(tmp_path, counts=(10,) * 8)
    ids = stream_all(tmp_path, shuffle_buffer=0)
    assert sorted(ids) == list(range(80))
    assert len({i // 10 for i in ids[:8]}) >= 4  # the first batch draws on 4 shards, not 1
