"""Latent shards back into training batches of (mean, std, label), streamed or held in RAM.

Two ways to read the shards (``shards/``; format in docs/design.md):

- **Streaming** (:class:`StreamLoader`): tar shards are read member by member in DataLoader
  workers, shuffled by shard order and a sample buffer, split across ranks and workers by
  *sample ranges*, so an exact pass yields every sample once whatever the shard sizes.
  (webdataset's split_by_node / split_by_worker deal whole shards, which leaves ranks with
  unequal or empty shares; the manifest's per-shard counts let us cut evenly instead.
  webdataset still opens the user's own URLs, ``pipe:`` included, through ``gopen``.)
- **In memory** (:class:`MemoryLoader`): every sample is read once into one contiguous
  ``(N, 2, C, h, w)`` float16 array (optionally a memory-mapped ``.npy`` cache shared by all
  ranks of a node); batches are random gathers, in an order that is a pure function of
  ``(seed, epoch)`` so a run resumes at exactly the same batch.

Samples are decoded by ``shards.reader`` (nothing is ever unpickled). The posterior sample
``mean + std * eps`` is drawn on the training device by ``codec.draw_latent``, never here: on
the CPU ``randn`` would cost more than all the reading.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from . import latent_cache
from .config import DataConfig
from .fsutil import sha256_file
from .seeds import derive_seed
from .shards import (
    SampleDecoder, ShardError, ShardRef, manifest_file, open_manifest, read_shard, refs_from_manifest, refs_from_urls,
    verify_shards,
)

_F16 = np.dtype("<f2")

# ----------------------------------------------------------------------------------------------
# Deterministic order and split


class Piece(NamedTuple):
    shard: int
    start: int
    stop: int | None


def plan_pieces(counts: Sequence[int | None], order: Sequence[int], n_slots: int) -> list[list[Piece]]:
    """Split one pass over the shards (in ``order``) among ``n_slots`` readers.

    With known counts the concatenated samples are cut into ``n_slots`` contiguous ranges of
    ``floor``/``ceil(total / n_slots)`` samples, so readers differ by at most one sample however
    uneven the shards are. With unknown counts (user URLs) whole shards are dealt round-robin
    and readers may differ by a whole shard.
    """
    plan: list[list[Piece]] = [[] for _ in range(n_slots)]
    if any(c is None for c in counts):
        for i, j in enumerate(order):
            plan[i % n_slots].append(Piece(j, 0, None))
        return plan
    total = sum(counts)
    bounds = [s * total // n_slots for s in range(n_slots + 1)]
    pos = 0
    for j in order:
        a, b = pos, pos + counts[j]
        for s in range(n_slots):
            lo, hi = max(a, bounds[s]), min(b, bounds[s + 1])
            if lo < hi:
                plan[s].append(Piece(j, lo - a, hi - a))
        pos = b
    return plan


def shard_order(n: int, seed: int, epoch: int, salt: int = 0) -> list[int]:
    order = list(range(n))
    random.Random(derive_seed("shards", seed, epoch, salt)).shuffle(order)
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
# Batches


class Batch(NamedTuple):
    """``mean``/``std`` float16 (B, C, h, w), unscaled; ``label`` int64 (B,)."""

    mean: torch.Tensor
    std: torch.Tensor
    label: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


def _batches(samples: Iterator[tuple[np.ndarray, int]], shape: tuple, batch_size: int) -> Iterator[Batch]:
    """Copy samples straight into one (2, B, C, h, w) buffer so mean and std come out contiguous."""
    while True:
        buf = np.empty((2, batch_size, *shape), _F16)
        labels = np.empty(batch_size, np.int64)
        n = 0
        for latent, y in itertools.islice(samples, batch_size):
            buf[:, n] = latent
            labels[n] = y
            n += 1
        if n == 0:
            return
        t = torch.from_numpy(buf)
        yield Batch(t[0, :n], t[1, :n], torch.from_numpy(labels[:n]))
        if n < batch_size:
            return


# ----------------------------------------------------------------------------------------------
# Streaming


class LatentStream(IterableDataset):
    """Batches from tar shards for one rank; each DataLoader worker reads its own slice.

    Reader slot = ``rank * num_workers + worker`` of ``world_size * num_workers``: every rank
    must use the same ``num_workers`` for the exact split to hold. A pass ("epoch") permutes
    the shards with ``(seed, epoch, salt)`` and hands each slot a contiguous sample range; the
    infinite mode runs pass after pass (each sample once per pass across all slots), with the
    shuffle buffer carried across pass boundaries.
    """

    def __init__(self, refs: Sequence[ShardRef], latent_shape: Sequence[int], num_classes: int | None,
                 batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 2000, infinite: bool = True, start_epoch: int = 0, salt: int = 0):
        super().__init__()
        self.refs = list(refs)
        self.shape = tuple(latent_shape)
        self.num_classes = num_classes
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.infinite = seed, shuffle_buffer, infinite
        self.start_epoch, self.salt = start_epoch, salt

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def _check_feedable(self, n_slots: int) -> None:
        """An infinite reader with nothing to read would spin forever: refuse it up front."""
        counts = [r.num_samples for r in self.refs]
        if any(c is None for c in counts):
            if len(self.refs) < n_slots:
                raise ShardError(f"{len(self.refs)} shard URLs for {n_slots} readers (ranks x workers): "
                                 "give at least one shard per reader or use fewer workers")
        elif sum(counts) < n_slots:
            raise ShardError(f"{sum(counts)} samples for {n_slots} readers (ranks x workers): use fewer workers")

    def samples(self) -> Iterator[tuple[np.ndarray, int]]:
        """This slot's samples, before shuffling: pass after pass (infinite) or one pass."""
        slot, n_slots = self._slot()
        if self.infinite:
            self._check_feedable(n_slots)
        decoder = SampleDecoder(self.shape, self.num_classes)
        counts = [r.num_samples for r in self.refs]
        epochs = itertools.count(self.start_epoch) if self.infinite else [self.start_epoch]
        for epoch in epochs:
            order = shard_order(len(self.refs), self.seed, epoch, self.salt)
            pieces = plan_pieces(counts, order, n_slots)[slot]
            yield from interleave((read_shard(self.refs[p.shard], decoder, p.start, p.stop) for p in pieces),
                                  INTERLEAVE)

    def __iter__(self) -> Iterator[Batch]:
        slot, n_slots = self._slot()
        rng = random.Random(derive_seed("samples", self.seed, self.start_epoch, self.salt, slot, n_slots))
        yield from _batches(_shuffled(self.samples(), self.shuffle_buffer, rng), self.shape, self.batch_size)


