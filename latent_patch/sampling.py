"""The sampling job (``sample.py``): sample indices -> noise -> EDM sampler -> VAE decode -> uint8
images on disk, resumable, on any number of processes; and the ``fid-ref`` / ``fid`` commands.

Sample ``i`` is a pure function of (settings, seed, i) (``edm.ImageSampler``), so the images do
not depend on the number of processes, the batch size or where a killed run resumed, and any
subset can be regenerated. Work is split into contiguous index blocks handed
out round-robin to the ranks; every finished block is written as one small npz under
``OUT/parts/`` (atomically), so a re-run skips what exists. After a barrier the parts are
assembled into ``OUT/samples.npz`` (ADM evaluator layout: ``arr_0`` uint8 N x H x W x 3 in index
order, plus ``labels``), ``OUT/images/*.png`` and ``OUT/grid.png``, and optionally scored (fid.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import checkpoint, dist, fid, fsutil
from .cli import HelpFormatter, differences, int_at_least
from .codec import VAECodec, make_decoder, model_norm
from .config import SamplerConfig
from .edm import AUTHORS_IMAGENET256, ImageSampler, plan_batches
from .images import save_grid

FORMAT = "latent-patch-samples/1"
PART_RE = re.compile(r"^idx-(\d{8,})-(\d{8,})\.npz$")
class SettingsMismatch(RuntimeError):
    """OUT already holds samples made with other settings; mixing them would corrupt the set."""


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


def identity_hash(identity: dict) -> str:
    """sha256 of the settings that fix the pixels (``sampling.json``'s identity), as parts carry it."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def out_identity(out_dir: str | Path) -> str | None:
    """The identity hash recorded in OUT/sampling.json (None before the first run); read once per
    version of the file, not once per part (assembling 50k samples reads hundreds of parts)."""
    path = Path(out_dir) / "sampling.json"
    return _identity_of(str(path), path.stat().st_mtime_ns) if path.is_file() else None


@functools.lru_cache(maxsize=8)
def _identity_of(path: str, mtime_ns: int) -> str:
    return identity_hash(fsutil.read_json(path).get("identity", {}))


def write_part(out_dir: str | Path, indices: Sequence[int], images: np.ndarray, labels: np.ndarray,
               identity: str = "") -> Path:
    """One finished block as an npz (no pickle: plain arrays) stamped with the settings' identity
    hash, made visible by an atomic rename."""
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=np.asarray(labels, np.int64), indices=np.asarray(indices, np.int64),
             identity=np.str_(identity))
    path = Path(out_dir) / "parts" / part_name(indices)
    fsutil.atomic_write_bytes(path, buf.getvalue())
    return path


