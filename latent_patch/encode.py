"""The encoding job: source images -> VAE posteriors -> shards + manifest, split and resumable.

Work units are shards, and shard ``j`` always holds the same inputs, span ``j`` of a seeded
permutation of the listing (:func:`input_order`, :func:`shard_span`), so the output does not
depend on how the work is split and a class-sorted source gives shards of mixed classes. Worker
``w`` of ``W`` (``W = num_jobs * world_size``, ``w = job_index * world_size + rank``) takes the shards with ``j % W == w`` that are not complete
yet; a killed run is resumed by re-running the same command. Batches never straddle shards, so a
shard's bytes do not depend on which worker (or how many) encoded it, given the same numerics:
on the CPU the torch thread count changes the VAE's fp32 results at the 1e-7 level, which can
flip an fp16 rounding, so pin ``--threads`` where byte identity across splits matters.

The source is listed once per output folder, not once per process: the first process to take
``OUT/listing.lock`` lists (and unpacks a .tar.gz into ``OUT/unpacked/``) and writes
``OUT/listing.json.gz``; every other process and job reads that file (:mod:`encode_listing`).
With ``--repr`` each sample also stores a frozen encoder's feature grid of the same pixels, its
optional PCA fitted once per output folder the same way (:mod:`encode_repr`).

On a GPU, images are decoded and cropped in DataLoader workers while the main process runs the
VAE and writes tars (about 16 KiB per sample: cheap next to the VAE); on a CPU, where both
compete for the same cores, decoding runs inline (see :func:`choose_parallelism`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import dist, encode_repr, fsutil, shards
from .cli import differences
from .codec import VAECodec
from .config import EncodeConfig
from .encode_listing import LISTING_FILE, LISTING_LOCK, UNPACKED_DIR, shared_listing  # noqa: F401 (the job's API)
from .encode_repr import ReprTargets
from .images import BadImage, load_image, to_model_pixels
from .sources import Listing
from .seeds import derive_seed

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- job identity


def job_params(cfg: EncodeConfig, listing: Listing, codec: VAECodec, rep: dict | None = None) -> dict:
    """What must stay equal for a resumed or parallel run to add to the same output folder.

    The source's location is recorded but not compared (a moved dataset lists the same).
    ``rep``: the representation targets' entry (:func:`encode_repr.job_entry`); absent without
    --repr, so folders encoded before it existed keep their identity."""
    params = {"format": shards.FORMAT, "resolution": cfg.resolution, "flips": cfg.flips,
              "shard_size": cfg.shard_size, "max_pixels": cfg.max_pixels, "vae": codec.info(),
              "order": {"shuffle": "permutation", "seed": ORDER_SEED, "spread": "even"},
              "source": {"kind": listing.kind, "num_inputs": len(listing),
                         "listing_sha256": listing.sha256(), "path": listing.path}}
    if rep is not None:
        params["repr"] = rep
    return params


def job_id(params: dict) -> str:
    """Short fingerprint of the compared job parameters; sidecars carry it."""
    core = {k: v for k, v in params.items() if k != "source"}
    core["source"] = {k: v for k, v in params["source"].items() if k != "path"}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


FLAG_OF = {"resolution": "--resolution", "flips": "--flips", "shard_size": "--shard-size",
           "max_pixels": "--max-pixels", "vae": "--vae", "repr.encoder": "--repr/--repr-size",
           "repr.dims": "--repr-dims", "repr.pca.images": "--repr-pca-images",
           "repr.pca.tokens": "--repr-pca-tokens", "repr.pca.seed": "--repr-pca-seed", "repr": "--repr"}
"""job.json's keys -> the flags that set them, for refusals (longest key prefix wins)."""


def _flags(diffs: list[str]) -> list[str]:
    """The flags behind ``key: old -> new`` differences, in order, once each."""
    flags: list[str] = []
    for d in diffs:
        key = d.split(":", 1)[0]
        hits = [k for k in FLAG_OF if key == k or key.startswith(k + ".")]
        flag = FLAG_OF[max(hits, key=len)] if hits else None
        if flag and flag not in flags:
            flags.append(flag)
    return flags


