"""Latent shards back into training batches of (mean, std, label), streamed or held in RAM.

Two ways to read the shards (``shards/``; format in docs/design.md):

- **Streaming** (:class:`~latent_patch.stream.StreamLoader`, in ``stream.py``): tar shards read
  member by member in DataLoader workers as a fixed number of sample streams dealt to the ranks'
  readers, so a run resumes exactly under any world size.
- **In memory** (:class:`MemoryLoader`, here): every sample is read once into one contiguous
  ``(N, 2, C, h, w)`` float16 array (optionally a memory-mapped ``.npy`` cache shared by all
  ranks of a node); batches are random gathers, in an order that is a pure function of
  ``(seed, epoch)`` and the run's sample count, so a run resumes exactly under any world size.

:func:`build_loader` picks one per the config. Samples are decoded by ``shards.reader`` (nothing
is ever unpickled). The posterior sample ``mean + std * eps`` is drawn on the training device by
``codec.draw_latent``, never here: on the CPU ``randn`` would cost more than all the reading.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import latent_cache
from .config import DataConfig
from .fsutil import sha256_file
from .seeds import derive_seed
from .shards import (
    SampleDecoder, ShardError, ShardRef, manifest_file, open_manifest, read_shard, refs_from_manifest, refs_from_urls,
    verify_shards,
)
from .stream import _F16, Batch, DatasetInfo, StreamLoader


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

    Order is stateless: epoch ``e`` is ``randperm(N)`` from a generator seeded with ``(seed, e)``,
    the epochs follow each other as one sequence ``perm_0 ++ perm_1 ++ ...``, and rank ``r`` of
    ``world_size`` takes every ``world_size``-th element of it, from element ``G + r`` on, where
    ``G`` is the run's position: the samples drawn by all ranks so far.

    Resume, the guarantee: every rank draws as many samples per optimizer step, so what the ranks
    drew together is exactly the sequence's first ``G`` elements. ``state_dict()`` is ``G`` (as
    epoch and offset, identical on every rank) and ``load_state_dict()`` (or :meth:`seek` with
    the run's sample count) continues at element ``G`` under ANY world size: no sample repeats
    and none is skipped, and with the same world size the batches are the uninterrupted run's,
    bit for bit. Infinite mode runs over epoch boundaries (nothing is dropped); exact mode yields
    this rank's share of the rest of the current epoch (last batch partial) and then moves on to
    the next epoch, so the next iteration is the following pass.
    """

    def __init__(self, info: DatasetInfo, latents: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, infinite: bool = True, pin_memory: bool = False,
                 features: torch.Tensor | None = None):
        if latents.dtype != torch.float16 or latents.dim() != 5 or latents.shape[1] != 2 or not latents.is_contiguous():
            raise ValueError(f"latents must be contiguous float16 (N, 2, C, h, w), got {tuple(latents.shape)}")
        if features is not None and (features.dtype != torch.float16 or len(features) != len(latents)
                                     or not features.is_contiguous()):
            raise ValueError(f"features must be contiguous float16 (N, gh, gw, K) for the {len(latents)} latents, "
                             f"got {features.dtype} {tuple(features.shape)}")
        if infinite and len(latents) < world_size:
            raise ShardError(f"{len(latents)} samples cannot feed {world_size} ranks")
        self.info = info
        self.latent_shape, self.num_classes, self.vae = info.latent_shape, info.num_classes, info.vae
        self.latents, self.labels = latents, labels
        # 2N opaque half-rows: mean_0, std_0, mean_1, std_1, ...
        self._halves = _as_items(latents.numpy().reshape(-1, *latents.shape[2:]), 1)
        self.features = features  # the representation grids (align.py), gathered with the latents
        self._feature_rows = None if features is None else _as_items(features.numpy(), 1)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.infinite, self.pin_memory = infinite, pin_memory
        self.n = len(latents)
        self.start, self.taken = 0, 0  # the run's position when this rank began counting; its samples since
        self._perms: dict[int, torch.Tensor] = {}

    def position(self) -> int:
        """Samples drawn by all ranks so far (each rank drew ``taken`` since ``start``)."""
        return self.start + self.world_size * self.taken

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s permutation: a pure function of (seed, epoch)."""
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(derive_seed("memory", self.seed, epoch))
            perm = torch.randperm(self.n, generator=g)
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = perm
        return perm

    def _next(self) -> int:
        """Where in the sequence this rank's next sample is."""
        return self.start + self.rank + self.world_size * self.taken

    def _left_in_epoch(self) -> int:
        """This rank's samples still to come in the current epoch (exact mode)."""
        if self.n == 0:
            return 0
        end = (self.start // self.n + 1) * self.n
        return max(0, -(-(end - self._next()) // self.world_size))

    def _take(self, n: int) -> torch.Tensor:
        """Up to ``n`` next indices, advancing the position (across epochs in infinite mode)."""
        if not self.infinite:
            n = min(n, self._left_in_epoch())
        if n <= 0 or self.n == 0:
            return torch.empty(0, dtype=torch.int64)
        pos = self._next() + self.world_size * torch.arange(n)
        self.taken += n
        first, last = int(pos[0]) // self.n, int(pos[-1]) // self.n
        if first == last:
            return self.epoch_order(first)[pos - first * self.n]
        out, epochs = torch.empty(n, dtype=torch.int64), pos // self.n
        for e in range(first, last + 1):
            sel = epochs == e
            out[sel] = self.epoch_order(e)[pos[sel] - e * self.n]
        return out

    def _next_epoch(self) -> None:
        self.start, self.taken = (self.start // self.n + 1) * self.n if self.n else 0, 0

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
        feats = None
        if self.features is not None:
            feats = torch.empty((len(i), *self.features.shape[1:]), dtype=torch.float16, pin_memory=self.pin_memory)
            np.take(self._feature_rows, i, out=_as_items(feats.numpy(), 1), mode="clip")
        return Batch(out[0], out[1], self.labels.index_select(0, idx), feats)

    def __iter__(self) -> Iterator[Batch]:
        if not self.infinite and self.taken > 0 and self._left_in_epoch() == 0:
            self._next_epoch()  # the previous pass was finished
        while True:
            idx = self._take(self.batch_size)
            if len(idx) == 0:
                break
            yield self.gather(idx)
            if not self.infinite and self._left_in_epoch() == 0:
                break
        if not self.infinite:
            self._next_epoch()

    def state_dict(self) -> dict[str, int]:
        """The run's position as plain ints, identical on every rank, for the training checkpoint."""
        epoch, offset = divmod(self.position(), self.n) if self.n else (0, 0)
        return {"epoch": epoch, "offset": offset, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "epoch" not in state:
            warnings.warn(f"loader state {sorted(state)} is not an in-memory position (a streaming run's?): the "
                          f"loader goes on where the run's sample count puts it ({self.position():,} samples)")
            return
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader uses seed {self.seed}")
        if "offset" in state:
            self.seek(int(state["epoch"]) * self.n + int(state["offset"]))
        else:  # older versions: this rank's cursor into perm[rank::world_size]; every rank's was the same
            self.seek(int(state["epoch"]) * self.n + int(state["cursor"]) * int(state.get("world_size", 1)))

    def seek(self, samples: int) -> None:
        """Continue after the first ``samples`` elements of the sequence (all ranks' draws so far)."""
        self.start, self.taken = int(samples), 0


class _ShardArrays(Dataset):
    """Map-style view of whole shards, so a DataLoader's workers read shards in parallel:
    shard j -> (j, latents (n, 2, C, h, w), labels (n,), feature grids (n, gh, gw, K) or an empty
    tensor when ``repr_shape`` is None)."""

    def __init__(self, refs: Sequence[ShardRef], latent_shape: Sequence[int], num_classes: int | None,
                 repr_shape: Sequence[int] | None = None):
        self.refs, self.shape, self.num_classes = list(refs), tuple(latent_shape), num_classes
        self.repr_shape = None if repr_shape is None else tuple(repr_shape)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = list(read_shard(self.refs[j], SampleDecoder(self.shape, self.num_classes, self.repr_shape)))
        lat = np.empty((len(rows), 2, *self.shape), _F16)
        feats = np.empty((len(rows), *self.repr_shape) if self.repr_shape else (0,), _F16)
        for i, row in enumerate(rows):
            lat[i] = row[0]
            if self.repr_shape:
                feats[i] = row[2]
        labels = torch.tensor([row[1] for row in rows], dtype=torch.int64)
        return j, torch.from_numpy(lat), labels, torch.from_numpy(feats)


def read_all(refs: Sequence[ShardRef], info: DatasetInfo, out: np.ndarray, num_workers: int = 0,
             features: np.ndarray | None = None) -> np.ndarray:
    """Fill ``out`` (N, 2, C, h, w) (and ``features`` (N, gh, gw, K) when given) with every sample
    in manifest order; returns the labels."""
    offsets = np.cumsum([0] + [r.num_samples for r in refs])
    labels = np.empty(offsets[-1], np.int64)
    ds = _ShardArrays(refs, info.latent_shape, info.num_classes, None if features is None else info.repr_shape)
    for j, lat, lab, feats in DataLoader(ds, batch_size=None, num_workers=num_workers):
        out[offsets[j] : offsets[j + 1]] = lat.numpy()
        labels[offsets[j] : offsets[j + 1]] = lab.numpy()
        if features is not None:
            features[offsets[j] : offsets[j + 1]] = feats.numpy()
    return labels


def iter_shards(refs: Sequence[ShardRef], info: DatasetInfo, todo: Sequence[int], num_workers: int = 0,
                features: bool = False) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(shard index, its first row in manifest order, latents or, with ``features``, feature
    grids, labels) for the shards ``todo``."""
    offsets = np.cumsum([0] + [r.num_samples for r in refs])
    shards = _ShardArrays(refs, info.latent_shape, info.num_classes, info.repr_shape if features else None)
    for j, lat, lab, feats in DataLoader(torch.utils.data.Subset(shards, list(todo)), batch_size=None,
                                         num_workers=num_workers):
        yield j, int(offsets[j]), (feats if features else lat).numpy(), lab.numpy()


def load_arrays(refs: Sequence[ShardRef], info: DatasetInfo, cache: Path | None = None, manifest_digest: str = "",
                num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All samples as tensors (N, 2, C, h, w) float16 and (N,) int64, and with ``info.repr_shape``
    their feature grids (N, gh, gw, K) float16 (else None), from the cache if given.

    With a cache, the first process to take its lock builds it (or continues a killed build)
    and every other process polls for it (``latent_cache``: no collective, so no timeout), then
    every process maps the same file: the OS page cache holds one copy per node. The feature
    grids have a cache of their own beside it (``<cache>.repr.npy``), built the same way.
    """
    shape = (info.num_samples, 2, *info.latent_shape)
    fshape = None if info.repr_shape is None else (info.num_samples, *info.repr_shape)
    if cache is None:
        out = np.empty(shape, _F16)
        feats = None if fshape is None else np.empty(fshape, _F16)
        labels = read_all(refs, info, out, num_workers, feats)
        return torch.from_numpy(out), torch.from_numpy(labels), None if feats is None else torch.from_numpy(feats)
    lat, lab = latent_cache.ensure(cache, manifest_digest, shape, len(refs),
                                   lambda todo: iter_shards(refs, info, todo, num_workers))
    feats = None
    if fshape is not None:
        feats, _ = latent_cache.ensure(cache.with_suffix(".repr.npy"), manifest_digest, fshape, len(refs),
                                       lambda todo: iter_shards(refs, info, todo, num_workers, features=True))
        feats = torch.from_numpy(feats)
    return torch.from_numpy(lat), torch.from_numpy(lab), feats


def cache_path(cfg: DataConfig) -> Path | None:
    """``data.cache`` as a path: "auto" is ``latents-cache.npy`` beside the manifest; None is no cache."""
    if cfg.cache is None:
        return None
    return manifest_file(cfg.shards).parent / "latents-cache.npy" if cfg.cache == "auto" else Path(cfg.cache)


# ----------------------------------------------------------------------------------------------
# Factory and the posterior sample


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, infinite: bool = True,
                 features: bool = False) -> StreamLoader | MemoryLoader:
    """The loader the training loop uses: streaming or in-memory per ``cfg``, for one rank.
    ``features``: batches also carry each sample's representation grid (``Batch.repr``; shards
    encoded with ``--repr``, refused naming the flag otherwise)."""
    if cfg.batch_size < 1 or cfg.num_workers < 0 or cfg.shuffle_buffer < 0:
        raise ValueError(f"data config: batch_size >= 1, num_workers >= 0, shuffle_buffer >= 0 needed, got {cfg}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    mpath = manifest_file(cfg.shards)
    manifest = open_manifest(mpath)
    info = DatasetInfo.from_manifest(manifest)
    if features:
        from .align import repr_dims  # a light module: the projector and the loss

        grid, dims = repr_dims(manifest, str(mpath))
        info.repr_shape = (*grid, dims)
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
        lat, lab, feats = load_arrays(refs_from_manifest(manifest, root), info, cache, digest, cfg.num_workers)
        return MemoryLoader(info, lat, lab, cfg.batch_size, rank, world_size, cfg.seed, infinite, pin, feats)
    refs = refs_from_urls(cfg.urls) if cfg.urls else refs_from_manifest(manifest, root)
    return StreamLoader(info, refs, cfg.batch_size, rank, world_size, cfg.seed, cfg.shuffle_buffer,
                        cfg.num_workers, infinite, pin, cfg.stream_slots)