def read_part(path: Path, identity: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A part's (indices, images, labels); refused when it was written under other settings
    (a rank that resolved another checkpoint, say), so samples of two models never mix."""
    with np.load(path, allow_pickle=False) as f:
        stamp = str(f["identity"]) if "identity" in f.files else None
        if identity and stamp and stamp != identity:
            raise SettingsMismatch(f"{path}: written under other sampling settings ({stamp[:12]}, OUT has "
                                   f"{identity[:12]}); delete it and re-run the same command")
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
    idx, imgs, labels = read_part(path, out_identity(path.parent.parent))
    keep = (idx >= lo) & (idx < hi)
    if not np.array_equal(idx[keep], np.arange(lo, hi)):
        raise RuntimeError(f"{path}: its indices do not match its name")
    return imgs[keep], labels[keep]


def iter_samples(out_dir: str | Path, num_samples: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) blocks covering 0..N-1 exactly once, in index order."""
    for path, lo, hi in covering_parts(out_dir, num_samples):
        yield read_segment(path, lo, hi)


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
                    f.write(fsutil.npy_header((num_samples, *imgs.shape[1:]), "|u1"))
                    header_written = True
                f.write(np.ascontiguousarray(imgs, np.uint8).tobytes())
                labels.append(labs)
        with zf.open("labels.npy", "w") as f:
            lab = np.concatenate(labels).astype(np.int64)
            f.write(fsutil.npy_header(lab.shape, lab.dtype.str) + lab.tobytes())
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
    imgs = np.concatenate([block for block, _ in iter_samples(out_dir, min(count, num_samples))])
    return save_grid(imgs, Path(out_dir) / "grid.png")


def check_settings(out_dir: str | Path, identity: dict) -> None:
    """Refuse to add samples to an OUT made with other settings (names every differing key)."""
    path = Path(out_dir) / "sampling.json"
    if not path.is_file():
        return
    old = fsutil.read_json(path).get("identity", {})
    new = json.loads(json.dumps(identity))
    if old != new:
        raise SettingsMismatch(
            f"{out_dir} already holds samples made with different settings ({path.name} -> now: "
            + "; ".join(differences(old, new)) + f"). Use another --out, or delete {out_dir} to start over.")


# --------------------------------------------------------------------------- the job

def _write_when_done(out_dir: str | Path, indices: list[int], result: Any, identity: str) -> Path:
    images, labels = result()
    return write_part(out_dir, indices, images, labels, identity)


def generate(sampler: ImageSampler, out_dir: str | Path, num_samples: int, batch_size: int,
             progress: bool = True) -> int:
    """Generate this rank's missing samples into ``OUT/parts``; returns how many it made."""
    info = dist.dist_info()
    todo = sorted(set(range(num_samples)) - done_indices(out_dir, num_samples))
    identity = out_identity(out_dir) or ""
    dist.barrier()  # every rank has listed the parts before any rank adds one: one shared plan
    batches = plan_batches(todo, batch_size, info.rank, info.world_size)
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", disable=not (progress and info.is_main), dynamic_ncols=True,
               desc=f"sampling (rank 0 of {info.world_size}, {len(todo)} to do)")
    # the writer thread waits for each batch's images and writes its part, so the device never waits
    # for the copy, npz or fsync: the next batch is queued meanwhile (at most 2 in flight)
    writer = fsutil.BackgroundWriter(depth=2, name="sample-parts")
    try:
        for block in batches:
            writer.submit(_write_when_done, out_dir, list(block), sampler.start(block), identity)
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
    if not dist.same_on_all_ranks(json.dumps(identity, sort_keys=True)):  # every rank gets the answer
        raise SettingsMismatch(f"{out}: the ranks disagree on the sampling settings (checkpoint weights, VAE, "
                               "sampler...): start every process with the same command and files")
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
    made = dist.sum_over_ranks(generate(sampler, out, num_samples, batch_size, progress))
    seconds = time.perf_counter() - t0
    dist.barrier()
    assemble(out, num_samples, save, grid)
    if info.is_main:  # one summary line, progress bar or not
        print(summary_line(out, num_samples, made, seconds, info.world_size, save, grid), flush=True)
    return out


def summary_line(out: Path, num_samples: int, made: int, seconds: float, world: int,
                 save: Sequence[str], grid: int) -> str:
    """What the job made, where, and its rate over the whole run (not over one batch)."""
    files = [name for name, on in (("samples.npz", "npz" in save), ("images/", "png" in save),
                                   ("grid.png", grid > 0)) if on]
    rate = f"{made / seconds:.2f} samples/s" if made and seconds > 0 else "nothing left to make"
    kept = f", {num_samples - made} already there" if made < num_samples else ""
    return (f"sampling done: {num_samples} samples in {out} ({', '.join(files) or 'parts/ only'}); "
            f"this run made {made} in {seconds:.1f} s on {world} process{'es' if world > 1 else ''} ({rate}{kept})")


# --------------------------------------------------------------------------- command line

def _vae_spec(manifest: dict | None, override: str | None) -> str:
    if override:
        return override
    vae_id = ((manifest or {}).get("vae") or {}).get("id")
    if not vae_id:
        raise ValueError("the checkpoint carries no shards manifest naming its VAE: pass --vae SPEC")
    return vae_id


def weights_fingerprint(path: Path) -> str:
    """sha256 of the weights file: what makes two runs 'the same model' for resume checks."""
    return fsutil.sha256_file(path)