def refuse_other_params(out: Path, params: dict, skip: tuple[str, ...] = ()) -> None:
    """Refuse an output folder whose job.json holds other parameters (naming keys and flags)."""
    path = out / shards.JOB_FILE
    if not path.is_file():
        return
    diffs = differences(fsutil.read_json(path), params, skip=("source.path", *skip))
    if diffs:
        flags = _flags(diffs)
        raise ValueError(f"{out} holds an encoding made with different parameters (the folder's -> now: "
                         f"{'; '.join(diffs)}): use another --out or the same parameters"
                         + (f" ({', '.join(flags)})" if flags else ""))


def claim_out_dir(out: Path, params: dict) -> None:
    """Write job.json on first start; on resume refuse an output made with other parameters."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / shards.JOB_FILE
    if path.is_file():
        refuse_other_params(out, params)
        return
    if (out / shards.MANIFEST).exists() or any(out.glob("shard-*.json")):
        raise ValueError(f"{out} holds shards but no {shards.JOB_FILE} (not made by this tool, "
                         "or by an older version): use an empty --out")
    fsutil.atomic_write_json(path, params)


# ----------------------------------------------------------------------------- work plan


def worker_slot(cfg: EncodeConfig, info: dist.DistInfo) -> tuple[int, int]:
    """(w, W): this process's slot among every process of every job."""
    return cfg.job_index * info.world_size + info.rank, cfg.num_jobs * info.world_size


ORDER_SEED = 0  # the shards' input order; part of the job's identity (recorded in job.json)


def input_order(num_inputs: int, seed: int = ORDER_SEED) -> np.ndarray:
    """The inputs in shard order: a seeded permutation of the listing, so a shard of a class-sorted
    source (ImageNet's folders) holds a random mix of classes, not a few. It depends on the listing
    and the seed only, so shard j holds the same images whatever the split into processes and jobs."""
    return np.random.default_rng(derive_seed("encode-order", seed, num_inputs) % 2**63).permutation(num_inputs)


def shard_span(j: int, num_inputs: int, k: int) -> tuple[int, int]:
    """Positions [start, stop) of ``input_order`` that shard j holds: the inputs spread evenly over
    ceil(N / k) shards (sizes differ by at most one, none above k, no small tail shard)."""
    n_shards = shards.num_shards_for(num_inputs, k)
    return j * num_inputs // n_shards, (j + 1) * num_inputs // n_shards


def plan_chunks(shard_ids: list[int], k: int, order: np.ndarray,
                chunk: int) -> list[tuple[int, list[int], bool]]:
    """(shard, input indices, last chunk of its shard) for each batch, never across shards;
    shard j takes positions :func:`shard_span` of ``order`` (see :func:`input_order`)."""
    plan: list[tuple[int, list[int], bool]] = []
    for j in shard_ids:
        start, stop = shard_span(j, len(order), k)
        idx = [int(i) for i in order[start:stop]]
        parts = [idx[i:i + chunk] for i in range(0, len(idx), chunk)] or [[]]
        plan += [(j, p, n == len(parts) - 1) for n, p in enumerate(parts)]
    return plan


class DecodeDataset(Dataset):
    """Index -> (index, ADM-cropped uint8 HWC array or None, skip reason); runs in workers."""

    def __init__(self, listing: Listing, res: int, max_pixels: int) -> None:
        self.listing, self.res, self.max_pixels = listing, res, max_pixels

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, load_image(self.listing.read_bytes(i), self.res, self.max_pixels), ""
        except BadImage as err:
            return i, None, str(err)


def collate(items: list[tuple[int, np.ndarray | None, str]]) -> dict:
    """Stack the good images (uint8, small to ship between processes), list the bad ones."""
    good = [(i, a) for i, a, _ in items if a is not None]
    pix = torch.from_numpy(np.stack([a for _, a in good])) if good else None
    return {"indices": [i for i, _ in good], "pixels": pix,
            "bad": [(i, r) for i, a, r in items if a is None]}


