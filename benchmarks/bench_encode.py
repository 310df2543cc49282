"""Encoding pipeline throughput vs the bound set by its parts measured alone.

Whole pipeline: JPEG files on disk -> shards, through the real job code (encode.run_encode, with
the job's own choice of decode workers), timed over its encoding loop (``pipeline_img_s``, the
per-image rate), over the whole call including one-off set-up and the manifest
(``pipeline_total_img_s``), and from the first batch's arrival on (``pipeline_steady_img_s``: no
worker start-up or first-batch wait, which a real-size job amortises and a short run does not).
Parts, measured in the same run on the same machine, at the same batch size and dtype:

* the bare VAE encoder on in-memory tensors on the device (``vae_img_s``; ``vae_encodes_s`` counts
  the flipped copies too, ``vae_tflops`` from the encoder's FLOPs per image, counted once with
  torch.utils.flop_counter);
* decode + ADM crop (``decode_img_s``): on a CPU inline in one process, the way the job decodes
  there; on a GPU through the job's own DataLoader (same workers, prefetch, pinning) without the
  VAE, in whole rounds of batches so that no worker idles at the end.

The bound (``bound``): on a CPU both parts share the cores, so it is 1 / (t_vae + t_decode) per
image; on a GPU they run side by side, so it is min(VAE, decode) (``bottleneck`` says which).
``ratio`` = pipeline / bound (target >= 0.9), ``ratio_vae`` = pipeline / VAE alone.

Pairing. On a CPU the parts are timed inside the job's own loop: as each batch reaches the job,
its files are decoded and the bare encoder run on a batch of its size, each timed alone, while
the job waits (on a clock that stops meanwhile, so the job's figures leave that work out). Parts
and pipeline then alternate every ~0.1 s and meet the same moment of the machine: the speed of
this shared host swings ~25 % between sub-second moments, and timing the parts before and after
the pipeline made the quick ratio swing 0.87-0.97 between runs on an idle machine (paired:
0.953-0.988 over 10 runs). On a GPU the VAE runs on half the batches just before the pipeline
and half just after, the decode workers once, just before. The benchmark makes several repeats;
the JSON reports the repeat with the median ratio (the lower one for an even count), all
repeats' ratios, and the best-of-each ratio for comparison. Progress lines (phase, images done)
go to stderr, flushed; the LAST stdout line is one JSON object.

On a GPU ``--batch-sizes`` (default 32,64,128,256; "none" to skip) also times the VAE alone at each
batch size and reports the fastest (``best_batch_size``); on a CPU only when given.

``--repr SPEC`` (as encode_latents.py --repr: a timm id, a folder or "demo"): the job also stores
each sample's feature grid, so the encoder part becomes the VAE PLUS the representation encoder on
the same batches (its own ``ReprTargets.features``, timed the same way beside the VAE): the bound
is 1 / (t_vae + t_repr + t_decode) on a CPU, min(1 / (t_vae + t_repr), decode) on a GPU, and the
JSON's ``repr`` object gives the encoder alone (``img_s``, ``encodes_s``, ``tflops``) and its share
of the bound's per-image time. Without it every figure is as before.

    python benchmarks/bench_encode.py --quick          # tiny VAE, ~35 s on 2 shared cores
    python benchmarks/bench_encode.py --sd-vae --quick # SD-VAE architecture, random weights
    python benchmarks/bench_encode.py --quick --repr demo  # + the demo's representation encoder
    python benchmarks/bench_encode.py --sd-vae --images 1024 --resolution 256 --batch-size 64 \\
        --flips both                                   # on a GPU: the ImageNet-256 job's settings
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as encode_latents.py: sleep, don't spin

import argparse
import copy
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import latent_patch.encode as enc  # noqa: E402
from latent_patch import encode_repr, shards  # noqa: E402
from latent_patch.codec import VAECodec  # noqa: E402
from latent_patch.config import EncodeConfig  # noqa: E402
from latent_patch.encode import choose_parallelism, input_order, plan_chunks, run_encode  # noqa: E402
from latent_patch.encode_repr import ReprTargets  # noqa: E402
from latent_patch.images import load_image  # noqa: E402
from latent_patch.sources import Listing, list_source  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
QUICK_BUDGET_S = 30.0  # after imports; the acceptance run allows 55 s in all
TINY_VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
GPU_SWEEP = (32, 64, 128, 256)
SOURCE = "JPEG q90, 350-500 x 300-450 px"


class Progress:
    """Flushed status lines on stderr: which phase, how far; ticks at most one per ``every`` s
    (and one when a phase completes). ``enabled=False``: silent."""

    def __init__(self, every: float = 2.0, enabled: bool = True) -> None:
        self.t0 = self._last = time.perf_counter()
        self.every, self.enabled = every, enabled

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        self._last = time.perf_counter()
        if self.enabled:
            print(f"[bench_encode {self._last - self.t0:6.1f} s] {msg}", file=sys.stderr,
                  flush=True)

    def tick(self, phase: str, done: int, total: int, unit: str = "images",
             final: bool = True) -> None:
        if (final and done >= total) or time.perf_counter() - self._last >= self.every:
            self.say(f"{phase}: {done}/{total} {unit}")


QUIET = Progress(enabled=False)


# ----------------------------------------------------------------------------- inputs


def _make_jpeg(job: tuple[Path, int, int]) -> Path:
    root, i, seed = job
    rng = np.random.default_rng((seed, i))  # per image: the same files in any process count
    w, h = int(rng.integers(350, 500)), int(rng.integers(300, 450))
    small = Image.fromarray((rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255).astype(np.uint8))
    a = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
    a = np.clip(a + rng.integers(-12, 12, a.shape), 0, 255).astype(np.uint8)
    p = root / f"c{i % 2}" / f"img_{i:05d}.JPEG"
    Image.fromarray(a).save(p, "JPEG", quality=90)
    return p


def make_jpegs(root: Path, n: int, seed: int = 0, progress: Progress = QUIET,
               procs: int | None = None) -> list[Path]:
    """ImageNet-like JPEGs (350-500 x 300-450, q90, smooth content + grain) in 2 class folders.

    About 7 ms each: above 256 images they are made by one process per core (1024 took ~7 s in
    one process, before any output)."""
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    jobs = [(root, i, seed) for i in range(n)]
    procs = procs or (min(16, len(os.sched_getaffinity(0))) if n > 256 else 1)
    paths: list[Path] = []
    if procs > 1:  # fork: nothing has touched CUDA yet, and the children only use numpy + PIL
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            for p in pool.imap(_make_jpeg, jobs, chunksize=8):
                paths.append(p)
                progress.tick(f"making JPEGs ({procs} processes)", len(paths), n)
    else:
        for job in jobs:
            paths.append(_make_jpeg(job))
            progress.tick("making JPEGs", len(paths), n)
    return paths


def make_vae(path: Path, sd: bool) -> tuple[str, int]:
    """A random-weight AutoencoderKL saved to ``path``: (description, parameter count)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = SD_VAE if sd else TINY_VAE
    n = len(cfg["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, **cfg)
    vae.save_pretrained(path)
    name = "SD-VAE architecture (sd-vae-ft-ema config), random weights" if sd else \
        f"tiny AutoencoderKL {cfg['block_out_channels']} x{cfg['layers_per_block']}"
    return name, sum(p.numel() for p in vae.parameters())


# ----------------------------------------------------------------------------- the parts alone


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flips_factor(cfg: EncodeConfig) -> int:
    return 2 if cfg.flips == "both" else 1


def job_plan(cfg: EncodeConfig, n: int) -> list[tuple[int, list[int], bool]]:
    """The job's batches for n inputs (as encode_shards: batches never straddle shards; with
    flips, batch_size counts the flipped copies, so a batch holds half as many images)."""
    k = cfg.inputs_per_shard()
    chunk = max(1, cfg.batch_size // 2) if cfg.flips == "both" else cfg.batch_size
    return plan_chunks(list(range(shards.num_shards_for(n, k))), k, input_order(n), chunk)


def model_input(n: int, res: int, device: torch.device) -> torch.Tensor:
    """n random images in [-1, 1], NCHW, channels-last strides (as the job's to_model_pixels)."""
    x = torch.rand(n, 3, res, res, device=device) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last)


def encoder_flops(codec: VAECodec, res: int) -> int:
    """FLOPs of one image through the encoder (convolutions, matmuls; attention as matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    x = model_input(1, res, codec.device)
    # the math backend spells attention as bmm, which the counter sees on every device
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        codec.vae.encode(x)
    return counter.get_total_flops()


def time_vae(codec: VAECodec, sizes: list[int], res: int, flips: int, threads: int,
             progress: Progress = QUIET, phase: str = "VAE alone") -> float:
    """Seconds for the bare encoder over batches of ``sizes`` images (x ``flips`` encodes each)
    of in-memory tensors on the codec's device."""
    return time_encoder(codec.encode, codec.device, sizes, res, flips, threads, progress, phase)


def time_encoder(fn: Callable[[torch.Tensor], object], device: torch.device, sizes: list[int],
                 res: int, flips: int, threads: int, progress: Progress = QUIET,
                 phase: str = "VAE alone") -> float:
    """Seconds for ``fn`` (the VAE's or the representation encoder's batch call) over batches of
    ``sizes`` images (x ``flips`` encodes each) of in-memory tensors on ``device``."""
    x = model_input(max(sizes) * flips, res, device)
    if device.type == "cuda":
        for k in sorted(set(sizes)):  # every shape once: kernel choice, allocator
            fn(x[:k * flips])
        sync(device)
    else:
        torch.set_num_threads(threads)
        fn(x[:2])  # warm-up (allocator, kernels)
    t, done = time.perf_counter(), 0
    for k in sizes:
        fn(x[:k * flips])
        done += k
        progress.tick(phase, done, sum(sizes), final=False)  # a slow VAE (SD-VAE on a CPU)
    sync(device)
    return time.perf_counter() - t


class PartsAlone:
    """The parts of the job timed alone on one batch: its files read and ADM-cropped inline,
    then the bare encoder on in-memory tensors of that batch's size (the shared-cores case), and
    with ``rep`` the representation encoder on the same tensors after it."""

    def __init__(self, codec: VAECodec, listing: Listing, res: int, flips: int, batch: int,
                 rep: ReprTargets | None = None) -> None:
        self.codec, self.listing, self.res = codec, listing, res
        self.flips, self.targets = flips, rep
        self.x = model_input(batch * flips, res, codec.device)
        self.vae = self.dec = self.rep = 0.0  # seconds, summed over the batches timed

    def __call__(self, indices: list[int]) -> None:
        if not indices:
            return
        t = time.perf_counter()
        for i in indices:
            load_image(self.listing.read_bytes(i), self.res)
        t1 = time.perf_counter()
        self.codec.encode(self.x[:len(indices) * self.flips])
        t2 = time.perf_counter()
        if self.targets is not None:
            self.targets.features(self.x[:len(indices) * self.flips])
        self.dec += t1 - t
        self.vae += t2 - t1
        self.rep += time.perf_counter() - t2


def time_decode_workers(listing: Listing, cfg: EncodeConfig, workers: int, pin: bool,
                        progress: Progress = QUIET) -> tuple[int, float]:
    """(images, seconds): the job's own loader (make_loader: workers, prefetch, pinning) decoding
    the job's batches without the VAE, worker start-up included. With workers, the batches are
    repeated to whole rounds of ``workers`` batches, at least 3, so no worker idles at the end
    while the others finish (that idling would read as a slower decoder)."""
    plan = job_plan(cfg, len(listing))
    if workers:
        m = workers * max(3, -(-len(plan) // workers))
        plan = [plan[i % len(plan)] for i in range(m)]
    total = sum(len(idx) for _, idx, _ in plan)
    loader = enc.make_loader(listing, cfg, plan, workers, pin)
    done, t = 0, time.perf_counter()
    for batch in loader:
        done += len(batch["indices"]) + len(batch["bad"])
        progress.tick(f"decode alone ({workers} workers)", done, total)
    return done, time.perf_counter() - t


class LoaderProbe:
    """While run_encode runs, wraps the job's make_loader to see each batch as the job receives
    it: progress lines, and the first and last arrival times for the steady-state rate. The
    batches pass through unchanged (a generator: microseconds per batch).

    With ``parts``, each arriving batch is first also run through the parts alone (the job waits
    meanwhile): parts and pipeline then alternate every ~0.1 s and meet the same state of the
    machine. Times are kept on a clock that stops during that work (``paused`` s in all), so the
    job's own figures exclude it."""

    def __init__(self, progress: Progress, phase: str, total: int,
                 parts: PartsAlone | None = None) -> None:
        self.progress, self.phase, self.total, self.parts = progress, phase, total, parts
        self.count = self.n_last = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.paused = 0.0

    def __enter__(self) -> "LoaderProbe":
        self._make = enc.make_loader
        enc.make_loader = self._wrapped
        return self

    def __exit__(self, *exc) -> None:
        enc.make_loader = self._make

    def _wrapped(self, *args, **kwargs):
        return self._iterate(self._make(*args, **kwargs))

    def _iterate(self, loader):
        for batch in loader:
            if self.parts is not None:
                t = time.perf_counter()
                self.parts(list(batch["indices"]))  # the images the job encodes
                self.paused += time.perf_counter() - t
            now = time.perf_counter() - self.paused
            self.t_first = self.t_first if self.t_first is not None else now
            self.t_last, self.n_last = now, len(batch["indices"]) + len(batch["bad"])
            self.count += self.n_last
            self.progress.tick(self.phase, self.count, self.total)
            yield batch

    def steady(self) -> tuple[int, float] | None:
        """(images, seconds) from the first batch's arrival to the last's: the batches before the
        last were processed in that span. None with fewer than two batches."""
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return None
        return self.count - self.n_last, self.t_last - self.t_first


def time_pipeline(cfg: EncodeConfig, progress: Progress = QUIET, phase: str = "pipeline",
                  total: int = 0, parts: PartsAlone | None = None,
                  ) -> tuple[float, float, tuple[int, float] | None]:
    """(seconds of the job's encoding loop, seconds of the whole job, steady (images, seconds)),
    without the time ``parts`` took (see :class:`LoaderProbe`).

    The loop is files -> decode workers -> VAE -> tars -> sidecars, start to last commit (what
    runs per image); the whole job adds the one-off set-up (listing, VAE load, job.json) and the
    manifest, which a real-size job amortises but a few hundred images do not.
    """
    t = time.perf_counter()
    with LoaderProbe(progress, phase, total, parts) as probe:
        done = run_encode(cfg)
    total_s = time.perf_counter() - t - probe.paused
    return done["seconds"] - probe.paused, total_s, probe.steady()


def measure_repeat(codec: VAECodec, paths: list[Path], listing: Listing, cfg: EncodeConfig,
                   threads: int, separate: bool, workers: int,
                   progress: Progress = QUIET, label: str = "", rep: ReprTargets | None = None) -> dict:
    """One repeat, all times for the n images: t_vae, t_rep (0 without ``rep``), t_dec, t_loop,
    t_total, steady. The representation encoder is timed wherever the VAE is, on the same batches.

    Shared cores with inline decoding (CPU): the parts are timed on each batch as it reaches
    the job, inside the job's loop (:class:`LoaderProbe`; why: the module's "Pairing"). Otherwise
    (GPU, or decode workers, which would keep decoding while the job waits): the VAE on half the
    job's batches just before the pipeline run and half just after; the decode workers once,
    just before."""
    n, res, f = len(paths), cfg.resolution, flips_factor(cfg)
    batches = [idx for _, idx, _ in job_plan(cfg, n)]
    if not separate and workers == 0:
        torch.set_num_threads(threads)
        parts = PartsAlone(codec, listing, res, f, max(len(b) for b in batches), rep)
        codec.encode(parts.x[:2])  # warm-up (allocator, kernels)
        if rep is not None:
            rep.features(parts.x[:2])
        progress.say(f"{label}pipeline (run_encode), {n} images, each batch also through the "
                     f"parts alone")
        t_loop, t_total, steady = time_pipeline(cfg, progress, f"{label}pipeline", n, parts)
        return {"vae": parts.vae, "rep": parts.rep, "dec": parts.dec, "loop": t_loop,
                "total": t_total, "steady": steady}
    sizes = [len(idx) for idx in batches]
    first, second = sizes[:len(sizes) // 2], sizes[len(sizes) // 2:]
    progress.say(f"{label}VAE alone, {sum(first)} of {n} images")
    t_vae = time_vae(codec, first, res, f, threads, progress, f"{label}VAE alone") \
        if first else 0.0
    t_rep = time_encoder(rep.features, codec.device, first, res, f, threads, progress,
                         f"{label}repr encoder alone") if first and rep is not None else 0.0
    progress.say(f"{label}decode alone, {workers} workers")
    imgs, secs = time_decode_workers(listing, cfg, workers, codec.device.type == "cuda", progress)
    t_dec = secs * n / imgs
    progress.say(f"{label}pipeline (run_encode), {n} images")
    t_loop, t_total, steady = time_pipeline(cfg, progress, f"{label}pipeline", n)
    progress.say(f"{label}VAE alone, {sum(second)} of {n} images")
    t_vae += time_vae(codec, second, res, f, threads, progress, f"{label}VAE alone")
    if rep is not None:
        t_rep += time_encoder(rep.features, codec.device, second, res, f, threads, progress,
                              f"{label}repr encoder alone")
    return {"vae": t_vae, "rep": t_rep, "dec": t_dec, "loop": t_loop, "total": t_total,
            "steady": steady}


def bound_rate(vae: float, dec: float, separate: bool) -> float:
    """Images/s the pipeline can reach from its parts' rates."""
    return min(vae, dec) if separate else 1.0 / (1.0 / vae + 1.0 / dec)


# ----------------------------------------------------------------------------- batch sweep


def encodes_per_s(fn: Callable[[torch.Tensor], object], x: torch.Tensor, min_s: float) -> float:
    """Encodes/s of ``fn`` on batch ``x``: warm-up, then calls for at least min_s and 3 calls."""
    for _ in range(2 if x.device.type == "cuda" else 1):
        fn(x)
    sync(x.device)
    calls, t = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t < min_s:
        fn(x)
        calls += 1
        if x.device.type == "cuda" and calls % 4 == 0:
            sync(x.device)
    sync(x.device)
    return calls * len(x) / (time.perf_counter() - t)


def half_weights_encoder(codec: VAECodec) -> Callable[[torch.Tensor], object]:
    """The encoder with its WEIGHTS in the compute dtype, no autocast (diffusers' usual fp16 use):
    GroupNorm then runs in half precision too (under autocast it runs in fp32). A diagnostic for
    codec.py, which keeps fp32 weights so an overflowing batch can be redone in fp32."""
    vae = copy.deepcopy(codec.vae).to(codec.dtype)

    def fn(x: torch.Tensor) -> object:
        with torch.inference_mode():
            post = vae.encode(x.to(codec.dtype)).latent_dist
            return post.mean, post.std

    return fn


def sweep_batches(codec: VAECodec, res: int, sizes: list[int], flops: int, progress: Progress,
                  min_s: float = 0.5, half_weights: bool = False) -> dict:
    """VAE alone at each batch size (encodes per call, as the job's --batch-size)."""
    fn = half_weights_encoder(codec) if half_weights else codec.encode
    name = "VAE alone, weights in " + str(codec.dtype).split(".")[-1] if half_weights else \
        "VAE alone"
    rows: dict[str, dict | None] = {}
    for b in sizes:
        try:
            rate = encodes_per_s(fn, model_input(b, res, codec.device), min_s)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            progress.say(f"{name}, batch {b}: out of memory")
            rows[str(b)] = None
            continue
        rows[str(b)] = {"encodes_s": round(rate, 2), "tflops": sig(rate * flops / 1e12)}
        progress.say(f"{name}, batch {b}: {rate:.1f} encodes/s, {rate * flops / 1e12:.3g} TFLOP/s")
    return rows


def sig(x: float, digits: int = 4) -> float:
    """x to ``digits`` significant digits (FLOP figures span 0.03 to 300)."""
    return float(f"{x:.{digits}g}")


def fastest(rows: dict) -> int | None:
    ok = {int(b): r["encodes_s"] for b, r in rows.items() if r}
    return max(ok, key=ok.__getitem__) if ok else None


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (< 60 s on 2 cores)")
    p.add_argument("--sd-vae", action="store_true", help="SD-VAE architecture (random weights)")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help="encodes per VAE call, as encode_latents.py --batch-size")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--flips", choices=("none", "both"), default="none",
                   help="as encode_latents.py: 'both' also encodes each flipped image")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="VAE precision on the GPU, as encode_latents.py (default fp16)")
    p.add_argument("--workers", type=int, default=None, help="override the job's choice")
    p.add_argument("--threads", type=int, default=None, help="override the job's choice")
    p.add_argument("--bound", choices=("auto", "shared", "separate"), default="auto",
                   help="shared: the parts share the cores (CPU: decode timed inline, bound "
                   "1/(t_vae+t_decode)); separate: decode workers beside the VAE (GPU: bound "
                   "min(VAE, decode)); auto: by device")
    p.add_argument("--batch-sizes", default=None,
                   help="also time the VAE alone at these batch sizes, e.g. 32,64,128 "
                   f"(default on a GPU: {','.join(map(str, GPU_SWEEP))}; 'none' skips it)")
    p.add_argument("--half-weights", action="store_true",
                   help="sweep also with the VAE's weights in the dtype (no autocast): a "
                   "diagnostic for codec.py")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for the VAE and the job alike")
    p.add_argument("--repr", metavar="SPEC", default=None,
                   help="as encode_latents.py --repr (timm id, folder or 'demo'): the job also "
                   "stores feature grids and the bound's encoder part is VAE + this encoder")
    return p.parse_args(argv)


def pick_device(name: str | None) -> torch.device:
    """--device, else the GPU when there is one (the job's own default). The VAE used to be
    pinned to the CPU here: on a GPU machine the SD-VAE then ran at 256 px on the CPU, minutes
    per repeat before the first line of output."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def defaults(args: argparse.Namespace, cuda: bool) -> tuple[int, int, int, int]:
    """(images, resolution, batch, repeats): flags win over the per-device defaults."""
    if cuda:  # enough images that the wait for the first decoded batch is a small share
        table = {(True, True): (256, 256, 64, 2), (True, False): (2048, 256, 64, 3),
                 (False, True): (1024, 64, 64, 2), (False, False): (4096, 64, 64, 3)}
    else:
        table = {(True, True): (24, 64, 8, 2), (True, False): (64, 128, 8, 3),
                 (False, True): (192, 64, 32, 15), (False, False): (1024, 64, 32, 8)}
    n, res, batch, reps = table[(args.sd_vae, args.quick)]
    return (args.images or n, args.resolution or res, args.batch_size or batch,
            args.repeats or reps)


def run(argv: list[str] | None = None, progress: Progress | None = None) -> dict:
    """The benchmark; returns the JSON object (main prints it)."""
    progress = progress or Progress()
    args = parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    separate = args.bound == "separate" or (args.bound == "auto" and cuda)
    n, res, batch, reps = defaults(args, cuda)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    sweep = args.batch_sizes if args.batch_sizes is not None else \
        (",".join(map(str, GPU_SWEEP)) if cuda else "none")
    sweep_sizes = [] if sweep.lower() in ("none", "") else [int(b) for b in sweep.split(",")]
    progress.say(f"device {device}, {n} images, {res} px, batch {batch}, flips {args.flips}, "
                 f"{reps} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        paths = make_jpegs(tmp_p / "src", n, progress=progress)
        progress.say("building the random-weight " + ("SD-VAE" if args.sd_vae else "tiny VAE"))
        vae_name, params = make_vae(tmp_p / "vae", args.sd_vae)
        codec = VAECodec.load(str(tmp_p / "vae"), device=device, dtype=args.dtype)
        flops = encoder_flops(codec, res)
        progress.say(f"VAE loaded on {device} ({str(codec.dtype).split('.')[-1]}), "
                     f"{flops / 1e9:.4g} GFLOP per {res} px image")
        cfg = EncodeConfig(source=str(tmp_p / "src"), out="", vae=str(tmp_p / "vae"),
                           resolution=res, flips=args.flips, shard_size=EncodeConfig.shard_size,
                           batch_size=batch, workers=args.workers, threads=args.threads,
                           dtype=args.dtype, device=str(device), progress=False)
        targets = load_repr(cfg, args.repr, codec, progress) if args.repr else None
        listing = list_source(cfg.source)
        workers, threads = choose_parallelism(cfg, device)
        all_cores = max(threads, len(os.sched_getaffinity(0)))
        sweep_rows = sweep_batches(codec, res, sweep_sizes, flops, progress) \
            if sweep_sizes else None
        sweep_half = sweep_batches(codec, res, sweep_sizes, flops, progress, half_weights=True) \
            if sweep_sizes and args.half_weights and cuda else None
        setup_s = progress.elapsed()
        rows = []
        for r in range(reps):
            if args.quick and r >= 3 and progress.elapsed() > QUICK_BUDGET_S:
                break  # a loaded machine: keep --quick within its minute
            cfg.out = str(tmp_p / f"out{r}")
            rows.append(measure_repeat(codec, paths, listing, cfg, all_cores, separate, workers,
                                       progress, f"repeat {r + 1}/{reps}: ", targets))
            v, d, p, e = repeat_rates(rows[-1], n)
            rep = f"repr {n / rows[-1]['rep']:.1f} img/s, " if targets else ""
            progress.say(f"repeat {r + 1}/{reps}: vae {v:.1f} img/s, {rep}decode {d:.1f} img/s, "
                         f"pipeline {p:.1f} img/s, ratio {p / bound_rate(e, d, separate):.3f}")
    f = flips_factor(cfg)
    rates = [repeat_rates(m, n) for m in rows]
    ratios = [p / bound_rate(e, d, separate) for v, d, p, e in rates]
    med = sorted(range(len(rows)), key=ratios.__getitem__)[(len(rows) - 1) // 2]
    (v, d, p, e), m = rates[med], rows[med]
    bound = bound_rate(e, d, separate)
    best = max(r[2] for r in rates) / bound_rate(max(r[3] for r in rates),
                                                 max(r[1] for r in rates), separate)
    steady = m["steady"][0] / m["steady"][1] if m["steady"] else None
    extra = {} if targets is None else {"repr": repr_figures(targets, m, n, f, separate)}
    enc_name = "vae+repr" if targets else "vae"
    return {
        "pipeline_img_s": round(p, 2), "vae_img_s": round(v, 2), "decode_img_s": round(d, 2),
        "bound_img_s": round(bound, 2), "ratio": round(p / bound, 3), "vae": vae_name,
        "params": params, "pipeline_total_img_s": round(n / m["total"], 2),
        "ratio_total": round(n / m["total"] / bound, 3),
        "ratios_all_repeats": [round(x, 3) for x in ratios], "ratio_best_of_each": round(best, 3),
        "images": n, "resolution": res, "batch_size": batch, "repeats": len(rows),
        "workers": workers, "threads": threads, "vae_threads": all_cores,
        "cpus": len(os.sched_getaffinity(0)), "source": SOURCE,
        # what the parts and the bound are
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "dtype": str(codec.dtype).split(".")[-1], "flips": args.flips,
        "bound": bound_name(separate, targets is not None),
        "bottleneck": enc_name if e <= d else "decode",
        "decode_workers": workers if separate else 0,
        "ratio_vae": round(p / v, 3),
        "pipeline_steady_img_s": round(steady, 2) if steady else None,
        "ratio_steady": round(steady / bound, 3) if steady else None,
        "vae_encodes_s": round(v * f, 2),
        "vae_gflop_per_encode": sig(flops / 1e9),
        "vae_tflops": sig(v * f * flops / 1e12),
        "pipeline_tflops": sig(p * f * flops / 1e12),
        "batch_sweep": sweep_rows, "best_batch_size": fastest(sweep_rows) if sweep_rows else None,
        "batch_sweep_half_weights": sweep_half,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "setup_s": round(setup_s, 1), "elapsed_s": round(progress.elapsed(), 1), **extra,
    }


def load_repr(cfg: EncodeConfig, spec: str, codec: VAECodec, progress: Progress) -> ReprTargets:
    """The job's representation encoder (``cfg.repr`` set, so run_encode stores its grids too),
    loaded as the job loads it: the VAE's device and dtype, the job's input size rule."""
    cfg.repr = spec
    targets = ReprTargets(encode_repr.load_encoder(cfg, codec.device, codec.dtype))
    enc = targets.encoder
    progress.say(f"representation encoder {spec}: {enc.architecture}, {enc.image_size} px, grid "
                 f"{enc.grid}, D={enc.dim}, {targets.flops_per_image / 1e9:.4g} GFLOP per image")
    return targets


def repeat_rates(m: dict, n: int) -> tuple[float, float, float, float]:
    """(VAE, decode, pipeline, VAE + representation encoder) images/s of one repeat; without
    --repr the last is the VAE's own (t_rep = 0)."""
    return n / m["vae"], n / m["dec"], n / m["loop"], n / (m["vae"] + m["rep"])


def bound_name(separate: bool, with_repr: bool) -> str:
    enc = "1/(1/vae + 1/repr)" if with_repr else "vae"
    if separate:
        return f"min({enc}, decode)"
    return "1/(1/vae + 1/repr + 1/decode)" if with_repr else "1/(1/vae + 1/decode)"


def repr_figures(targets: ReprTargets, m: dict, n: int, flips: int, separate: bool) -> dict:
    """The representation encoder alone in the median repeat: its rate, FLOP rate and share of
    the bound's per-image time (VAE + repr [+ decode on shared cores])."""
    enc, rate = targets.encoder, n / m["rep"]
    path = m["vae"] + m["rep"] + (0.0 if separate else m["dec"])
    return {"spec": enc.name, "architecture": enc.architecture, "image_size": enc.image_size,
            "grid": list(enc.grid), "dim": enc.dim, "img_s": round(rate, 2),
            "encodes_s": round(rate * flips, 2), "vae_plus_repr_img_s": round(n / (m["vae"] + m["rep"]), 2),
            "share_of_bound_time": round(m["rep"] / path, 3),
            "gflop_per_encode": sig(targets.flops_per_image / 1e9),
            "tflops": sig(rate * flips * targets.flops_per_image / 1e12)}


def main() -> None:
    print(json.dumps(run()), flush=True)


if __name__ == "__main__":
    main()