@dataclass
class DatasetInfo:
    """What the trainer checks against its own config: shapes, classes, the VAE's factors."""

    manifest: dict
    latent_shape: tuple[int, int, int]
    num_classes: int
    vae: dict
    num_samples: int

    @classmethod
    def from_manifest(cls, m: dict) -> "DatasetInfo":
        return cls(m, tuple(m["latent_shape"]), len(m["class_names"]), dict(m["vae"]), int(m["num_samples"]))


class StreamLoader:
    """Iterable of :class:`Batch` from shards through a DataLoader (workers read, main gets batches).

    Exact mode (``infinite=False``): one iteration is one pass in which every sample of the set
    is yielded exactly once across all ranks and workers. Ranks get ``floor`` or ``ceil`` of
    ``N / world_size`` samples (shard sizes do not matter: readers split by sample ranges), so
    ranks may end with a different number of batches, each reader's last batch being partial;
    a distributed evaluation must therefore all-reduce sums/counts rather than assume equal
    steps. Each new iteration is the next pass, reshuffled.

    Resume is APPROXIMATE in streaming mode: ``state_dict()`` records the samples this rank was
    given; loading it restarts at the pass that count falls in, with a reshuffled order (salted
    by the count), so some samples of that pass repeat and some are skipped. Use the in-memory
    mode when exact resumption matters.
    """

    def __init__(self, info: DatasetInfo, refs: Sequence[ShardRef], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 2000, num_workers: int = 0,
                 infinite: bool = True, pin_memory: bool = False):
        self.info, self.refs = info, list(refs)
        self.latent_shape, self.num_classes, self.vae = info.latent_shape, info.num_classes, info.vae
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer, self.num_workers, self.infinite = shuffle_buffer, num_workers, infinite
        self.pin_memory = pin_memory
        self.samples_seen = 0
        self.passes = 0

    def _dataset(self) -> LatentStream:
        counts = [r.num_samples for r in self.refs]
        total = None if any(c is None for c in counts) else sum(counts)
        if self.infinite:
            epoch, salt = (self.samples_seen * self.world_size // total if total else 0), self.samples_seen
        else:
            epoch, salt = self.passes, 0
        return LatentStream(self.refs, self.latent_shape, self.num_classes, self.batch_size, self.rank,
                            self.world_size, self.seed, self.shuffle_buffer, self.infinite, epoch, salt)

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(self._dataset(), batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)
        for batch in loader:
            self.samples_seen += len(batch.label)
            yield batch
        self.passes += 1

    def state_dict(self) -> dict[str, int]:
        """Best-effort position (plain ints); see the class docstring: resume is approximate."""
        return {"samples_seen": self.samples_seen, "passes": self.passes}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples_seen = int(state["samples_seen"])
        self.passes = int(state.get("passes", 0))


# ----------------------------------------------------------------------------------------------
# In memory


def _as_items(a: np.ndarray, lead: int) -> np.ndarray:
    """View a C-contiguous array's first ``lead`` axes as opaque items of the trailing bytes.

    Copying such items is one memcpy each instead of a per-element float16 loop.
    """
    row = math.prod(a.shape[lead:]) * a.itemsize
    return a.reshape(*a.shape[:lead], -1).view(np.dtype((np.void, row)))[..., 0]


class MemoryLoader:
    """Random batches gathered from one in-RAM (or memory-mapped) ``(N, 2, C, h, w)`` array.

    Order is stateless: epoch ``e`` is ``randperm(N)`` from a generator seeded with
    ``(seed, e)``, and rank ``r`` takes the strided slice ``perm[r::world_size]``, so the ranks'
    samples are disjoint and together cover each epoch once. The position is just
    ``(epoch, cursor)`` within this rank's slice, so ``state_dict()`` / ``load_state_dict()``
    resume at exactly the next batch. Infinite mode lets a batch run over into the next epoch
    (nothing is dropped); exact mode yields the rest of the current epoch (last batch partial)
    and then moves on to the next epoch, so the next iteration is the following pass.
    """

    def __init__(self, info: DatasetInfo, latents: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, infinite: bool = True, pin_memory: bool = False):
        if latents.dtype != torch.float16 or latents.dim() != 5 or latents.shape[1] != 2 or not latents.is_contiguous():
            raise ValueError(f"latents must be contiguous float16 (N, 2, C, h, w), got {tuple(latents.shape)}")
        if infinite and len(latents) < world_size:
            raise ShardError(f"{len(latents)} samples cannot feed {world_size} ranks")
        self.info = info
        self.latent_shape, self.num_classes, self.vae = info.latent_shape, info.num_classes, info.vae
        self.latents, self.labels = latents, labels
        # 2N opaque half-rows: mean_0, std_0, mean_1, std_1, ...
        self._halves = _as_items(latents.numpy().reshape(-1, *latents.shape[2:]), 1)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.infinite, self.pin_memory = infinite, pin_memory
        self.epoch, self.cursor = 0, 0
        self._slice_epoch, self._slice = -1, torch.empty(0, dtype=torch.int64)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``: a pure function of (seed, epoch, rank, world)."""
        if epoch != self._slice_epoch:
            g = torch.Generator().manual_seed(derive_seed("memory", self.seed, epoch))
            perm = torch.randperm(len(self.latents), generator=g)
            self._slice, self._slice_epoch = perm[self.rank :: self.world_size].contiguous(), epoch
        return self._slice

    def _take(self, n: int) -> torch.Tensor:
        """Up to ``n`` next indices, advancing the position (across epochs in infinite mode)."""
        parts = []
        while n > 0:
            idx = self.epoch_indices(self.epoch)
            part = idx[self.cursor : self.cursor + n]
            parts.append(part)
            self.cursor += len(part)
            n -= len(part)
            if self.cursor >= len(idx) and self.infinite:
                self.epoch, self.cursor = self.epoch + 1, 0
            elif self.cursor >= len(idx):
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def gather(self, idx: torch.Tensor) -> Batch:
        """Rows ``idx`` as a batch whose mean and std are contiguous blocks of one (2, B, ...) tensor.

        The array is viewed as 2N opaque half-rows (mean of sample i at 2i, std at 2i+1), so one
        ``np.take`` copies each half-row once, straight into place. Single-threaded on purpose:
        torch's parallel index_select collapses when the CPU is oversubscribed (measured ~10k vs
        ~300k samples/s on a busy 2-core box) and a memory-bound copy gains little from threads.
        ``mode="clip"`` only skips numpy's buffered bounds check: indices come from randperm.
        """
        i = idx.numpy()
        halves = np.concatenate([2 * i, 2 * i + 1])
        out = torch.empty((2, len(i), *self.latent_shape), dtype=torch.float16, pin_memory=self.pin_memory)
        dst = _as_items(out.numpy().reshape(2 * len(i), *self.latent_shape), 1)
        np.take(self._halves, halves, out=dst, mode="clip")
        return Batch(out[0], out[1], self.labels.index_select(0, idx))

    def __iter__(self) -> Iterator[Batch]:
        if not self.infinite and 0 < len(self.epoch_indices(self.epoch)) <= self.cursor:
            self.epoch, self.cursor = self.epoch + 1, 0  # the previous pass was finished
        while True:
            idx = self._take(self.batch_size)
            if len(idx) == 0:
                break
            yield self.gather(idx)
            if not self.infinite and self.cursor >= len(self.epoch_indices(self.epoch)):
                break
        if not self.infinite:
            self.epoch, self.cursor = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Exact position as plain ints, for the training checkpoint."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader uses seed {self.seed}")
        cursor, ws = int(state["cursor"]), int(state.get("world_size", self.world_size))
        if ws != self.world_size:  # strided slices differ: keep the epoch, map the progress
            warnings.warn(f"loader state from world size {ws}, now {self.world_size}: resume is approximate")
            cursor = cursor * ws // self.world_size
        self.epoch, self.cursor = int(state["epoch"]), cursor


class _ShardArrays(Dataset):
    """Map-style view of whole shards, so a DataLoader's workers read shards in parallel."""

    def __init__(self, refs: Sequence[ShardRef], latent_shape: Sequence[int], num_classes: int | None):
        self.refs, self.shape, self.num_classes = list(refs), tuple(latent_shape), num_classes

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        rows = list(read_shard(self.refs[j], SampleDecoder(self.shape, self.num_classes)))
        lat = np.empty((len(rows), 2, *self.shape), _F16)
        for i, (latent, _) in enumerate(rows):
            lat[i] = latent
        return j, torch.from_numpy(lat), torch.tensor([y for _, y in rows], dtype=torch.int64)


