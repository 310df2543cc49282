"""Resume at any world size (issue 13, item 7): the data position is a function of the run's
sample count, the same on every rank, so a run interrupted under one layout (ranks x workers)
and resumed under another draws every sample of the pass exactly once: no repeats, no gaps.

Ranks are simulated in-process, one loader per rank (as tests/test_loader.py does); they share
nothing but the saved state. Each sample's mean is filled with its index, so a batch tells which
samples it holds.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from latent_patch import checkpoint as ckpt
from latent_patch import config
from latent_patch.config import DataConfig, TrainConfig
from latent_patch.loader import build_loader
from latent_patch.shards import SampleDecoder, ShardError, refs_from_manifest
from latent_patch.stream import dealt_counts, slot_samples, slot_sizes
from tests.synthetic_shards import indexed, write_latent_shards

SHAPE = (2, 2, 2)
CLASSES = 3
COUNTS = (31, 45, 17, 40, 35)  # uneven shards, 168 samples = 12 streams x 14
N = sum(COUNTS)


def write_shards(root: Path, counts=COUNTS, shape=SHAPE, classes=CLASSES, scale: float = 1.0) -> Path:
    """Sample i: mean filled with ``i * scale``, std with that + 0.5, class ``i % classes``."""
    write_latent_shards(root, counts, indexed(shape, classes, scale), classes, shape, sha256=False)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


def ids(loader, batches: int) -> list[int]:
    out = []
    for b in itertools.islice(loader, batches):
        assert torch.equal(b.std, b.mean + 0.5)
        out += b.mean[:, 0, 0, 0].long().tolist()
    return out


def stream_cfg(shards: Path, workers: int, **kw) -> DataConfig:
    base = dict(shards=str(shards), batch_size=6, num_workers=workers, shuffle_buffer=36, stream_slots=12, seed=5)
    return DataConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("world, workers, batches", [(1, 3, 24), (4, 1, 6)])
def test_stream_resumed_under_another_layout_completes_the_pass_exactly(shards, world, workers, batches):
    """2 ranks x 2 workers draw 2 batches each; the state is the same on both ranks; 1 rank x 3
    workers (or 4 ranks x 1) resumed from it draw exactly the rest of the pass: the 168 samples
    drawn before and after the resume are all 168 samples once (12 streams of 14 each end their
    pass at that count in both layouts)."""
    before, states = [], []
    for rank in range(2):
        loader = build_loader(stream_cfg(shards, 2), rank, 2)
        before += ids(loader, 2)
        states.append(loader.state_dict())
    assert states[0] == states[1]  # a global position: whichever rank's copy is loaded
    after = []
    for rank in range(world):
        loader = build_loader(stream_cfg(shards, workers), rank, world)
        loader.load_state_dict(states[0])
        after += ids(loader, batches)
    assert len(before) == 24 and len(before) + len(after) == N
    assert sorted(before + after) == list(range(N)), "samples repeated or skipped across the resume"


def test_stream_resume_anywhere_continues_each_stream_without_repeat_or_gap(shards):
    """Interrupted at an odd point and resumed under a third layout twice: what all ranks drew is
    exactly each stream's first ``taken`` samples, streams being layout-free sequences whose
    passes each hold every sample once."""
    refs = refs_from_manifest(json.loads((shards / "manifest.json").read_text()), shards)
    decoder = SampleDecoder(SHAPE, CLASSES)
    sizes = slot_sizes(COUNTS, 12)

    def stream(v: int, n: int) -> list[int]:
        it = slot_samples(refs, decoder, seed=5, slot=v, n_slots=12, buffer=3)
        return [int(lat[0, 0, 0, 0]) for lat, _ in itertools.islice(it, n)]

    for e in range(2):  # pass e of every stream together: every sample once
        assert sorted(i for v in range(12) for i in stream(v, sizes[v] * (e + 1))[sizes[v] * e:]) == list(range(N))

    drawn, state = [], None
    for world, workers, batches in [(2, 2, 3), (1, 3, 7), (3, 1, 9), (2, 0, 11)]:
        for rank in range(world):
            loader = build_loader(stream_cfg(shards, workers), rank, world)
            if state is not None:
                loader.load_state_dict(state)
            drawn += ids(loader, batches)
            new = loader.state_dict()
        state = new
        assert sum(state["taken"]) == state["samples"] == len(drawn)
        assert Counter(drawn) == Counter(i for v in range(12) for i in stream(v, state["taken"][v]))
    assert len(drawn) > N  # into the second pass of some streams


def test_stream_same_layout_resume_is_bit_identical(shards):
    cfg = stream_cfg(shards, 2)
    a = build_loader(cfg, 1, 2)
    it = iter(a)
    head = [next(it) for _ in range(5)]
    state = a.state_dict()
    tail = [next(it) for _ in range(40)]  # past the end of the pass
    b = build_loader(cfg, 1, 2)
    b.load_state_dict(state)
    for want, got in zip(tail, b):
        assert torch.equal(want.mean, got.mean) and torch.equal(want.label, got.label)
    assert len(head) == 5 and b.state_dict() == a.state_dict()


def test_stream_position_is_the_dealt_count():
    assert dealt_counts([3, 1, 1, 5], 5) == [4, 3, 3, 5]  # the lowest raised first, ties to the earliest
    assert dealt_counts([0, 0, 0], 7) == [3, 2, 2]
    assert dealt_counts([2, 2], 0) == [2, 2]


def test_stream_layout_beyond_the_streams_is_refused(shards, tmp_path):
    with pytest.raises(ValueError, match="data.stream_slots=12"):
        build_loader(stream_cfg(shards, 4), 0, 4)  # 16 readers for 12 streams
    small = write_shards(tmp_path / "small", counts=(2, 1))  # 3 samples in 12 streams: 9 empty
    with pytest.raises(ShardError, match="nothing to read"):
        build_loader(stream_cfg(small, 2), 0, 2)


def test_old_or_foreign_stream_state_warns_and_continues_at_the_sample_count(shards):
    loader = build_loader(stream_cfg(shards, 0))
    loader.seek(60)  # what checkpoint.resume does first: the run's sample count
    with pytest.warns(UserWarning, match="not a stream position"):
        loader.load_state_dict({"samples_seen": 30, "passes": 0})  # the salted per-rank loader of old
    assert loader.state_dict()["taken"] == [5] * 12
    with pytest.warns(UserWarning, match="stream_slots"):
        loader.load_state_dict({**loader.state_dict(), "slots": 8, "taken": [9] * 8})
    assert loader.state_dict()["taken"] == [6] * 12
    assert len(ids(loader, 2)) == 12


# ------------------------------------------------------------------------------------ in memory


def memory_cfg(shards: Path) -> DataConfig:
    return DataConfig(shards=str(shards), batch_size=4, in_memory=True, num_workers=0, seed=2)


@pytest.mark.parametrize("world, batches", [(3, 8), (1, 24)])
def test_memory_resumed_under_another_world_size_completes_the_epoch_exactly(shards, world, batches):
    before, states = [], []
    for rank in range(2):
        loader = build_loader(memory_cfg(shards), rank, 2)
        before += ids(loader, 9)
        states.append(loader.state_dict())
    assert states[0] == states[1]
    after = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: nothing to warn about
        for rank in range(world):
            loader = build_loader(memory_cfg(shards), rank, world)
            loader.load_state_dict(states[0])
            after += ids(loader, batches)
    assert len(before) == 72 and len(before) + len(after) == N
    assert sorted(before + after) == list(range(N)), "samples repeated or skipped across the resume"


def test_memory_old_state_and_seek_agree(shards):
    """A state of the per-rank loader of old (cursor into perm[rank::world]) and the run's sample
    count put the loader at the same place."""
    a, b = build_loader(memory_cfg(shards), 1, 3), build_loader(memory_cfg(shards), 1, 3)
    a.load_state_dict({"epoch": 1, "cursor": 10, "seed": 2, "world_size": 2})
    b.seek(N + 20)
    assert ids(a, 3) == ids(b, 3) and a.state_dict() == b.state_dict() == {
        "epoch": 1, "offset": 20 + 3 * 12, "seed": 2, "world_size": 3}


# ------------------------------------------------------------------------------------ training

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu_dit.yaml"
STREAMING = ["data.in_memory=false", "data.num_workers=0", "data.stream_slots=8", "data.shuffle_buffer=24"]



def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def loader_position(ck: Path) -> tuple[int, dict]:
    state = ckpt.load_state(ck / ckpt.STATE_FILE)
    return state["patches"], state["rank_state"]["loader"]


def test_streaming_training_resumes_from_the_position_its_sample_count_implies(tmp_path, fresh_accelerate):
    """A streaming run's checkpoints hold the position its patch count implies (one patch per
    sample, one reader dealing evenly from the start); a resume with the same layout continues
    bit for bit; one with 2 workers, or one told the checkpoint came from 2 processes (the
    branch that used to drop the loader state), continues from the saved position."""
    from latent_patch.train import train

    data = write_shards(tmp_path / "shards", counts=(40, 24), shape=(4, 8, 8), classes=10, scale=0.01)

    def cfg(out: str, *more: str) -> TrainConfig:
        return config.load(TrainConfig, TINY, [
            f"data.shards={data}", f"run.out_dir={tmp_path / out}", "run.tensorboard=false", *STREAMING,
            "run.total_patches=320", "run.log_every_patches=1", "run.ckpt_every_patches=160", "run.keep_last=0", *more])

    train(cfg("a"))
    done = ckpt.list_complete(tmp_path / "a")
    assert len(done) == 2
    for _, ck in done:
        patches, pos = loader_position(ck)
        ref = build_loader(DataConfig(shards=str(data), batch_size=8, num_workers=0, stream_slots=8, shuffle_buffer=24))
        ref.seek(patches)
        assert pos["samples"] == sum(pos["taken"]) == patches and pos["taken"] == ref.state_dict()["taken"]

    mid_step, mid = done[0]
    train(cfg("b"), str(mid))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [s for s in sorted(a) if s > mid_step]
    assert all(a[s] == b[s] for s in b), "the same layout must continue bit for bit"

    train(cfg("c", "data.num_workers=2"), str(mid))
    end_patches, end = loader_position(ckpt.find_latest(tmp_path / "c"))
    _, start = loader_position(mid)
    assert sum(end["taken"]) == end_patches and all(e >= s for e, s in zip(end["taken"], start["taken"]))

    # as if written by 2 processes, with a position no even dealing gives: it must be the one used
    ck = tmp_path / "d" / "checkpoints" / mid.name
    (tmp_path / "d" / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(mid, ck)
    state = torch.load(ck / ckpt.STATE_FILE, weights_only=True)
    state["world_size"] = 2
    taken = state["rank_state"]["loader"]["taken"]
    state["rank_state"]["loader"]["taken"] = taken = [taken[0] + sum(taken[1:4]), 0, 0, 0, *taken[4:]]
    torch.save(state, ck / ckpt.STATE_FILE)
    marker = json.loads((ck / ckpt.DONE).read_text())
    marker["files"] = {name: (ck / name).stat().st_size for name in marker["files"]}
    (ck / ckpt.DONE).write_text(json.dumps(marker))
    train(cfg("d"), "auto")
    end_patches, end = loader_position(ckpt.find_latest(tmp_path / "d"))
    ref.seek(end_patches)
    assert sum(end["taken"]) == end_patches and end["taken"] != ref.state_dict()["taken"]
    assert all(e >= s for e, s in zip(end["taken"], taken))


def test_url_stream_resume_restarts_the_pass_its_sample_count_falls_in(shards):
    """User URLs (no counts): streams are whole shards and their pass sizes unknown, so a resume
    starts the streams over at the pass the run's sample count falls in: none of it is skipped."""
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    cfg = stream_cfg(shards, 0, urls=urls, stream_slots=5, shuffle_buffer=0)
    a = build_loader(cfg)
    first = ids(a, 5)
    state = a.state_dict()
    assert state["samples"] == 30 and state["num_samples"] == -1
    b = build_loader(cfg)
    b.load_state_dict(state)
    assert ids(b, 5) == first  # pass 0 again from its start: nothing skipped
    c = build_loader(cfg)
    b.seek(N + 2)
    c.seek(2 * N - 6)  # both in pass 1, dealt evenly over the 5 streams
    assert ids(b, 5) == ids(c, 5) != first  # anywhere in pass 1: pass 1 from its start