def cpus_per_process() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def choose_parallelism(cfg: EncodeConfig, device: torch.device) -> tuple[int, int]:
    """(decode workers, torch threads); explicit --workers / --threads win.

    GPU: the cores only decode: one worker process per core of this process but one (the main
    process launches the VAE, pins batches and writes tars), at least one. On 16 cores that is 15
    workers (before: min(8, cores), half the node idle); at an estimated ~5 ms per ImageNet-size
    JPEG that is ~3000 images/s, above one GPU's SD-VAE encoder (bench_encode.py measures both).
    CPU: the VAE and the decoding share the cores, so decoding runs inline and the VAE keeps every
    core. Measured on 2 shared cores (benchmarks/bench_encode.py, 3 runs each): inline 0.91-1.02
    of the bound; one decoder beside a 1-thread VAE 0.74-0.97; one decoder beside a 2-thread VAE
    0.73-0.99 (OpenMP regions stall when a thread shares its core). With a heavy VAE (SD-VAE)
    decoding is ~2% of the work, so a core taken from the VAE costs more than decoding inline.
    """
    cpus = cpus_per_process()
    if device.type == "cuda":
        workers = max(1, cpus - 1) if cfg.workers is None else cfg.workers
        return workers, cfg.threads or torch.get_num_threads()
    workers = 0 if cfg.workers is None else cfg.workers
    return workers, cfg.threads or max(1, cpus - workers)


PREFETCH_BATCHES = 32
"""Decoded batches in flight over all workers (shared memory: 64 x 256^2 x 3 B = 12.6 MB each)."""


