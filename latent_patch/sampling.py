"""The sampling job: sample indices -> noise -> EDM sampler -> VAE decode -> uint8 images on disk.

Sample ``i`` is a pure function of (settings, seed, i): its label is fixed by ``i`` alone and all
of its noise (initial and churn) comes from its own torch.Generator seeded from (seed, i), as in
EDM2. So the images do not depend on the number of processes, the batch size or where a killed
run resumed, and any subset can be regenerated. Work is split into contiguous index blocks handed
out round-robin to the ranks; every finished block is written as one small npz under
``OUT/parts/`` (atomically), so a re-run skips what exists. After a barrier the parts are
assembled into ``OUT/samples.npz`` (ADM evaluator layout: ``arr_0`` uint8 N x H x W x 3 in index
order, plus ``labels``), ``OUT/images/*.png`` and ``OUT/grid.png``, and optionally scored (fid.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
import sys
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import dist, fsutil
from .edm import AUTHORS_IMAGENET256, Precond, SamplerConfig, sample
from .loader import LatentNorm, latent_norm

FORMAT = "latent-patch-samples/1"
PART_RE = re.compile(r"^idx-(\d{8,})-(\d{8,})\.npz$")
Decoder = Callable[[torch.Tensor], torch.Tensor | np.ndarray]
"""Scaled latents (B, C, h, w) on the sampling device -> uint8 images (B, H, W, 3)."""


class SettingsMismatch(RuntimeError):
    """OUT already holds samples made with other settings; mixing them would corrupt the set."""


# --------------------------------------------------------------------------- indices, labels, noise

def index_labels(indices: Sequence[int], num_classes: int, classes: Sequence[int] | None = None) -> torch.Tensor:
    """Label of sample i: ``classes[i % len(classes)]``, by default ``i % num_classes``.

    Any prefix 0..N-1 is then class-balanced (N // K per class, the remainder on the first
    classes), and a label never depends on N, so a run can later be extended without changes.
    An unconditional model (num_classes 0) gets the null class 0 everywhere.
    """
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    if classes:
        return torch.as_tensor(list(classes), dtype=torch.int64)[idx % len(classes)]
    if num_classes <= 0:
        return torch.zeros_like(idx)
    return idx % num_classes


def sample_seed(seed: int, index: int) -> int:
    """64-bit seed of sample ``index``: SeedSequence mixing, so streams of nearby (seed, i) pairs
    are unrelated (plain ``seed + i`` would make run seed 1 a shifted copy of run seed 0)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class RowRandn:
    """Standard-normal draws where row b of every batch comes from sample ``indices[b]``'s own
    generator: the noise a sample sees is the same whichever batch it lands in.

    Draws are made in float32 on the generators' device and cast, so a float64 sampler state
    consumes the same stream as a float32 one.
    """

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(sample_seed(seed, int(i))) for i in indices]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(indices), *shape): one draw of ``shape`` per row from that row's generator."""
        rows = [torch.randn(tuple(shape), generator=g, device=self.device) for g in self.generators]
        return torch.stack(rows).to(dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows but {len(self.generators)} per-sample generators")
        return self.randn(x.shape[1:]).to(x.device, x.dtype)


def plan_batches(todo: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches: ``todo`` cut into runs of consecutive indices, each run into blocks of
    at most ``batch_size``, block k to rank k % world. No index twice, none left out, and every
    block is contiguous so its part file is named by its range."""
    blocks: list[list[int]] = []
    run: list[int] = []
    for i in sorted(todo):
        if run and (i != run[-1] + 1 or len(run) == batch_size):
            blocks.append(run)
            run = []
        run.append(i)
    if run:
        blocks.append(run)
    return blocks[rank::world_size]


# --------------------------------------------------------------------------- model + sampler + decoder

class ImageSampler:
    """Sample indices -> (uint8 images NHWC, labels): the per-batch work of the sampling job.

    Holds everything that decides the pixels (network, preconditioning, sampler settings, seed,
    label rule, decoder) and nothing about files, so training-time FID and the benchmark run the
    very same code path as the 50k job.
    """

    def __init__(self, net: torch.nn.Module, *, sigma_data: float, latent_channels: int, latent_size: int,
                 num_classes: int, sampler: SamplerConfig, decode: Decoder, seed: int = 0,
                 classes: Sequence[int] | None = None, device: torch.device | str | None = None,
                 amp: str = "none"):
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.precond = Precond(net, sigma_data)
        self.shape = (latent_channels, latent_size, latent_size)
        self.num_classes = num_classes
        self.null_class = num_classes if num_classes > 0 else None
        self.sampler = sampler
        self.decode = decode
        self.seed = seed
        self.classes = list(classes) if classes else None
        self.amp = amp
        if self.classes and num_classes > 0 and not all(0 <= c < num_classes for c in self.classes):
            raise ValueError(f"--classes {self.classes}: every class must lie in 0..{num_classes - 1}")
        if sampler.cfg_scale != 1.0 and self.null_class is None:
            raise ValueError("guidance (cfg_scale != 1) needs a class-conditional model")

    def labels(self, indices: Sequence[int]) -> torch.Tensor:
        return index_labels(indices, self.num_classes, self.classes)

    def _autocast(self):
        if self.amp == "none":
            return nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def latents(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents float32 on the device, labels) of the given sample indices."""
        rng = RowRandn(self.seed, indices, self.device)
        noise = rng.randn(self.shape).to(self.device)
        labels = self.labels(indices).to(self.device)
        with self._autocast():
            x0 = sample(self.precond, noise, labels, self.sampler, self.null_class, generator=rng.randn_like)
        return x0, labels

    @torch.no_grad()
    def images(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (B, H, W, 3), int64 labels (B,)) on the CPU."""
        x0, labels = self.latents(indices)
        imgs = self.decode(x0)
        imgs = imgs.cpu().numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs)
        return np.ascontiguousarray(imgs, dtype=np.uint8), labels.cpu().numpy()


def make_decoder(codec: Any, scaling_factor: float | None = None, shift_factor: float | None = None,
                 batch_size: int | None = None, norm: LatentNorm | None = None) -> Decoder:
    """Decoder through a ``codec.VAECodec``, undoing the normalisation the model was TRAINED with.

    ``norm`` (``data.latent_norm=channel``) is undone first. The manifest's factors (what the
    loader used) may differ from the VAE config's (e.g. a dataset-specific scale); latents are
    mapped manifest-scaled -> raw -> codec-scaled, then decoded in chunks of ``batch_size`` (the
    VAE decoder at 256 px is the memory peak).
    """
    s_m = codec.scaling_factor if scaling_factor is None else scaling_factor
    t_m = codec.shift_factor if shift_factor is None else shift_factor
    same = math.isclose(s_m, codec.scaling_factor) and math.isclose(t_m, codec.shift_factor)

    @torch.inference_mode()  # the codec works on inference tensors (its in-place clamp needs this mode)
    def decode(z: torch.Tensor) -> torch.Tensor:
        z = z if norm is None else norm.undo(z)
        z = z if same else codec.scale(z / s_m + t_m)
        step = batch_size or len(z)
        return torch.cat([codec.decode_uint8(z[i:i + step]) for i in range(0, len(z), step)])

    return decode


# --------------------------------------------------------------------------- the output folder

def part_name(indices: Sequence[int]) -> str:
    """``idx-START-END.npz`` for a contiguous block; END is exclusive."""
    return f"idx-{indices[0]:08d}-{indices[-1] + 1:08d}.npz"


def list_parts(out_dir: str | Path) -> list[tuple[int, int, Path]]:
    """Finished parts as (start, end, path), by start; temporaries of killed writers never match."""
    d = Path(out_dir) / "parts"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = PART_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def done_indices(out_dir: str | Path, num_samples: int) -> set[int]:
    return {i for s, e, _ in list_parts(out_dir) for i in range(s, min(e, num_samples))}


def write_part(out_dir: str | Path, indices: Sequence[int], images: np.ndarray, labels: np.ndarray) -> Path:
    """One finished block as an npz (no pickle: plain arrays), made visible by an atomic rename."""
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=np.asarray(labels, np.int64), indices=np.asarray(indices, np.int64))
    path = Path(out_dir) / "parts" / part_name(indices)
    fsutil.atomic_write_bytes(path, buf.getvalue())
    return path


def read_part(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return f["indices"], f["images"], f["labels"]


def covering_parts(out_dir: str | Path, num_samples: int) -> list[tuple[Path, int, int]]:
    """(part, lo, hi): which part supplies indices lo..hi-1, covering 0..N-1 once, in order.

    Parts of an earlier, larger run may reach past N or overlap (identical samples, since the
    settings matched); a gap means the job is unfinished and is an error naming the gap.
    """
    plan, nxt = [], 0
    for start, end, path in list_parts(out_dir):
        if nxt >= num_samples:
            break
        if end <= nxt:
            continue
        if start > nxt:
            break  # a gap: reported below
        hi = min(end, num_samples)
        plan.append((path, nxt, hi))
        nxt = hi
    if nxt < num_samples:
        later = [s for s, _, _ in list_parts(out_dir) if s > nxt]
        gap_end = min(min(later, default=num_samples), num_samples) - 1
        raise RuntimeError(f"{out_dir}: samples {nxt}..{gap_end} are missing; "
                           "re-run the same command to fill them")
    return plan


def read_segment(path: Path, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of indices lo..hi-1 from one part, checked against the part's indices."""
    idx, imgs, labels = read_part(path)
    keep = (idx >= lo) & (idx < hi)
    if not np.array_equal(idx[keep], np.arange(lo, hi)):
        raise RuntimeError(f"{path}: its indices do not match its name")
    return imgs[keep], labels[keep]


def iter_samples(out_dir: str | Path, num_samples: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) blocks covering 0..N-1 exactly once, in index order."""
    for path, lo, hi in covering_parts(out_dir, num_samples):
        yield read_segment(path, lo, hi)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_npz(out_dir: str | Path, num_samples: int) -> Path:
    """``samples.npz`` streamed part by part (50k x 256 px is 9.8 GB: never all in memory).

    A plain (stored) zip of ``arr_0.npy`` and ``labels.npy``, which is exactly what np.savez
    writes, so ``np.load(...)["arr_0"]`` (the ADM evaluator) reads it.
    """
    out = Path(out_dir) / "samples.npz"
    tmp = fsutil.tmp_path(out)
    labels: list[np.ndarray] = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header_written = False
            for imgs, labs in iter_samples(out_dir, num_samples):
                if not header_written:
                    f.write(_npy_header((num_samples, *imgs.shape[1:]), np.uint8))
                    header_written = True
                f.write(np.ascontiguousarray(imgs, np.uint8).tobytes())
                labels.append(labs)
        with zf.open("labels.npy", "w") as f:
            lab = np.concatenate(labels).astype(np.int64)
            f.write(_npy_header(lab.shape, lab.dtype) + lab.tobytes())
    fsutil.commit(tmp, out)
    return out


def write_pngs(out_dir: str | Path, num_samples: int, rank: int = 0, world_size: int = 1) -> int:
    """``images/NNNNNN.png`` for every sample; rank r encodes the parts k with k % world == r, and
    existing files are kept, so this step too is shared and resumable. Returns how many it wrote."""
    d = Path(out_dir) / "images"
    d.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(num_samples - 1)))
    written = 0
    for path, lo, hi in covering_parts(out_dir, num_samples)[rank::world_size]:
        names = [d / f"{i:0{digits}d}.png" for i in range(lo, hi)]
        if all(n.exists() for n in names):
            continue
        imgs, _ = read_segment(path, lo, hi)
        for name, img in zip(names, imgs):
            if not name.exists():
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                fsutil.atomic_write_bytes(name, buf.getvalue())
                written += 1
    return written


def prune_pngs(out_dir: str | Path, num_samples: int) -> None:
    """Drop PNGs beyond N (left by an earlier, larger run) so the folder holds exactly N images."""
    for p in (Path(out_dir) / "images").glob("*.png"):
        if p.stem.isdigit() and int(p.stem) >= num_samples:
            p.unlink()


def write_grid(out_dir: str | Path, num_samples: int, count: int = 64) -> Path:
    """``grid.png``: the first ``count`` samples, row-major, for a quick look."""
    imgs: list[np.ndarray] = []
    for block, _ in iter_samples(out_dir, min(count, num_samples)):
        imgs.extend(block)
    cols = math.ceil(math.sqrt(len(imgs)))
    rows = math.ceil(len(imgs) / cols)
    h, w, c = imgs[0].shape
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k, img in enumerate(imgs):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    path = Path(out_dir) / "grid.png"
    fsutil.atomic_write_bytes(path, buf.getvalue())
    return path


def check_settings(out_dir: str | Path, identity: dict) -> None:
    """Refuse to add samples to an OUT made with other settings (names every differing key)."""
    path = Path(out_dir) / "sampling.json"
    if not path.is_file():
        return
    old = fsutil.read_json(path).get("identity", {})
    new = json.loads(json.dumps(identity))
    if old != new:
        diffs = [f"{k}: {old.get(k)!r} (in {path.name}) vs {new.get(k)!r} (now)"
                 for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise SettingsMismatch(
            f"{out_dir} already holds samples made with different settings; " + "; ".join(diffs)
            + f". Use another --out, or delete {out_dir} to start over.")


# --------------------------------------------------------------------------- the job

class _Writer:
    """Writes parts on a background thread so the device never waits for npz + fsync; at most
    ``depth`` blocks are queued (bounded memory), and a write error surfaces on the next call."""

    def __init__(self, out_dir: Path, depth: int = 2):
        self.out_dir, self.depth = out_dir, depth
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list[Future] = []

    def submit(self, indices: Sequence[int], images: np.ndarray, labels: np.ndarray) -> None:
        while len(self.pending) >= self.depth:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(write_part, self.out_dir, list(indices), images, labels))

    def close(self) -> None:
        for f in self.pending:
            f.result()
        self.pool.shutdown()


def generate(sampler: ImageSampler, out_dir: str | Path, num_samples: int, batch_size: int,
             progress: bool = True) -> int:
    """Generate this rank's missing samples into ``OUT/parts``; returns how many it made."""
    info = dist.dist_info()
    todo = sorted(set(range(num_samples)) - done_indices(out_dir, num_samples))
    dist.barrier()  # every rank has listed the parts before any rank adds one: one shared plan
    batches = plan_batches(todo, batch_size, info.rank, info.world_size)
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", disable=not (progress and info.is_main), dynamic_ncols=True,
               desc=f"sampling (rank 0 of {info.world_size}, {len(todo)} to do)")
    writer = _Writer(Path(out_dir))
    try:
        for block in batches:
            images, labels = sampler.images(block)
            writer.submit(block, images, labels)
            bar.update(len(block))
    finally:
        writer.close()
        bar.close()
    return total


