"""Streaming tar shards as fixed sample streams, for :class:`StreamLoader`; exact resume at any layout.

Each pass over the shard set is cut into a fixed number of *sample ranges* (``data.stream_slots``
streams, each with its own shuffle buffer), so a pass yields every sample once whatever the shard
sizes; ranks and workers deal the streams out, and the position (each stream's count) is the same
on every rank, so a run resumes exactly under any world size, worker count or batch size.
(webdataset's split_by_node / split_by_worker deal whole shards, which leaves ranks with unequal or
empty shares; the manifest's per-shard counts let us cut evenly instead. webdataset still opens the
user's own URLs, ``pipe:`` included, through ``gopen``.) A stream's piece of a shard seeks straight to its first sample
by the shard's sample index (``shards.reader.with_indexes``), so it costs what it yields however
many streams share the shard. Also the types both loaders share
(:class:`Batch`, :class:`DatasetInfo`); ``loader.py`` holds the in-memory mode and ``build_loader``.
"""

from __future__ import annotations

import heapq
import itertools
import random
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .seeds import derive_seed
from .shards import SampleDecoder, ShardError, ShardRef, read_shard, with_indexes

_F16 = np.dtype("<f2")

# ----------------------------------------------------------------------------------------------
# Shared by both loaders


@dataclass
class DatasetInfo:
    """What the trainer checks against its own config: shapes, classes, the VAE's factors."""

    manifest: dict
    latent_shape: tuple[int, int, int]
    num_classes: int
    vae: dict
    num_samples: int
    repr_shape: tuple[int, int, int] | None = None  # (gh, gw, K) when batches carry the feature grids

    @classmethod
    def from_manifest(cls, m: dict) -> "DatasetInfo":
        return cls(m, tuple(m["latent_shape"]), len(m["class_names"]), dict(m["vae"]), int(m["num_samples"]))


class Batch(NamedTuple):
    """``mean``/``std`` float16 (B, C, h, w), unscaled; ``label`` int64 (B,); ``repr`` float16
    (B, gh, gw, K), the representation features, when the loader was asked for them."""

    mean: torch.Tensor
    std: torch.Tensor
    label: torch.Tensor
    repr: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self))


def _batches(samples: Iterator[tuple], shape: tuple, batch_size: int,
             repr_shape: tuple | None = None) -> Iterator[Batch]:
    """Copy samples straight into one (2, B, C, h, w) buffer so mean and std come out contiguous
    (and their feature grids into one (B, gh, gw, K) buffer when ``repr_shape`` is given)."""
    while True:
        buf = np.empty((2, batch_size, *shape), _F16)
        labels = np.empty(batch_size, np.int64)
        feats = None if repr_shape is None else np.empty((batch_size, *repr_shape), _F16)
        n = 0
        for sample in itertools.islice(samples, batch_size):
            buf[:, n] = sample[0]
            labels[n] = sample[1]
            if feats is not None:
                feats[n] = sample[2]
            n += 1
        if n == 0:
            return
        t = torch.from_numpy(buf)
        yield Batch(t[0, :n], t[1, :n], torch.from_numpy(labels[:n]),
                    None if feats is None else torch.from_numpy(feats[:n]))
        if n < batch_size:
            return


# ----------------------------------------------------------------------------------------------
# Deterministic order and split


class Piece(NamedTuple):
    shard: int
    start: int
    stop: int | None


def slot_pieces(counts: Sequence[int | None], order: Sequence[int], slot: int, n_slots: int) -> list[Piece]:
    """Reader ``slot``'s share of one pass over the shards (in ``order``), of ``n_slots`` readers.

    With known counts the concatenated samples are cut into ``n_slots`` contiguous ranges of
    ``floor``/``ceil(total / n_slots)`` samples (:func:`slot_sizes`), so readers differ by at most
    one sample however uneven the shards are. With unknown counts (user URLs) whole shards are
    dealt round-robin and readers may differ by a whole shard.
    """
    if any(c is None for c in counts):
        return [Piece(j, 0, None) for i, j in enumerate(order) if i % n_slots == slot]
    total = sum(counts)
    lo, hi = slot * total // n_slots, (slot + 1) * total // n_slots
    pieces, pos = [], 0
    for j in order:
        a, b = pos, pos + counts[j]
        if max(a, lo) < min(b, hi):
            pieces.append(Piece(j, max(a, lo) - a, min(b, hi) - a))
        pos = b
        if pos >= hi:
            break
    return pieces