def prefetch_factor(workers: int) -> int | None:
    """Batches each worker decodes ahead: 4 up to 8 workers, then fewer (>= 2) so the batches in
    flight stay about PREFETCH_BATCHES. Two per worker already keep a worker busy while its
    previous batch waits; more only adds /dev/shm use."""
    return min(4, max(2, PREFETCH_BATCHES // workers)) if workers else None


def make_loader(listing: Listing, cfg: EncodeConfig, plan: list, workers: int,
                pin: bool) -> DataLoader:
    """The job's decode loader, one pass in plan order (benchmarks/bench_encode.py reuses it).

    No persistent_workers: the loader is iterated once per run, so workers would only outlive it.
    """
    ds = DecodeDataset(listing, cfg.resolution, cfg.max_pixels)
    batches = [idx for _, idx, _ in plan]
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin, prefetch_factor=prefetch_factor(workers))


# ----------------------------------------------------------------------------- main loop


def model_pixels(pixels: torch.Tensor, device: torch.device, flips: bool = False) -> torch.Tensor:
    """uint8 NHWC -> [-1, 1] NCHW on ``device`` (uint8 over the bus: 4x less), flipped copies after."""
    x = to_model_pixels(pixels.to(device, non_blocking=True))
    return torch.cat([x, x.flip(3)]) if flips else x


def encode_batch(codec: VAECodec, pixels: torch.Tensor, flips: bool,
                 targets: ReprTargets | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 NHWC -> float16 (n[*2], 2, C, h, w) [mean, std] and, with ``targets``, the float16
    (n[*2], gh, gw, K) feature grids of the same pixels; flipped copies follow the originals.

    The flipped copy is the encode of the flipped PIXELS (a flipped latent, or grid, is not the same)."""
    x = model_pixels(pixels, codec.device, flips)
    mean, std = codec.encode(x)
    lat = torch.stack([mean, std], 1).to(torch.float16).cpu().numpy()  # synced: the encoder is timed alone
    return lat, None if targets is None else targets.features(x)


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """``threads`` torch threads on the CPU for the block; the caller's count restored after (a
    caller that trains next, the demo, keeps its own)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_shards(cfg: EncodeConfig, listing: Listing, codec: VAECodec, todo: list[int],
                  jid: str, show: bool, targets: ReprTargets | None = None) -> dict:
    """Encode the shards ``todo`` (each committed atomically as it completes)."""
    k = cfg.inputs_per_shard()
    chunk = max(1, cfg.batch_size // 2) if cfg.flips == "both" else cfg.batch_size
    plan = plan_chunks(todo, k, input_order(len(listing)), chunk)
    workers, threads = choose_parallelism(cfg, codec.device)
    with cpu_threads(codec.device, threads):
        loader = make_loader(listing, cfg, plan, workers, pin=codec.device.type == "cuda")
        return _encode_plan(cfg, listing, codec, plan, loader, jid, show, targets)


def _encode_plan(cfg: EncodeConfig, listing: Listing, codec: VAECodec, plan: list, loader: DataLoader,
                 jid: str, show: bool, targets: ReprTargets | None) -> dict:
    """The loop of :func:`encode_shards`: batches in, shards committed as they complete."""
    k, out = cfg.inputs_per_shard(), Path(cfg.out)
    total = sum(len(idx) for _, idx, _ in plan)
    bar = tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1,
               desc=f"encode {len({j for j, _, _ in plan})} shards")
    done = {"images": 0, "samples": 0, "skipped": 0, "shards": 0}
    builder: shards.ShardBuilder | None = None
    # commits (sha256 re-read, fsyncs, renames) on a background thread: on a network file system a
    # 5000-sample shard's commit takes as long as encoding hundreds of images; one thread keeps order
    committer = fsutil.BackgroundWriter(name="shard-commit")
    try:
        for (j, idx, last), batch in zip(plan, loader):
            if builder is None:
                builder = shards.ShardBuilder(out, j, shard_span(j, len(listing), k),
                                              codec.scaling_factor, codec.shift_factor, jid)
            _add_batch(builder, listing, codec, batch, cfg.flips == "both", done, targets)
            bar.update(len(idx))
            bar.set_postfix(skipped=done["skipped"], refresh=False)
            if last:
                builder.close()
                committer.submit(builder.commit)
                builder, done["shards"] = None, done["shards"] + 1
        committer.wait()
    except BaseException:
        if builder is not None:
            builder.abort()
        raise
    finally:
        committer.shutdown()
        bar.close()
    return done


def _add_batch(builder: shards.ShardBuilder, listing: Listing, codec: VAECodec, batch: dict,
               flips: bool, done: dict, targets: ReprTargets | None = None) -> None:
    """Encode one batch and append its samples (and skip records) in input order; the
    representation encoder's time goes to the shard's sidecar."""
    lat, feats = encode_batch(codec, batch["pixels"], flips, targets) if batch["indices"] else (None, None)
    if targets is not None:
        builder.repr_seconds += targets.take_seconds()
    n = len(batch["indices"])
    rows = {i: r for r, i in enumerate(batch["indices"])}
    bad = dict(batch["bad"])
    for i in sorted(list(rows) + list(bad)):
        src = listing.sources[i]
        if i in bad:
            builder.skip(src, bad[i])
            done["skipped"] += 1
            continue
        builder.add(i, src, listing.labels[i], lat[rows[i]], features=_row(feats, rows[i]))
        if flips:
            builder.add(i, src, listing.labels[i], lat[n + rows[i]], flip=True,
                        features=_row(feats, n + rows[i]))
        done["images"] += 1
    done["samples"] += n * (2 if flips else 1)


def _row(feats: np.ndarray | None, r: int) -> np.ndarray | None:
    return None if feats is None else feats[r]


# ----------------------------------------------------------------------------- the job


def manifest_header(cfg: EncodeConfig, listing: Listing, codec: VAECodec, params: dict,
                    targets: ReprTargets | None = None) -> dict:
    """Job-level manifest fields that the sidecars do not carry (``repr`` only with --repr)."""
    src = params["source"]
    header = {"class_names": listing.class_names, "resolution": cfg.resolution,
              "vae": codec.info(), "flips": cfg.flips, "job_id": job_id(params),
              "source": {"path": src["path"], "kind": src["kind"], "num_inputs": src["num_inputs"],
                         "listing_sha256": src["listing_sha256"]},
              "shard_size": cfg.shard_size, "inputs_per_shard": cfg.inputs_per_shard(),
              "skipped": list(listing.warnings)}
    if targets is not None:
        header["repr"] = targets.manifest_entry()
    return header


def finalize(cfg: EncodeConfig, listing: Listing, codec: VAECodec, params: dict,
             num_shards: int, rate: str = "", targets: ReprTargets | None = None) -> Path | None:
    """Write manifest.json when every shard is complete; else say how many remain. Either way one
    summary line ends the job, with ``rate`` (this process's images and img/s over its whole run)."""
    out = Path(cfg.out)
    remaining = [j for j in range(num_shards) if not shards.is_complete(out, j)]
    if remaining:
        print(f"this part is done{rate}; {len(remaining)} of {num_shards} shards remain for other "
              f"jobs/processes (first: {shards.shard_name(remaining[0])}); manifest.json is "
              "written by whichever finishes last", flush=True)
        return None
    man = shards.assemble_manifest(out, num_shards, manifest_header(cfg, listing, codec, params, targets))
    if man["num_images"] == 0:
        why = "; ".join(f"{s['source']}: {s['reason']}" for s in man["skipped"][:5])
        raise ValueError(f"--source {cfg.source}: no valid image among {len(listing)} inputs "
                         f"(e.g. {why}); no manifest written")
    path = shards.write_manifest(out, man)
    print(f"encoding done: {path} ({man['num_images']} images, {man['num_samples']} samples, "
          f"{len(man['skipped'])} skipped, {num_shards} shards){rate}", flush=True)
    return path


def prepare(cfg: EncodeConfig) -> tuple[Listing, VAECodec, dict, int, ReprTargets | None]:
    """List the source (once per output folder: :func:`shared_listing`), load the VAE (and the
    representation encoder, its PCA fitted once per folder), claim the output folder:
    (listing, codec, params, shards, representation targets or None)."""
    cfg.validate()
    listing = shared_listing(cfg)
    if all(i in listing.problems for i in range(len(listing))):
        raise ValueError(f"--source {cfg.source}: no input can be read ({len(listing)} listed)")
    info = dist.dist_info()
    device = torch.device(cfg.device) if cfg.device else dist.default_device()
    if device.type == "cpu":
        dist.keep_heap()  # the VAE's activations are large temporaries (no number changes)
    codec = VAECodec.load(cfg.vae, device=device, dtype=cfg.dtype)
    if cfg.resolution % codec.downsample:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of the VAE's "
                         f"downsampling factor {codec.downsample}")
    targets = None
    if cfg.repr is None:
        params = job_params(cfg, listing, codec)
    else:
        params, targets = _prepare_repr(cfg, listing, codec)
    claim_out_dir(Path(cfg.out), params)
    log.debug("rank %d: %d inputs, kind %s", info.rank, len(listing), listing.kind)
    return listing, codec, params, shards.num_shards_for(len(listing), cfg.inputs_per_shard()), targets