def assemble(out_dir: str | Path, num_samples: int, save: Sequence[str] = ("npz", "png"), grid: int = 64) -> None:
    """After every rank generated: PNGs shared by all ranks, then npz + grid by rank 0."""
    info = dist.dist_info()
    if "png" in save:
        write_pngs(out_dir, num_samples, info.rank, info.world_size)
    dist.barrier()
    if info.is_main:
        if "png" in save:
            prune_pngs(out_dir, num_samples)
        if "npz" in save:
            write_npz(out_dir, num_samples)
        if grid > 0:
            write_grid(out_dir, num_samples, grid)


def run_job(sampler: ImageSampler, out_dir: str | Path, num_samples: int, batch_size: int,
            identity: dict, record: dict | None = None, save: Sequence[str] = ("npz", "png"),
            grid: int = 64, progress: bool = True) -> Path:
    """The whole resumable job on every rank: check/record settings, generate, assemble.

    ``identity`` holds everything that fixes the pixels (checkpoint weights, sampler, seed, label
    rule, VAE...); it must match an existing ``OUT/sampling.json``. ``record`` adds free-form
    context (argv, world size) that may change between runs. Batch size and process count are
    deliberately not part of the identity: they do not change the images.
    """
    out = Path(out_dir)
    info = dist.dist_info()
    check_settings(out, identity)  # every rank reads the same file: all fail together, no hang
    dist.barrier()
    if info.is_main:
        (out / "parts").mkdir(parents=True, exist_ok=True)
        for d in (out, out / "parts", out / "images"):  # leftovers of killed writers
            fsutil.remove_stale_tmp(d)
        fsutil.atomic_write_json(out / "sampling.json", {
            "format": FORMAT, "identity": identity, "num_samples": num_samples,
            "batch_size": batch_size, "world_size": info.world_size, **(record or {})})
    dist.barrier()
    t0 = time.perf_counter()
    made = generate(sampler, out, num_samples, batch_size, progress)
    seconds = time.perf_counter() - t0
    dist.barrier()
    assemble(out, num_samples, save, grid)
    if info.is_main and progress:
        print(f"rank 0 made {made} images in {seconds:.1f} s; samples in {out}", flush=True)
    return out