def plan_pieces(counts: Sequence[int | None], order: Sequence[int], n_slots: int) -> list[list[Piece]]:
    """Split one pass over the shards (in ``order``) among ``n_slots`` readers (:func:`slot_pieces`)."""
    return [slot_pieces(counts, order, s, n_slots) for s in range(n_slots)]


def slot_sizes(counts: Sequence[int | None], n_slots: int) -> list[int] | None:
    """Samples per pass of each of ``n_slots`` readers (the same every pass); None when counts are unknown."""
    if any(c is None for c in counts):
        return None
    total = sum(counts)
    return [(s + 1) * total // n_slots - s * total // n_slots for s in range(n_slots)]


def shard_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return order


INTERLEAVE = 4  # shards a stream reader reads at once, sample by sample


def interleave(streams: Iterator[Iterator[Any]], width: int) -> Iterator[Any]:
    """Round-robin over up to ``width`` streams at a time, the next stream joining as one ends.

    Why: a shard set written in class order (older encodes, other tools) gives each shard a few
    classes; reading several shards at once mixes them before the shuffle buffer does. Every
    sample still comes exactly once, in a deterministic order."""
    active = list(itertools.islice(streams, width))
    while active:
        for it in list(active):
            item = next(it, _END)
            if item is _END:
                active.remove(it)
                active.extend(itertools.islice(streams, 1))
            else:
                yield item


_END = object()


def _shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Sample-level shuffle through a buffer of ``size`` (0 or 1 = no shuffle); flushes at the end."""
    if size <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = s
    rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------------------------
# Streaming


def slot_samples(refs: Sequence[ShardRef], decoder: SampleDecoder, seed: int, slot: int, n_slots: int, buffer: int,
                 start_pass: int = 0, skip: int = 0, infinite: bool = True) -> Iterator[tuple]:
    """Stream ``slot`` of ``n_slots``: its samples pass after pass (one pass unless ``infinite``),
    from ``skip`` samples into pass ``start_pass``.

    Pass ``e`` of a stream is its :func:`slot_pieces` of that pass's shard order (seeded by
    ``(seed, e)``), read INTERLEAVE shards at a time, through a shuffle buffer of ``buffer``
    samples seeded by ``(seed, e, slot)`` and flushed at the end of the pass. Nothing here
    depends on ranks, workers or batches, so a stream is the same sequence in any layout.
    Skipping reads and discards (at most one pass of this stream).
    """
    counts = [r.num_samples for r in refs]
    for e in itertools.count(start_pass) if infinite else [start_pass]:
        pieces = slot_pieces(counts, shard_order(len(refs), seed, e), slot, n_slots)
        rng = random.Random(derive_seed("stream", seed, e, slot))
        reads = (read_shard(refs[p.shard], decoder, p.start, p.stop) for p in pieces)
        n = 0
        for item in itertools.islice(_shuffled(interleave(reads, INTERLEAVE), buffer, rng), skip, None):
            n += 1
            yield item
        if infinite and n == skip == 0:  # would spin forever
            raise ShardError(f"stream {slot} of {n_slots}: its {len(pieces)} shard(s) of pass {e} hold no sample")
        skip = 0


def slot_readable(counts: Sequence[int | None], n_slots: int) -> list[bool]:
    """Which streams get any sample in a pass (with unknown counts: any shard)."""
    sizes = slot_sizes(counts, n_slots)
    return [v < len(counts) for v in range(n_slots)] if sizes is None else [n > 0 for n in sizes]


def deal_order(seed: int, n_slots: int) -> list[int]:
    """The streams in the order a reader deals them when their counts tie: a fixed shuffle, since
    neighbouring streams hold neighbouring parts of the shard order (index order would fill a
    batch from one region of it). Depends on the seed and the number of streams only."""
    order = list(range(n_slots))
    random.Random(derive_seed("deal", seed, n_slots)).shuffle(order)
    return order


def reader_streams(order: Sequence[int], readable: Sequence[bool], world_size: int, workers: int, rank: int,
                   reader: int) -> list[int]:
    """The streams reader ``reader`` of rank ``rank`` deals, in ``order``: stream ``v`` belongs to
    rank ``v % world_size`` and, within it, to reader ``(v // world_size) % workers``."""
    return [v for v in order if readable[v] and v % world_size == rank and (v // world_size) % workers == reader]


def _dealt(streams: Sequence[Iterator[Any]], taken: Sequence[int]) -> Iterator[Any]:
    """Samples one at a time from the stream that has given the fewest (counting from ``taken``;
    ties go to the earliest in ``streams``); a stream that ends drops out. See :func:`dealt_counts`."""
    heap = [(t, k) for k, t in enumerate(taken)]
    heapq.heapify(heap)
    while heap:
        t, k = heap[0]
        item = next(streams[k], _END)
        if item is _END:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (t + 1, k))
            yield item


def dealt_counts(taken: Sequence[int], n: int) -> list[int]:
    """The counts after :func:`_dealt` gave ``n`` more samples from streams that do not end: the
    lowest counts are raised to a common level, then the earliest streams at it take one more."""
    if not taken or n <= 0:
        return list(taken)

    def cost(level: int) -> int:
        return sum(max(0, level - t) for t in taken)

    lo, hi = min(taken), min(taken) + n  # the highest level that n samples reach
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= n else (lo, mid - 1)
    out, extra = [max(t, lo) for t in taken], n - cost(lo)
    for k, t in enumerate(out):
        if extra and t == lo:
            out[k], extra = t + 1, extra - 1
    return out


class LatentStream(IterableDataset):
    """Batches of one rank, dealt from its streams; DataLoader worker ``w`` is the rank's reader
    ``(w + rotation) % num_workers`` (see :class:`StreamLoader`); every rank must use the same
    ``num_workers``. ``starts[v]`` is (pass, samples into it) where stream ``v`` goes on,
    ``taken[v]`` its count so far (the dealing evens counts out)."""

    def __init__(self, refs: Sequence[ShardRef], latent_shape: Sequence[int], num_classes: int | None,
                 batch_size: int, rank: int, world_size: int, seed: int, n_slots: int, slot_buffer: int,
                 starts: Sequence[tuple[int, int]], taken: Sequence[int], rotation: int = 0, infinite: bool = True,
                 repr_shape: Sequence[int] | None = None):
        super().__init__()
        self.refs = list(refs)
        self.repr_shape = None if repr_shape is None else tuple(repr_shape)
        self.shape = tuple(latent_shape)
        self.num_classes = num_classes
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.n_slots, self.slot_buffer, self.infinite = n_slots, slot_buffer, infinite
        self.starts, self.taken, self.rotation = list(starts), list(taken), rotation

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        readable = slot_readable([r.num_samples for r in self.refs], self.n_slots)
        mine = reader_streams(deal_order(self.seed, self.n_slots), readable, self.world_size, nw, self.rank,
                              (wid + self.rotation) % nw)
        decoder = SampleDecoder(self.shape, self.num_classes, self.repr_shape)
        streams = [slot_samples(self.refs, decoder, self.seed, v, self.n_slots, self.slot_buffer, *self.starts[v],
                                infinite=self.infinite) for v in mine]
        yield from _batches(_dealt(streams, [self.taken[v] for v in mine]), self.shape, self.batch_size,
                            self.repr_shape)


class StreamLoader:
    """Iterable of :class:`Batch` from shards through a DataLoader (workers read, main gets batches).

    Streams. Each pass over the shard set (shard order seeded by ``(seed, pass)``) is cut into
    ``slots`` (``data.stream_slots``) contiguous ranges of ``floor``/``ceil(N / slots)``
    samples; stream ``v`` reads its range of pass after pass, through its own shuffle buffer
    (``shuffle_buffer // slots`` samples, seeded by ``(seed, pass, v)``). A stream's sequence
    depends on the seed, the shard set, ``slots`` and ``shuffle_buffer`` only, never on ranks,
    workers or batch size (:func:`slot_samples`). Rank ``r`` owns the streams ``v % world_size ==
    r``, split among its readers (DataLoader workers) by ``(v // world_size) % num_workers``; a
    reader fills its batches one sample at a time from the stream it has taken fewest from. Every
    rank yields as many batches per optimizer step, so after ``m`` batches each stream's count
    is a function of ``m`` and the layout, the same on every rank (:meth:`position`), and their
    sum is the run's sample count (``Progress.patches`` in training: one patch per sample).

    Exact mode (``infinite=False``): one iteration is one pass in which every sample of the set
    is yielded exactly once across all ranks and workers; a rank gets its streams' samples (about
    ``N / world_size``, whatever the shard sizes), so ranks may end with a different number of
    batches, each reader's last batch being partial; a distributed evaluation must therefore
    all-reduce sums/counts rather than assume equal steps. Each new iteration is the next pass.

    Resume (infinite mode), the guarantee: ``state_dict()`` is each stream's count, identical on
    every rank; after ``load_state_dict()`` each stream skips exactly that many samples, under ANY
    world size, ``num_workers`` or batch size with ``world_size * num_workers <= slots`` (more
    readers are refused). So the samples drawn before the checkpoint and after the resume are
    exactly what an uninterrupted reading of the same streams gives: no sample repeats and none
    is skipped (each pass of the streams holds every sample once). Only the order in which the
    continuation deals the streams depends on the new layout; with the same layout and batch size
    it is the uninterrupted run's, bit for bit. Kept fixed for this: the seed, the shard set, ``slots`` and
    ``shuffle_buffer`` (another ``shuffle_buffer`` or shard set keeps the counts but warns: the
    continuation is approximate). Skipping reads and discards at most one pass of each stream,
    spread over the readers.

    User URLs (``data.urls``, no per-shard counts): streams get whole shards (every ``slots``-th
    of the pass's order, so a set of fewer shards than ``slots`` leaves streams empty) and a
    stream's pass size is unknown, so a resume restarts the streams at the start of the pass the
    run's sample count falls in (counted with the manifest's ``num_samples``): nothing of that
    pass is skipped, but what the run drew of it before comes again.

    A state this loader cannot continue exactly (the per-rank salted loader of older versions, an
    in-memory position, another ``slots``) warns and keeps the position :meth:`seek` gave: the
    run's sample count dealt evenly over the streams, approximate for the current pass.
    """

    def __init__(self, info: DatasetInfo, refs: Sequence[ShardRef], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 16384, num_workers: int = 0,
                 infinite: bool = True, pin_memory: bool = False, slots: int = DataConfig.stream_slots):
        self.info = info
        self.refs = with_indexes(refs, first=rank * len(refs) // max(world_size, 1))  # a stream's piece seeks to its start
        self.latent_shape, self.num_classes, self.vae = info.latent_shape, info.num_classes, info.vae
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer, self.num_workers, self.infinite = shuffle_buffer, num_workers, infinite
        self.pin_memory = pin_memory
        self.slots = slots
        self.slot_buffer = shuffle_buffer // max(slots, 1)
        self._counts = [r.num_samples for r in self.refs]
        self._sizes = None if slots < 1 else slot_sizes(self._counts, slots)
        self._check_layout()
        self._readable = slot_readable(self._counts, slots)
        self._order = deal_order(seed, slots)
        self.taken = [0] * slots  # each stream's count when the batches below began
        self.rotation = 0  # DataLoader worker w is reader (w + rotation) % workers
        self.batches = 0  # batches this rank yielded since (every rank yields as many)
        self.passes = 0  # exact mode: passes done
        self._url_pass = 0  # unknown counts: the pass the streams start at

    @property
    def workers(self) -> int:
        """Readers per rank: the DataLoader's workers, or the main process when there are none."""
        return max(1, self.num_workers)

    def _check_layout(self) -> None:
        """Refuse more readers than streams, and (infinite mode) a reader with nothing to read,
        which would spin forever."""
        readers = self.world_size * self.workers
        if self.slots < 1 or readers > self.slots:
            raise ValueError(
                f"data.stream_slots={self.slots} streams cannot feed {self.world_size} rank(s) x {self.workers} "
                f"reader(s) = {readers} readers: use fewer data.num_workers, or start the run with "
                f"data.stream_slots >= {readers} (it fixes the sample order, so it stays for the whole run)")
        if not self.infinite:
            return
        readable, order = slot_readable(self._counts, self.slots), deal_order(self.seed, self.slots)
        for r in range(self.world_size):
            for w in range(self.workers):
                if not reader_streams(order, readable, self.world_size, self.workers, r, w):
                    what = (f"{len(self.refs)} shard URLs" if self._sizes is None
                            else f"{sum(self._counts)} samples")
                    raise ShardError(f"{what} in data.stream_slots={self.slots} streams leave reader {w} of rank {r} "
                                     f"({readers} readers) with nothing to read: use fewer workers")

    def position(self) -> list[int]:
        """Samples the whole run has taken from each stream so far: the same on every rank."""
        taken = list(self.taken)
        if not self.infinite or not self.batches:
            return taken
        W = self.workers
        for w in range(W):  # DataLoader worker w made batches w, w + W, ...
            made = (self.batches - w + W - 1) // W
            for r in range(self.world_size):
                mine = reader_streams(self._order, self._readable, self.world_size, W, r, (w + self.rotation) % W)
                for v, t in zip(mine, dealt_counts([taken[v] for v in mine], made * self.batch_size)):
                    taken[v] = t
        return taken

    def _starts(self) -> list[tuple[int, int]]:
        """(pass, samples into it) of each stream at its count."""
        if self._sizes is None:
            return [(self._url_pass, 0)] * self.slots
        return [divmod(t, n) if n else (0, 0) for t, n in zip(self.taken, self._sizes)]

    def _dataset(self) -> LatentStream:
        if self.infinite:  # the batches so far folded into the counts; worker 0 goes on as the next reader
            self.taken, self.rotation = self.position(), (self.rotation + self.batches) % self.workers
            self.batches = 0
            starts, taken, rotation = self._starts(), self.taken, self.rotation
        else:
            starts, taken, rotation = [(self.passes, 0)] * self.slots, [0] * self.slots, 0
        return LatentStream(self.refs, self.latent_shape, self.num_classes, self.batch_size, self.rank,
                            self.world_size, self.seed, self.slots, self.slot_buffer, starts, taken, rotation,
                            self.infinite, self.info.repr_shape)

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(self._dataset(), batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)
        for batch in loader:
            self.batches += 1
            yield batch
        self.passes += 1

    def state_dict(self) -> dict[str, Any]:
        """The streams' position (ints and a list of ints), identical on every rank."""
        taken = self.position()
        known = self._sizes is not None
        return {"kind": "streams", "slots": self.slots, "taken": taken, "samples": sum(taken),
                "rotation": (self.rotation + self.batches) % self.workers, "world_size": self.world_size,
                "num_workers": self.workers, "seed": self.seed, "slot_buffer": self.slot_buffer,
                "num_samples": sum(self._counts) if known else -1, "num_shards": len(self.refs),
                "passes": self.passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "taken" not in state:
            warnings.warn(f"loader state {sorted(state)} is not a stream position (an older checkpoint's, or in-memory "
                          f"mode's): the streams go on where the run's sample count puts them "
                          f"({sum(self.taken):,} samples), so this pass is approximate")
            return
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader uses seed {self.seed}")
        taken = [int(t) for t in state["taken"]]
        if int(state["slots"]) != self.slots or len(taken) != self.slots:
            warnings.warn(f"loader state of {state['slots']} streams, data.stream_slots is {self.slots}: the sample "
                          f"order changed; the new streams go on where the run's {sum(taken):,} samples put them, "
                          "so this pass is approximate")
            self.seek(sum(taken))
            return
        now = {"slot_buffer": self.slot_buffer, "num_shards": len(self.refs),
               "num_samples": sum(self._counts) if self._sizes is not None else -1}
        changed = [k for k, v in now.items() if k in state and int(state[k]) != v]
        if changed:
            warnings.warn(f"loader state of another {', '.join(changed)} (data.shuffle_buffer or the shard set "
                          "changed): the streams differ, so the continuation is approximate")
        same = int(state.get("world_size", 0)) == self.world_size and int(state.get("num_workers", 0)) == self.workers
        self.taken, self.batches, self.passes = taken, 0, int(state.get("passes", 0))
        self.rotation = int(state.get("rotation", 0)) % self.workers if same else 0
        self._url_pass = sum(taken) // self.info.num_samples if self.info.num_samples > 0 else 0

    def seek(self, samples: int) -> None:
        """Put the streams where ``samples`` drawn by the whole run leave them when dealt evenly
        (as one reader from the start deals them): what a resume starts from before it loads the
        saved position, and keeps when that cannot be used."""
        mine = [v for v in self._order if self._readable[v]]
        self.taken = [0] * self.slots
        for v, t in zip(mine, dealt_counts([0] * len(mine), int(samples))):
            self.taken[v] = t
        self.rotation, self.batches = 0, 0
        self._url_pass = int(samples) // self.info.num_samples if self.info.num_samples > 0 else 0