def sampler_from_args(args: argparse.Namespace, recommended: SamplerConfig | None = None) -> SamplerConfig:
    """The flags over a base: ``--preset`` if given, else the run's recommended sampler, else EDM's."""
    bases = {"authors": AUTHORS_IMAGENET256, "edm": SamplerConfig(), None: recommended or SamplerConfig()}
    base = bases[args.preset]
    # each field x_y is the flag --x-y, whose dest is the field's name (cli.sampler_flags is the inverse)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **overrides)


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _float_pair(text: str) -> list[float]:
    v = [float(t) for t in text.split(",")]
    if len(v) != 2 or v[0] > v[1]:
        raise argparse.ArgumentTypeError(f"--cfg-interval {text!r}: expected LO,HI with LO <= HI")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", formatter_class=HelpFormatter, description=(
        "Sample a trained model for FID (resumable, any number of processes). "
        "Other commands: `sample.py fid-ref ...` (reference statistics), `sample.py fid ...` (score a folder), "
        "`sample.py export ...` (a diffusers pipeline folder)."))
    p.add_argument("--checkpoint", required=True, help="run folder (latest complete checkpoint) or checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (parts/, samples.npz, images/, grid.png, *.json)")
    p.add_argument("--num-samples", type=int_at_least(1), default=50_000, help="samples to make (50,000 for FID)")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise and label come from (seed, i)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="samples per sampler batch (per process)")
    p.add_argument("--classes", type=_int_list, default=None,
                   help="comma-separated class list to cycle through (default: every class, 0 .. num_classes-1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of the checkpoint")
    g.add_argument("--no-ema", dest="weights", action="store_const", const="model", help="same as --weights model")
    p.add_argument("--vae", default=None, help="VAE spec (hub id, folder, 'demo'); default: the manifest's")
    p.add_argument("--decode-dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--decode-batch-size", type=int_at_least(1), default=None, help="VAE decode chunk (default: the batch)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast for the network (default none: fp32, TF32 matmuls on a GPU, the precision DiT, ADM "
                        "and EDM2 sample their published FIDs in; bf16, faster on a GPU, moved the demo's FD by at "
                        "most 0.003 over 2 seeds while changing 15%% of its pixels: README, 'Sample 50k and score')")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="torch.compile the network, one static graph (default auto: on a GPU only)")
    s = p.add_argument_group(
        "sampler (defaults: the run's recommended sampler, its config's `sampler` section; EDM's 18-step Heun "
        "without guidance if it has none)")
    s.add_argument("--preset", choices=["edm", "authors"], default=None,
                   help="base settings instead of the run's: edm (18-step Heun, w 1) or authors (256 steps, churn 40, "
                        "w 1.3); the flags below override either (default: the run's recommended sampler)")
    s.add_argument("--steps", type=int_at_least(1), default=None, help="time steps (EDM: 18)")
    s.add_argument("--method", choices=["heun", "euler"], default=None, help="ODE step (EDM: heun)")
    s.add_argument("--sigma-min", type=float, default=None, help="lowest noise level (EDM: 0.002)")
    s.add_argument("--sigma-max", type=float, default=None, help="highest noise level (EDM: 80)")
    s.add_argument("--rho", type=float, default=None, help="time-step spacing exponent (EDM: 7)")
    s.add_argument("--S-churn", "--s-churn", dest="S_churn", type=float, default=None,
                   help="stochasticity (EDM: 0, deterministic)")
    s.add_argument("--S-min", "--s-min", dest="S_min", type=float, default=None, help="churn from this sigma (EDM: 0)")
    s.add_argument("--S-max", "--s-max", dest="S_max", type=float, default=None, help="churn up to this sigma (EDM: inf)")
    s.add_argument("--S-noise", "--s-noise", dest="S_noise", type=float, default=None,
                   help="noise inflation of churn (EDM: 1)")
    s.add_argument("--cfg-scale", type=float, default=None, help="guidance weight w (1 = no guidance, one pass; EDM: 1)")
    s.add_argument("--cfg-interval", type=_float_pair, default=None,
                   help="LO,HI: guide only where LO <= sigma <= HI (EDM: none, guidance at every sigma)")
    o = p.add_argument_group("outputs and scoring")
    o.add_argument("--save", default="npz,png", help="comma list of npz, png")
    o.add_argument("--grid", type=int_at_least(0), default=64, help="samples in grid.png (0: none)")
    o.add_argument("--fid-ref", default=None, help="stats npz, ADM reference npz, image folder or tar shards to "
                   "score against (default: none, no scoring)")
    o.add_argument("--features", default="inception", choices=["inception", "demo"],
                   help="FID features: Inception-v3 (the standard) or the demo classifier's")
    o.add_argument("--inception", default=None, help="Inception TorchScript file (default /tmp/inception-2015-12-05.pt)")
    o.add_argument("--ref-from-images", action="store_true",
                   help="featurise an ADM reference npz's arr_0 instead of using its stored mu/sigma")
    o.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line still prints)")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    save = [s for s in args.save.split(",") if s]
    if set(save) - {"npz", "png"}:
        raise ValueError(f"--save {args.save}: only npz and png are known")
    dist.init_process_group()
    device = dist.default_device()
    dist.configure_device(device)
    amp = args.amp
    compiled = dist.resolve_compile({"true": True, "false": False}.get(args.compile, args.compile), device.type)
    ckpt = Path(_resolved_on_rank0(args.checkpoint))  # one checkpoint for all, even if training publishes one now
    net, cfg, manifest = checkpoint.load_inference_model(ckpt, use_ema=args.weights == "ema", device=device)
    codec = VAECodec.load(_vae_spec(manifest, args.vae), device, args.decode_dtype)
    check_vae_fits(codec, cfg.model.latent_channels)
    vae = (manifest or {}).get("vae", {})
    scale, shift = vae.get("scaling_factor", codec.scaling_factor), vae.get("shift_factor", codec.shift_factor)
    sampler_cfg = sampler_from_args(args, cfg.sampler)
    sampler = ImageSampler(net, sigma_data=cfg.edm.sigma_data, latent_channels=cfg.model.latent_channels,
                           latent_size=cfg.model.latent_size, num_classes=cfg.model.num_classes,
                           sampler=sampler_cfg,
                           decode=make_decoder(codec, scale, shift, args.decode_batch_size,
                                               model_norm(cfg, manifest, ckpt)),
                           seed=args.seed, classes=args.classes, device=device, amp=amp, compile=compiled)
    weights_file = ckpt / (checkpoint.EMA_FILE if args.weights == "ema" else checkpoint.MODEL_FILE)
    identity = {
        "weights_sha256": weights_fingerprint(weights_file), "weights": args.weights,
        "seed": args.seed, "classes": args.classes, "num_classes": cfg.model.num_classes,
        "sampler": dataclasses.asdict(sampler_cfg), "amp": amp, "compile": compiled,
        "vae": {"id": codec.name, "scaling_factor": scale, "shift_factor": shift,
                "decode_dtype": str(codec.dtype).replace("torch.", "")},
        "device_type": device.type,  # CPU and CUDA generators draw different streams
        "noise_seeds": "derive_seed/1",  # how sample i's generator is seeded (edm.sample_seed)
    }
    record = {"checkpoint": str(ckpt.resolve()), "argv": list(sys.argv)}
    out = run_job(sampler, args.out, args.num_samples, args.batch_size, identity, record, save, args.grid,
                  progress=not args.no_progress)
    dist.destroy()  # scoring is rank 0's alone: release the other ranks now
    if args.fid_ref and dist.dist_info().is_main:
        score_out(out, args.num_samples, args.fid_ref, args.features, args.inception, device, args.ref_from_images,
                  progress=not args.no_progress)
    return out