def read_all(refs: Sequence[ShardRef], info: DatasetInfo, out: np.ndarray, num_workers: int = 0) -> np.ndarray:
    """Fill ``out`` (N, 2, C, h, w) with every sample in manifest order; returns the labels."""
    offsets = np.cumsum([0] + [r.num_samples for r in refs])
    labels = np.empty(offsets[-1], np.int64)
    ds = _ShardArrays(refs, info.latent_shape, info.num_classes)
    for j, lat, lab in DataLoader(ds, batch_size=None, num_workers=num_workers):
        out[offsets[j] : offsets[j + 1]] = lat.numpy()
        labels[offsets[j] : offsets[j + 1]] = lab.numpy()
    return labels


def iter_shards(refs: Sequence[ShardRef], info: DatasetInfo, todo: Sequence[int],
                num_workers: int = 0) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(shard index, its first row in manifest order, latents, labels) for the shards ``todo``."""
    offsets = np.cumsum([0] + [r.num_samples for r in refs])
    ds = torch.utils.data.Subset(_ShardArrays(refs, info.latent_shape, info.num_classes), list(todo))
    for j, lat, lab in DataLoader(ds, batch_size=None, num_workers=num_workers):
        yield j, int(offsets[j]), lat.numpy(), lab.numpy()


def load_arrays(refs: Sequence[ShardRef], info: DatasetInfo, cache: Path | None = None,
                manifest_digest: str = "", num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples as tensors (N, 2, C, h, w) float16 and (N,) int64, from the cache if given.

    With a cache, the first process to take its lock builds it (or continues a killed build)
    and every other process polls for it (``latent_cache``: no collective, so no timeout), then
    every process maps the same file: the OS page cache holds one copy per node.
    """
    shape = (info.num_samples, 2, *info.latent_shape)
    if cache is None:
        out = np.empty(shape, _F16)
        labels = read_all(refs, info, out, num_workers)
        return torch.from_numpy(out), torch.from_numpy(labels)
    lat, lab = latent_cache.ensure(cache, manifest_digest, shape, len(refs),
                                   lambda todo: iter_shards(refs, info, todo, num_workers))
    return torch.from_numpy(lat), torch.from_numpy(lab)