def _prepare_repr(cfg: EncodeConfig, listing: Listing, codec: VAECodec) -> tuple[dict, ReprTargets]:
    """Load the representation encoder (the VAE's device and dtype), refuse a folder of other
    parameters BEFORE a fit that may take minutes, then the shared PCA: (job params, targets)."""
    enc = encode_repr.load_encoder(cfg, codec.device, codec.dtype)
    params = job_params(cfg, listing, codec, encode_repr.job_entry(cfg, enc))
    if cfg.repr_dims is None:
        return params, ReprTargets(enc)
    refuse_other_params(Path(cfg.out), params, skip=(encode_repr.PCA_DIGEST_KEY,))
    with cpu_threads(codec.device, choose_parallelism(cfg, codec.device)[1]):
        pca, fit = encode_repr.shared_pca(cfg, enc, listing.sha256(), len(listing),
                                          lambda idx: _pixel_batches(cfg, listing, codec.device, idx))
    params["repr"] = encode_repr.job_entry(cfg, enc, encode_repr.pca_digest(pca))
    return params, ReprTargets(enc, pca, fit)


def _pixel_batches(cfg: EncodeConfig, listing: Listing, device: torch.device,
                   indices: list[int]) -> Iterator[torch.Tensor]:
    """The inputs ``indices`` as [-1, 1] pixel batches of --batch-size on ``device``, decoded by
    the job's own loader (the same crop as the shards'); bad images are left out."""
    plan = [(0, indices[i:i + cfg.batch_size], False) for i in range(0, len(indices), cfg.batch_size)]
    workers, _ = choose_parallelism(cfg, device)
    for batch in make_loader(listing, cfg, plan, workers, pin=device.type == "cuda"):
        if batch["pixels"] is not None:
            yield model_pixels(batch["pixels"], device)