# --------------------------------------------------------------------------- training-time FID

@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: Any, num_samples: int, ref: Any, *,
                   features: Any = "inception", codec: Any = None, manifest: dict | None = None,
                   sampler: SamplerConfig | None = None, seed: int = 0, batch_size: int = 64,
                   inception: str | None = None, distributed: bool = False, progress: bool = False) -> dict:
    """FID/FD of ``num_samples`` fresh samples of an in-memory model (e.g. the EMA during training).

    ``cfg`` is the run's TrainConfig (model shape, sigma_data, shards); ``ref`` a stats npz / image
    folder / ``fid.Stats``; ``features`` "inception", "demo" or a ``fid.FeatureExtractor``. Pass
    ``codec`` (and reuse ``ref`` as a loaded Stats) to avoid reloading them at every evaluation.
    With ``distributed=True`` call it on EVERY rank: ranks split the indices and gather the
    features, and each returns the same metrics; otherwise call it on one process only.
    Images are never written; the sampled indices and noise are those of ``sample.py``.
    """
    from . import fid

    device = next(model.parameters()).device
    extractor = features if isinstance(features, fid.FeatureExtractor) else fid.build_extractor(
        features, device, inception)
    manifest = manifest if manifest is not None else _manifest_of(cfg)
    if codec is None:
        from .codec import VAECodec
        codec = VAECodec.load(_vae_spec(manifest, None), device)
    vae = (manifest or {}).get("vae", {})
    decode = make_decoder(codec, vae.get("scaling_factor"), vae.get("shift_factor"), norm=model_norm(cfg, manifest))
    was_training = model.training
    model.eval()
    try:
        img_sampler = ImageSampler(model, sigma_data=cfg.edm.sigma_data, latent_channels=cfg.model.latent_channels,
                                   latent_size=cfg.model.latent_size, num_classes=cfg.model.num_classes,
                                   sampler=sampler or SamplerConfig(), decode=decode, seed=seed, device=device)
        info = dist.dist_info() if distributed else dist.DistInfo(0, 1, 0)
        collector = fid.FeatureCollector(extractor)
        t0 = time.perf_counter()
        resolution = None
        for block in tqdm(plan_batches(range(num_samples), batch_size, info.rank, info.world_size),
                          desc="eval samples", unit="batch", disable=not progress):
            images, labels = img_sampler.images(block)
            resolution = images.shape[1]
            collector.add(images, labels)
        if distributed and info.world_size > 1:
            collector = _gather_collector(collector, extractor, device)
        stats_ref = fid.load_reference(ref, extractor, resolution=resolution)
        metrics = fid.score(collector, stats_ref, str(ref) if not isinstance(ref, fid.Stats) else ref.source)
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        return metrics
    finally:
        model.train(was_training)