def cache_path(cfg: DataConfig) -> Path | None:
    """``data.cache`` as a path: "auto" is ``latents-cache.npy`` beside the manifest; None is no cache."""
    if cfg.cache is None:
        return None
    return manifest_file(cfg.shards).parent / "latents-cache.npy" if cfg.cache == "auto" else Path(cfg.cache)


# ----------------------------------------------------------------------------------------------
# Factory and the posterior sample


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 infinite: bool = True) -> StreamLoader | MemoryLoader:
    """The loader the training loop uses: streaming or in-memory per ``cfg``, for one rank."""
    if cfg.batch_size < 1 or cfg.num_workers < 0 or cfg.shuffle_buffer < 0:
        raise ValueError(f"data config: batch_size >= 1, num_workers >= 0, shuffle_buffer >= 0 needed, got {cfg}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    mpath = manifest_file(cfg.shards)
    manifest = open_manifest(mpath)
    info = DatasetInfo.from_manifest(manifest)
    root = mpath.parent
    if cfg.verify:
        problems = verify_shards(mpath, deep=False, strays=False)
        if problems:
            raise ShardError("data.verify: " + "; ".join(problems))
    pin = torch.cuda.is_available()
    if cfg.in_memory:
        if cfg.urls:
            raise ValueError("data.in_memory reads the manifest's shards; data.urls is for streaming only")
        cache = cache_path(cfg)
        digest = sha256_file(mpath) if cache is not None else ""
        lat, lab = load_arrays(refs_from_manifest(manifest, root), info, cache, digest, cfg.num_workers)
        return MemoryLoader(info, lat, lab, cfg.batch_size, rank, world_size, cfg.seed, infinite, pin)
    refs = refs_from_urls(cfg.urls) if cfg.urls else refs_from_manifest(manifest, root)
    return StreamLoader(info, refs, cfg.batch_size, rank, world_size, cfg.seed, cfg.shuffle_buffer,
                        cfg.num_workers, infinite, pin)