def run_encode(cfg: EncodeConfig) -> dict:
    """The whole job for this process: encode its pending shards, then maybe the manifest."""
    grouped = dist.init_process_group()
    info = dist.dist_info()
    try:
        listing, codec, params, num_shards, targets = prepare(cfg)
        w, wn = worker_slot(cfg, info)
        mine = [j for j in range(num_shards) if j % wn == w]
        todo = [j for j in mine if not shards.is_complete(cfg.out, j)]
        stale = sum(shards.remove_stale(cfg.out, j) for j in todo)
        if stale:
            print(f"removed {stale} stale temporary files of killed writers", flush=True)
        print(f"worker {w}/{wn}: {len(mine)} shards assigned, {len(mine) - len(todo)} already "
              f"done, {len(todo)} to encode ({listing.kind} source, {len(listing)} inputs)",
              flush=True)
        t0 = time.perf_counter()
        done = encode_shards(cfg, listing, codec, todo, job_id(params),
                             show=cfg.progress and info.is_main, targets=targets)
        secs = time.perf_counter() - t0
        done["seconds"], done["img_per_s"] = secs, done["images"] / secs if secs > 0 else 0.0
        rate = (f"; this process encoded {done['images']} images -> {done['samples']} samples, "
                f"{done['skipped']} skipped, in {secs:.1f} s ({done['img_per_s']:.1f} img/s)") if todo else ""
        if grouped:
            dist.barrier()
        manifest = None
        if info.is_main or not grouped:
            manifest = finalize(cfg, listing, codec, params, num_shards, rate, targets)
        elif todo:  # its line is its summary: the manifest is rank 0's
            print(f"worker {w}/{wn} done{rate}", flush=True)
        done["manifest"] = str(manifest) if manifest else None
        return done
    finally:
        if grouped:
            dist.destroy()


def verify(out: str | Path) -> int:
    """CLI helper: check every shard's sha256 (and sample count) against manifest.json.

    Each problem is one line on stdout (a report to keep); the verdict is the last line, as every
    job's summary: ``ok: ...`` on stdout, or one ``encode_latents.py: error: ...`` on stderr."""
    t0 = time.perf_counter()
    problems = shards.verify_shards(out)
    secs = time.perf_counter() - t0
    for p in problems:
        print(f"FAIL {p}", flush=True)
    if problems:  # a missing manifest is one of them: it is read only once the set is intact
        print(f"encode_latents.py: error: {len(problems)} problem(s) in the shards of {out} "
              f"(listed above, first: {problems[0]})", file=sys.stderr, flush=True)
        return 1
    man = fsutil.read_json(Path(out) / shards.MANIFEST)
    mib = sum((Path(out) / e["name"]).stat().st_size for e in man["shards"]) / 2**20
    print(f"ok: {len(man['shards'])} shards, {man['num_samples']} samples match {out}/manifest.json; "
          f"{mib:.1f} MiB checked in {secs:.1f} s ({mib / max(secs, 1e-9):.0f} MiB/s)", flush=True)
    return 0