def _resolved_on_rank0(spec: str) -> str:
    """Rank 0 resolves "the latest checkpoint" and every rank uses its answer (or its refusal)."""
    answer = ""
    if dist.dist_info().is_main:
        try:
            answer = "ok:" + str(checkpoint.resolve_checkpoint(spec))
        except checkpoint.CheckpointError as err:
            answer = "error:" + str(err)
    answer = dist.broadcast_text(answer)
    if answer.startswith("error:"):
        raise checkpoint.CheckpointError(answer[len("error:"):])
    return answer[len("ok:"):]


def check_vae_fits(codec: Any, latent_channels: int) -> None:
    """Refuse a VAE whose latent channels differ from the model's before any sample is made
    (otherwise the first decode fails after sampling.json has pinned the wrong VAE)."""
    if codec.latent_channels != latent_channels:
        raise ValueError(f"--vae {codec.name}: the VAE has {codec.latent_channels} latent channels but the "
                         f"model generates {latent_channels}; pass the VAE the shards were encoded with")


def score_out(out_dir: str | Path, num_samples: int, ref: str, features: str, inception: str | None,
              device: torch.device | None = None, ref_from_images: bool = False, progress: bool = True) -> dict:
    """Score the assembled samples of OUT against ``ref``; writes and returns metrics.json."""
    extractor = fid.build_extractor(features, device, inception)
    first, _ = next(iter_samples(out_dir, min(1, num_samples)))
    stats = fid.load_reference(ref, extractor, resolution=int(first.shape[1]), cache_dir=out_dir,
                               recompute=ref_from_images)
    metrics = fid.score_batches(iter_samples(out_dir, num_samples), extractor, stats, str(ref), progress=progress)
    path = fid.write_metrics(out_dir, metrics)
    print(fid.score_line(metrics, out_dir, path), flush=True)
    return metrics