def _gather_collector(collector: Any, extractor: Any, device: torch.device) -> Any:
    """All ranks' features (+ predictions, labels) into one collector on every rank (no pickle:
    padded float64 tensors through all_gather)."""
    import torch.distributed as tdist

    from . import fid

    feats = collector.features()
    extra = (np.stack([np.concatenate(collector.preds), np.concatenate(collector.labels)], 1)
             if collector.preds else np.zeros((len(feats), 0)))
    rows = torch.from_numpy(np.concatenate([feats, extra], 1)).to(device, torch.float64)
    n = torch.tensor([rows.shape[0]], device=device)
    counts = [torch.zeros_like(n) for _ in range(tdist.get_world_size())]
    tdist.all_gather(counts, n)
    width, most = rows.shape[1], int(max(c.item() for c in counts))
    padded = torch.zeros(most, width, dtype=torch.float64, device=device)
    padded[:rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in counts]
    tdist.all_gather(parts, padded)
    allrows = torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)]).cpu().numpy()
    out = fid.FeatureCollector(extractor)
    d = feats.shape[1]
    out.feats = [allrows[:, :d]]
    if extra.shape[1]:
        out.preds, out.labels = [allrows[:, d].astype(np.int64)], [allrows[:, d + 1].astype(np.int64)]
    return out


