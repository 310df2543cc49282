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
``OUT/listing.json.gz``; every other process and job reads that file (see :func:`shared_listing`).

On a GPU, images are decoded and cropped in DataLoader workers while the main process runs the
VAE and writes tars (about 16 KiB per sample: cheap next to the VAE); on a CPU, where both
compete for the same cores, decoding runs inline (see :func:`choose_parallelism`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import dist, filelock, fsutil, shards
from .cli import differences
from .codec import VAECodec
from .config import EncodeConfig
from .images import BadImage, load_image, to_model_pixels
from .sources import Listing, list_source, source_identity
from .seeds import derive_seed

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- job identity


def job_params(cfg: EncodeConfig, listing: Listing, codec: VAECodec) -> dict:
    """What must stay equal for a resumed or parallel run to add to the same output folder.

    The source's location is recorded but not compared (a moved dataset lists the same)."""
    return {"format": shards.FORMAT, "resolution": cfg.resolution, "flips": cfg.flips,
            "shard_size": cfg.shard_size, "max_pixels": cfg.max_pixels, "vae": codec.info(),
            "order": {"shuffle": "permutation", "seed": ORDER_SEED, "spread": "even"},
            "source": {"kind": listing.kind, "num_inputs": len(listing),
                       "listing_sha256": listing.sha256(), "path": listing.path}}


def job_id(params: dict) -> str:
    """Short fingerprint of the compared job parameters; sidecars carry it."""
    core = {k: v for k, v in params.items() if k != "source"}
    core["source"] = {k: v for k, v in params["source"].items() if k != "path"}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def claim_out_dir(out: Path, params: dict) -> None:
    """Write job.json on first start; on resume refuse an output made with other parameters."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / shards.JOB_FILE
    if path.is_file():
        diffs = differences(fsutil.read_json(path), params, skip=("source.path",))
        if diffs:
            raise ValueError(f"{out} holds an encoding made with different parameters (the folder's -> now: "
                             f"{'; '.join(diffs)}): use another --out or the same parameters")
        return
    if (out / shards.MANIFEST).exists() or any(out.glob("shard-*.json")):
        raise ValueError(f"{out} holds shards but no {shards.JOB_FILE} (not made by this tool, "
                         "or by an older version): use an empty --out")
    fsutil.atomic_write_json(path, params)


# ----------------------------------------------------------------------------- the shared listing

LISTING_FILE = "listing.json.gz"  # the source's Listing (sources.Listing.to_record) + its identity
LISTING_LOCK = "listing.lock"  # held (O_EXCL) by the one process listing; {host, pid, token}
UNPACKED_DIR = "unpacked"  # seekable copies of a .tar.gz source, one per compressed tar
LISTING_FORMAT = "latent-patch-listing/1"


def shared_listing(cfg: EncodeConfig) -> Listing:
    """The source's listing, made once per output folder and read by every process and job.

    Why: listing ImageNet stats 1.28M files, a tar source is read header by header and a .tar.gz
    must be unpacked; done by each of 8 processes on 8 nodes that is 64 times the work (and 8
    unpacked copies per node). The first process to take ``OUT/listing.lock`` lists and writes
    ``OUT/listing.json.gz`` atomically; the others poll for that file (:func:`filelock.do_once`:
    no collective, a dead lister's lock is taken over). A later run (resume) reuses the file while
    :func:`sources.source_identity` stamps the source the same; else it lists again and
    :func:`claim_out_dir` compares the new listing with ``job.json`` as before. A listing of
    another source (path or label file) is refused.
    """
    ident = source_identity(cfg.source, cfg.labels)  # a missing source fails here, before OUT is made
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path, rejected = out / LISTING_FILE, None

    def ready() -> Listing | None:
        nonlocal rejected
        listing, rejected = _read_listing(path, ident, out, rejected)
        return listing

    return filelock.do_once(out / LISTING_LOCK, ready, lambda: _write_listing(cfg, out), f"the listing {path}")


def _write_listing(cfg: EncodeConfig, out: Path) -> Listing:
    """List the source (unpacking compressed tars into ``OUT/unpacked``) and publish the result."""
    path = out / LISTING_FILE
    for p in out.glob(f".{LISTING_FILE}.*.tmp"):
        p.unlink(missing_ok=True)  # a killed lister's leftovers (we hold the lock)
    ident = source_identity(cfg.source, cfg.labels)  # stamped before listing: a change during it shows
    t0 = time.perf_counter()
    listing = list_source(cfg.source, cfg.labels, unpack_dir=out / UNPACKED_DIR)
    rec = {"format": LISTING_FORMAT, "identity": ident, **listing.to_record(out)}
    data = gzip.compress(json.dumps(rec, separators=(",", ":")).encode(), compresslevel=6, mtime=0)
    fsutil.atomic_write_bytes(path, data)
    print(f"listed the {listing.kind} source {cfg.source}: {len(listing)} inputs in "
          f"{time.perf_counter() - t0:.1f} s -> {path} (shared by every process)", flush=True)
    return listing


def _read_listing(path: Path, ident: dict, out: Path,
                  rejected: tuple | None) -> tuple[Listing | None, tuple | None]:
    """(the saved listing when it is this source's and still current, else None; the file's
    (inode, mtime, size)). A file seen before as ``rejected`` (out of date) is not read again:
    waiters poll while it is being replaced, and a large listing takes a second to parse."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    if key == rejected:
        return None, key
    try:
        rec = json.loads(gzip.decompress(path.read_bytes()))
    except FileNotFoundError:
        return None, None
    except (OSError, EOFError, ValueError) as err:
        log.warning("%s: unreadable (%s); listing the source again", path, err)
        return None, key
    return _listing_if_current(path, rec, ident, out), key


def _listing_if_current(path: Path, rec: dict, ident: dict, out: Path) -> Listing | None:
    """The listing held in ``rec`` (read from ``path``) if it is still current; raises when it is
    another source's."""
    if not isinstance(rec, dict) or rec.get("format") != LISTING_FORMAT:
        return None  # another version's file: replaced
    old = rec["identity"]
    if (old.get("source"), old.get("labels")) != (ident["source"], ident["labels"]):
        was = f"--source {old.get('source')}" + (f" --labels {old['labels']}" if old.get("labels") else "")
        now = f"--source {ident['source']}" + (f" --labels {ident['labels']}" if ident["labels"] else "")
        raise ValueError(f"{path} is the listing of {was}, not of {now}: use another --out for "
                         f"another source (if the same data moved, delete {path} to list it again)")
    if (old["kind"], old["stamp"]) != (ident["kind"], ident["stamp"]):
        log.info("%s: the source changed since it was listed; listing it again", path)
        return None
    for tar, size in zip(rec["tars"], rec["tar_sizes"]):
        if not os.path.isabs(tar) and not _has_size(out / tar, size):
            return None  # an unpacked copy was removed or damaged: unpack again
    return Listing.from_record(rec, out)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


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


def encode_batch(codec: VAECodec, pixels: torch.Tensor, flips: bool) -> np.ndarray:
    """uint8 NHWC -> float16 (n[*2], 2, C, h, w) [mean, std]; flipped copies follow the originals.

    The flipped copy is the encode of the flipped PIXELS (a flipped latent is not the same)."""
    x = to_model_pixels(pixels.to(codec.device, non_blocking=True))  # uint8 over the bus: 4x less
    if flips:
        x = torch.cat([x, x.flip(3)])
    mean, std = codec.encode(x)
    return torch.stack([mean, std], 1).to(torch.float16).cpu().numpy()


def encode_shards(cfg: EncodeConfig, listing: Listing, codec: VAECodec, todo: list[int],
                  jid: str, show: bool) -> dict:
    """Encode the shards ``todo`` (each committed atomically as it completes)."""
    k, out = cfg.inputs_per_shard(), Path(cfg.out)
    chunk = max(1, cfg.batch_size // 2) if cfg.flips == "both" else cfg.batch_size
    plan = plan_chunks(todo, k, input_order(len(listing)), chunk)
    workers, threads = choose_parallelism(cfg, codec.device)
    before = torch.get_num_threads()  # restored after: a caller that trains next (the demo) keeps its own
    if codec.device.type == "cpu":
        torch.set_num_threads(threads)
    loader = make_loader(listing, cfg, plan, workers, pin=codec.device.type == "cuda")
    total = sum(len(idx) for _, idx, _ in plan)
    bar = tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1,
               desc=f"encode {len(todo)} shards")
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
            _add_batch(builder, listing, codec, batch, cfg.flips == "both", done)
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
        torch.set_num_threads(before)
    return done


def _add_batch(builder: shards.ShardBuilder, listing: Listing, codec: VAECodec, batch: dict,
               flips: bool, done: dict) -> None:
    """Encode one batch and append its samples (and skip records) in input order."""
    lat = encode_batch(codec, batch["pixels"], flips) if batch["indices"] else None
    n = len(batch["indices"])
    rows = {i: r for r, i in enumerate(batch["indices"])}
    bad = dict(batch["bad"])
    for i in sorted(list(rows) + list(bad)):
        src = listing.sources[i]
        if i in bad:
            builder.skip(src, bad[i])
            done["skipped"] += 1
            continue
        builder.add(i, src, listing.labels[i], lat[rows[i]])
        if flips:
            builder.add(i, src, listing.labels[i], lat[n + rows[i]], flip=True)
        done["images"] += 1
    done["samples"] += n * (2 if flips else 1)


# ----------------------------------------------------------------------------- the job


def manifest_header(cfg: EncodeConfig, listing: Listing, codec: VAECodec, params: dict) -> dict:
    """Job-level manifest fields that the sidecars do not carry."""
    src = params["source"]
    return {"class_names": listing.class_names, "resolution": cfg.resolution,
            "vae": codec.info(), "flips": cfg.flips, "job_id": job_id(params),
            "source": {"path": src["path"], "kind": src["kind"], "num_inputs": src["num_inputs"],
                       "listing_sha256": src["listing_sha256"]},
            "shard_size": cfg.shard_size, "inputs_per_shard": cfg.inputs_per_shard(),
            "skipped": list(listing.warnings)}


def finalize(cfg: EncodeConfig, listing: Listing, codec: VAECodec, params: dict,
             num_shards: int, rate: str = "") -> Path | None:
    """Write manifest.json when every shard is complete; else say how many remain. Either way one
    summary line ends the job, with ``rate`` (this process's images and img/s over its whole run)."""
    out = Path(cfg.out)
    remaining = [j for j in range(num_shards) if not shards.is_complete(out, j)]
    if remaining:
        print(f"this part is done{rate}; {len(remaining)} of {num_shards} shards remain for other "
              f"jobs/processes (first: {shards.shard_name(remaining[0])}); manifest.json is "
              "written by whichever finishes last", flush=True)
        return None
    man = shards.assemble_manifest(out, num_shards, manifest_header(cfg, listing, codec, params))
    if man["num_images"] == 0:
        why = "; ".join(f"{s['source']}: {s['reason']}" for s in man["skipped"][:5])
        raise ValueError(f"--source {cfg.source}: no valid image among {len(listing)} inputs "
                         f"(e.g. {why}); no manifest written")
    path = shards.write_manifest(out, man)
    print(f"encoding done: {path} ({man['num_images']} images, {man['num_samples']} samples, "
          f"{len(man['skipped'])} skipped, {num_shards} shards){rate}", flush=True)
    return path


def prepare(cfg: EncodeConfig) -> tuple[Listing, VAECodec, dict, int]:
    """List the source (once per output folder: :func:`shared_listing`), load the VAE, claim the
    output folder: (listing, codec, params, shards)."""
    cfg.validate()
    listing = shared_listing(cfg)
    if all(i in listing.problems for i in range(len(listing))):
        raise ValueError(f"--source {cfg.source}: no input can be read ({len(listing)} listed)")
    info = dist.dist_info()
    device = torch.device(cfg.device) if cfg.device else dist.default_device()
    codec = VAECodec.load(cfg.vae, device=device, dtype=cfg.dtype)
    if cfg.resolution % codec.downsample:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of the VAE's "
                         f"downsampling factor {codec.downsample}")
    params = job_params(cfg, listing, codec)
    claim_out_dir(Path(cfg.out), params)
    log.debug("rank %d: %d inputs, kind %s", info.rank, len(listing), listing.kind)
    return listing, codec, params, shards.num_shards_for(len(listing), cfg.inputs_per_shard())


def run_encode(cfg: EncodeConfig) -> dict:
    """The whole job for this process: encode its pending shards, then maybe the manifest."""
    grouped = dist.init_process_group()
    info = dist.dist_info()
    try:
        listing, codec, params, num_shards = prepare(cfg)
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
                             show=cfg.progress and info.is_main)
        secs = time.perf_counter() - t0
        done["seconds"], done["img_per_s"] = secs, done["images"] / secs if secs > 0 else 0.0
        rate = (f"; this process encoded {done['images']} images -> {done['samples']} samples, "
                f"{done['skipped']} skipped, in {secs:.1f} s ({done['img_per_s']:.1f} img/s)") if todo else ""
        if grouped:
            dist.barrier()
        manifest = None
        if info.is_main or not grouped:
            manifest = finalize(cfg, listing, codec, params, num_shards, rate)
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