def add_extractor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", default="inception", choices=["inception", "demo"],
                   help="feature network: clean-fid Inception (FID) or the demo classifier (FD, offline)")
    p.add_argument("--inception", default=None,
                   help=f"Inception TorchScript file or its folder (default {fid.DEFAULT_INCEPTION})")
    p.add_argument("--ref-from-images", action="store_true",
                   help="ignore mu/sigma stored in an ADM reference npz (TF-Inception) and featurise its arr_0")


def main_ref(argv: Sequence[str] | None = None) -> Path:
    """``sample.py fid-ref``: reference statistics of real images, as an npz with mu and sigma."""
    p = argparse.ArgumentParser(prog="sample.py fid-ref", description=main_ref.__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--source", required=True, help="image folder, folder of image tar shards, or one tar")
    p.add_argument("--out", required=True, help="output .npz (mu, sigma, provenance)")
    p.add_argument("--resolution", type=int_at_least(1), default=None,
                   help="ADM-crop every image to this size first (use the generated resolution; default: "
                   "none, each image at its own size)")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N images (default: all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=100, help="images per feature-extractor call")
    add_extractor_args(p)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    extractor = fid.build_extractor(args.features, inception=args.inception)
    stats = fid.compute_stats(args.source, extractor, args.resolution, args.batch_size, args.limit)
    stats.save(args.out)
    secs = time.perf_counter() - t0
    size = f"{stats.resolution} px" if stats.resolution else "native size"
    print(f"fid-ref done: statistics of {stats.num} images of {args.source} ({stats.extractor} features, "
          f"{stats.mu.shape[0]}-d, {size}) in {args.out}; {secs:.1f} s ({stats.num / max(secs, 1e-9):.1f} images/s)",
          flush=True)
    return Path(args.out)


def main_fid(argv: Sequence[str] | None = None) -> dict:
    """``sample.py fid``: score an existing sample folder (OUT with samples.npz) or npz file."""
    p = argparse.ArgumentParser(prog="sample.py fid", description=main_fid.__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--samples", required=True, help="sampling OUT folder or a samples .npz")
    p.add_argument("--fid-ref", required=True, help="stats npz, ADM reference npz, image folder or tar shards")
    p.add_argument("--batch-size", type=int_at_least(1), default=100, help="images per feature-extractor call")
    add_extractor_args(p)
    args = p.parse_args(argv)
    src = Path(args.samples)
    npz = src / "samples.npz" if src.is_dir() else src
    if not npz.is_file():
        raise FileNotFoundError(f"--samples {src}: " + ("this folder holds no samples.npz (sampling not assembled?)"
                                                       if src.is_dir() else "no such folder or .npz file"))
    batches = fid.iter_npz_batches(npz, args.batch_size)  # streamed: the images are read once
    first = next(batches)
    resolution = int(first[0].shape[1])
    extractor = fid.build_extractor(args.features, inception=args.inception)
    ref = fid.load_reference(args.fid_ref, extractor, resolution, cache_dir=npz.parent, recompute=args.ref_from_images)
    metrics = fid.score_batches(itertools.chain([first], batches), extractor, ref, str(args.fid_ref))
    path = fid.write_metrics(npz.parent, metrics)
    print(fid.score_line(metrics, npz, path), flush=True)
    return metrics