def _manifest_of(cfg: Any) -> dict | None:
    shards = getattr(getattr(cfg, "data", None), "shards", None)
    if not shards:
        return None
    p = Path(shards)
    p = p if p.suffix == ".json" else p / "manifest.json"
    return fsutil.read_json(p) if p.is_file() else None


def model_norm(cfg: Any, manifest: dict | None, where: Any = "the run's manifest") -> LatentNorm | None:
    """The per-channel latent normalisation the model was trained with (see ``loader.latent_norm``)."""
    data = getattr(cfg, "data", None)
    return latent_norm(getattr(data, "latent_norm", "scale"), manifest, cfg.edm.sigma_data, where=str(where))


def _vae_spec(manifest: dict | None, override: str | None) -> str:
    if override:
        return override
    vae_id = ((manifest or {}).get("vae") or {}).get("id")
    if not vae_id:
        raise ValueError("the checkpoint carries no shards manifest naming its VAE: pass --vae SPEC")
    return vae_id


# --------------------------------------------------------------------------- command line

def weights_fingerprint(path: Path) -> str:
    """sha256 of the weights file: what makes two runs 'the same model' for resume checks."""
    return fsutil.sha256_file(path)


def sampler_from_args(args: argparse.Namespace) -> SamplerConfig:
    base = AUTHORS_IMAGENET256 if args.preset == "authors" else SamplerConfig()
    overrides = {k: v for k, v in {
        "steps": args.steps, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "rho": args.rho,
        "S_churn": args.S_churn, "S_min": args.S_min, "S_max": args.S_max, "S_noise": args.S_noise,
        "method": args.method, "cfg_scale": args.cfg_scale, "cfg_interval": args.cfg_interval,
    }.items() if v is not None}
    return dataclasses.replace(base, **overrides)


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _float_pair(text: str) -> list[float]:
    v = [float(t) for t in text.split(",")]
    if len(v) != 2 or v[0] > v[1]:
        raise argparse.ArgumentTypeError(f"--cfg-interval {text!r}: expected LO,HI with LO <= HI")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=(
        "Sample a trained model for FID (resumable, any number of processes). "
        "Other commands: `sample.py fid-ref ...` (reference statistics), `sample.py fid ...` (score a folder)."))
    p.add_argument("--checkpoint", required=True, help="run folder (latest complete checkpoint) or checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (parts/, samples.npz, images/, grid.png, *.json)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per sampler batch (per process)")
    p.add_argument("--classes", type=_int_list, default=None, help="comma-separated class list to cycle through")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", choices=["ema", "model"], default="ema")
    g.add_argument("--no-ema", dest="weights", action="store_const", const="model", help="same as --weights model")
    p.add_argument("--vae", default=None, help="VAE spec (hub id, folder, 'demo'); default: the manifest's")
    p.add_argument("--decode-dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--decode-batch-size", type=int, default=None, help="VAE decode chunk (default: the batch)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast for the network")
    s = p.add_argument_group("sampler (defaults: EDM 18-step Heun; --preset authors: 256 steps, churn 40, w 1.3)")
    s.add_argument("--preset", choices=["edm", "authors"], default="edm")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--method", choices=["heun", "euler"], default=None)
    s.add_argument("--sigma-min", type=float, default=None)
    s.add_argument("--sigma-max", type=float, default=None)
    s.add_argument("--rho", type=float, default=None)
    s.add_argument("--S-churn", "--s-churn", dest="S_churn", type=float, default=None)
    s.add_argument("--S-min", "--s-min", dest="S_min", type=float, default=None)
    s.add_argument("--S-max", "--s-max", dest="S_max", type=float, default=None)
    s.add_argument("--S-noise", "--s-noise", dest="S_noise", type=float, default=None)
    s.add_argument("--cfg-scale", type=float, default=None, help="guidance weight w (1 = no guidance, one pass)")
    s.add_argument("--cfg-interval", type=_float_pair, default=None, help="LO,HI: guide only where LO <= sigma <= HI")
    o = p.add_argument_group("outputs and scoring")
    o.add_argument("--save", default="npz,png", help="comma list of npz, png")
    o.add_argument("--grid", type=int, default=64, help="samples in grid.png (0: none)")
    o.add_argument("--fid-ref", default=None, help="stats npz, ADM reference npz, image folder or tar shards")
    o.add_argument("--features", default="inception", choices=["inception", "demo"])
    o.add_argument("--inception", default=None, help="Inception TorchScript file (default /tmp/inception-2015-12-05.pt)")
    o.add_argument("--ref-from-images", action="store_true",
                   help="featurise an ADM reference npz's arr_0 instead of using its stored mu/sigma")
    o.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    from . import checkpoint
    from .codec import VAECodec

    args = build_parser().parse_args(argv)
    save = [s for s in args.save.split(",") if s]
    if set(save) - {"npz", "png"}:
        raise SystemExit(f"--save {args.save}: only npz and png are known")
    dist.init_process_group()
    device = dist.default_device()
    ckpt = checkpoint.resolve_checkpoint(args.checkpoint)
    net, cfg, manifest = checkpoint.load_inference_model(ckpt, use_ema=args.weights == "ema", device=device)
    codec = VAECodec.load(_vae_spec(manifest, args.vae), device, args.decode_dtype)
    check_vae_fits(codec, cfg.model.latent_channels)
    vae = (manifest or {}).get("vae", {})
    scale, shift = vae.get("scaling_factor", codec.scaling_factor), vae.get("shift_factor", codec.shift_factor)
    sampler_cfg = sampler_from_args(args)
    sampler = ImageSampler(net, sigma_data=cfg.edm.sigma_data, latent_channels=cfg.model.latent_channels,
                           latent_size=cfg.model.latent_size, num_classes=cfg.model.num_classes,
                           sampler=sampler_cfg,
                           decode=make_decoder(codec, scale, shift, args.decode_batch_size,
                                               model_norm(cfg, manifest, ckpt)),
                           seed=args.seed, classes=args.classes, device=device, amp=args.amp)
    weights_file = ckpt / (checkpoint.EMA_FILE if args.weights == "ema" else checkpoint.MODEL_FILE)
    identity = {
        "weights_sha256": weights_fingerprint(weights_file), "weights": args.weights,
        "seed": args.seed, "classes": args.classes, "num_classes": cfg.model.num_classes,
        "sampler": dataclasses.asdict(sampler_cfg), "amp": args.amp,
        "vae": {"id": codec.name, "scaling_factor": scale, "shift_factor": shift,
                "decode_dtype": str(codec.dtype).replace("torch.", "")},
        "device_type": device.type,  # CPU and CUDA generators draw different streams
    }
    record = {"checkpoint": str(ckpt.resolve()), "argv": list(sys.argv)}
    out = run_job(sampler, args.out, args.num_samples, args.batch_size, identity, record, save, args.grid,
                  progress=not args.no_progress)
    dist.destroy()  # scoring is rank 0's alone: release the other ranks now
    if args.fid_ref and dist.dist_info().is_main:
        score_out(out, args.num_samples, args.fid_ref, args.features, args.inception, device, args.ref_from_images)
    return out


def check_vae_fits(codec: Any, latent_channels: int) -> None:
    """Refuse a VAE whose latent channels differ from the model's before any sample is made
    (otherwise the first decode fails after sampling.json has pinned the wrong VAE)."""
    if codec.latent_channels != latent_channels:
        raise SystemExit(f"--vae {codec.name}: the VAE has {codec.latent_channels} latent channels but the "
                         f"model generates {latent_channels}; pass the VAE the shards were encoded with")


def score_out(out_dir: str | Path, num_samples: int, ref: str, features: str, inception: str | None,
              device: torch.device | None = None, ref_from_images: bool = False) -> dict:
    """Score the assembled samples of OUT against ``ref``; writes and returns metrics.json."""
    from . import fid

    extractor = fid.build_extractor(features, device, inception)
    first, _ = next(iter_samples(out_dir, min(1, num_samples)))
    stats = fid.load_reference(ref, extractor, resolution=int(first.shape[1]), cache_dir=out_dir,
                               recompute=ref_from_images)
    metrics = fid.score_batches(iter_samples(out_dir, num_samples), extractor, stats, str(ref))
    fid.write_metrics(out_dir, metrics)
    print(json.dumps(metrics), flush=True)
    return metrics
