"""One-shot GPU benchmark suite: every throughput figure of the project in ONE call, measured.

GPU time is rented and scarce, so one process runs every stage back to back within a time budget
(420 s from the start of the process on a GPU, ``--budget-s``: an optional stage is skipped when
less than its estimate is left (train_XL2_repa 60 s, encode_repr 40 s, train_XL2_2025 60 s,
sample_compiled 120 s, train_XL2_compiled 240 s, run in that order after the others) and a stage
that overruns is cut when it runs short) and prints each stage's JSON line as soon as it is done; a stage that fails
prints its line with an "error" field and the others still run (exit status 1 at the end).

  peak        the device's own peak: a large matmul (bf16 8192^3 on a GPU), TFLOP/s. Every later
              stage reports ``share_of_peak`` against it (auto-added when another stage runs).
  train_*     the training step of the real loop (``train.train_step`` on the real in-memory
              loader over synthetic latents): DiT-B/2 and DiT-XL/2, 4x32x32, batch 128, bf16, full
              steps and patch steps (side 16, twice the batch: the {16: 0.5, 32: 0.5} schedule),
              eager and compiled (XL compiled only if the time budget still allows). Warm-up
              steps excluded; TFLOP/s = 3 x forward FLOPs (counted by FlopCounterMode; with REPA
              also the projector's, as the trainer counts) / time.
  sample      the sampling job's batch loop (``sampling.generate`` around ``edm.ImageSampler``):
              DiT-XL/2 (random weights), 18 Heun steps, guidance 1.5, batch 100, SD-VAE decode
              (random weights), against the bare network forwards of the same batch.
              ``sample_compiled``: the same with the network compiled, if the budget allows.
  encode      the encoding job (``encode.run_encode`` on JPEGs on disk) against the bare VAE
              encoder (``VAECodec.encode``) on batches of the same size and dtype.
  pipeline    encode_latents.py -> train_latent.py -> train_latent.py --resume auto -> sample.py
              as subprocesses at ImageNet-256 sizes (DiT-B/2, a handful of steps).
  train_XL2_repa  (optional) issue 28's first GPU target: DiT-XL/2's training step (as train_*,
              eager) with REPA's recipe (repa.weight=0.5, block 8, projector width 2048) on
              synthetic latents that carry synthetic feature grids (16x16x768 fp16: DINOv2-B/14's
              at 224 px), against the same steps without REPA in the same stage, same data:
              both step times, ``repa_overhead`` = with / without - 1 per kind (full, patch) and
              the worse at the top (target <= 0.05), the projector's share of counted FLOPs.
  encode_repr (optional) issue 28's second: DINOv2-B/14 (timm's vit_base_patch14_dinov2 at
              224 px, random weights) through ``ReprEncoder`` on 256 px batches in the VAE's dtype,
              img/s beside the SD-VAE encoder's on the same batches (``ratio`` = repr / VAE); then,
              if the budget allows, the encoding job with ``--repr`` on that encoder saved as a
              folder, against the job without it (the encode stage's figure).
  train_XL2_2025 (optional) issue 29's GPU target: DiT-XL/2's training step (as train_*, eager,
              at batch 64: two trainers are alive)
              with today's block and with the 2025 block (preset DiT-XL/2-2025: models.BLOCK_2025,
              RoPE, SwiGLU, RMSNorm, QK-norm), both trainers in the same stage, their full and
              patch steps interleaved ABBA on the same data: each block's training FLOP rate
              (patches/s x 3 x forward FLOPs a patch, ``train_gflop_s``) and
              ``block_flop_rate_ratio`` = 2025 / 2022 on the {16: 0.5, 32: 0.5} mix (target
              >= 0.95; per kind too), figure names as ``bench_train.py --block 2025``.

--dry runs every stage at tiny sizes on the CPU (under 5 minutes on 2 cores: the CI check; the
REPA stages there: DiT-T/2 with 4x4x32 grids, a 2-block ViT of the same timm class at 32 px; the
2025 block's: DiT-T/2 against DiT-T/2-2025); --quick is --dry with the compiled stages skipped
(under a minute). The last line printed is one JSON object (all stages); a log and summary.json
go to --out. Models and VAEs have random weights: the figures are speed, never quality.

    python benchmarks/gpu_suite.py --dry                     # CPU, tiny sizes
    python benchmarks/gpu_suite.py --quick                   # CPU, < 60 s
    python benchmarks/gpu_suite.py --only train_B2,sample    # a subset (prefixes of stage names)

On a GPU machine with Python 3.12 and torch but without diffusers, webdataset, braceexpand,
clean-fid and importlib_metadata (and no network), fetch their wheels beforehand elsewhere:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \\
        diffusers webdataset braceexpand clean-fid importlib_metadata

then, from the checkout root on the GPU machine, in one call:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \\
        python3 benchmarks/gpu_suite.py --out $OUT/gpu

The subprocess stages run ``sys.executable`` with this environment (PYTHONPATH included).
"""

from __future__ import annotations

import os
import time

T0 = time.perf_counter()  # the budget counts from here: imports take seconds of the rented time too
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as encode_latents.py: idle threads sleep, not spin

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import math
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

import numpy as np
import timm
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))  # benchmarks/ is no package: its helpers by module name

from bench_train import synthetic_loader  # noqa: E402
from latent_patch import config, sampling  # noqa: E402
from latent_patch.budget import training_flops  # noqa: E402
from latent_patch.codec import VAECodec, make_decoder, parse_dtype  # noqa: E402
from latent_patch.config import EncodeConfig, SamplerConfig, TrainConfig  # noqa: E402
from latent_patch.dist import autocast  # noqa: E402
from latent_patch.edm import ImageSampler  # noqa: E402
from latent_patch.encode import run_encode  # noqa: E402
from latent_patch.loader import MemoryLoader  # noqa: E402
from latent_patch.models import BLOCK_2025, ModelConfig, build_model, forward_flops  # noqa: E402
from latent_patch.represent import ReprEncoder, save_folder  # noqa: E402
from latent_patch.train import StepPlan, build_accelerator, build_trainer, train_step  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)


# --------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class Sizes:
    """Every size the suite uses: ImageNet-256 scale on a GPU, tiny with --dry."""

    budget_s: float  # the whole suite; optional stages are skipped when it runs short
    peak_n: int
    train_models: tuple[str, ...]
    optional_compiled: tuple[str, ...]  # compiled only if the budget still allows
    latent: int
    batch: int
    precision: str  # run.mixed_precision of the training stages
    train_rounds: int  # timed blocks per kind (full, patch), interleaved
    train_block: int  # back-to-back steps per block
    warmup: int  # eager warm-up steps per kind
    compiled_warmup: int  # the first compiles
    sample_model: str
    sample_batch: int
    sample_steps: int
    sample_batches: int  # timed batches
    sample_compile_estimate_s: float  # the compiled sampling stage runs only if this much budget is left
    amp: str  # ImageSampler amp and the VAE's dtype ("none": fp32)
    vae: dict
    vae_res: int  # pixel side of the encode stage and the pipeline
    encode_images: int
    encode_batch: int
    classes: int
    pipe_config: str
    pipe_overrides: tuple[str, ...]
    pipe_patches: int  # first train_latent.py run; the resumed one goes to twice this
    pipe_samples: int
    pipe_sample_steps: int
    repa_model: str  # the REPA stage's DiT, trained with and without alignment
    repa: tuple[str, ...]  # its alignment overrides (REPA's recipe on a GPU)
    repr_grid: tuple[int, int]  # the synthetic feature grids' (gh, gw): the model's token grid
    repr_dims: int  # and their K
    repa_estimate_s: float  # the REPA stage runs only if this much budget is left
    repr_arch: str  # the representation encoder's timm architecture (random weights)
    repr_args: dict  # its timm kwargs (img_size: its input side)
    repr_estimate_s: float  # the encode_repr stage runs only if this much budget is left
    repr_job_estimate_s: float  # and its encoding job (with --repr) only if this much is left then
    block_model: str  # the 2025 block stage's DiT: today's block against its "-2025" preset
    block_estimate_s: float  # that stage runs only if this much budget is left
    block_batch: int  # its full-step batch (two trainers alive: see stage_train_2025)


GPU = Sizes(
    budget_s=420, peak_n=8192, train_models=("DiT-B/2", "DiT-XL/2"), optional_compiled=("DiT-XL/2",),
    latent=32, batch=128, precision="bf16", train_rounds=4, train_block=3, warmup=3, compiled_warmup=5,
    sample_model="DiT-XL/2", sample_batch=100, sample_steps=18, sample_batches=2, sample_compile_estimate_s=120,
    amp="bf16",
    vae=SD_VAE, vae_res=256, encode_images=1000, encode_batch=64, classes=10,
    pipe_config="configs/imagenet256_dit_b2.yaml",
    pipe_overrides=("data.batch_size=32", "optim.batch_size_global=32", "data.num_workers=2"),
    pipe_patches=480, pipe_samples=100, pipe_sample_steps=18,
    # REPA's recipe (weight 0.5, block 8, projector width 2048) on DINOv2-B/14 at 224 px's grid
    repa_model="DiT-XL/2", repa=("repa.weight=0.5", "repa.block=8", "repa.proj_hidden=2048"),
    repr_grid=(16, 16), repr_dims=768, repa_estimate_s=60,
    repr_arch="vit_base_patch14_dinov2", repr_args={"img_size": 224}, repr_estimate_s=40, repr_job_estimate_s=20,
    block_model="DiT-XL/2", block_estimate_s=60, block_batch=64,
)
DRY = Sizes(
    budget_s=270, peak_n=512, train_models=("DiT-T/2",), optional_compiled=(),
    latent=8, batch=8, precision="no", train_rounds=3, train_block=1, warmup=1, compiled_warmup=2,
    sample_model="DiT-T/2", sample_batch=4, sample_steps=4, sample_batches=2, sample_compile_estimate_s=60, amp="none",
    vae=TINY_VAE, vae_res=32, encode_images=48, encode_batch=16, classes=4,
    pipe_config="configs/tiny_cpu_dit.yaml", pipe_overrides=(),
    pipe_patches=48, pipe_samples=8, pipe_sample_steps=4,
    repa_model="DiT-T/2", repa=("repa.weight=0.5", "repa.block=1", "repa.proj_hidden=64"),
    repr_grid=(4, 4), repr_dims=32, repa_estimate_s=15,
    repr_arch="vit_base_patch14_dinov2", repr_estimate_s=15, repr_job_estimate_s=5,
    repr_args={"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2},
    block_model="DiT-T/2", block_estimate_s=10, block_batch=8,
)


# --------------------------------------------------------------------------- the suite's state

@dataclass
class Suite:
    """What the stages share: sizes, device, the measured peak, the work folder and the log."""

    sizes: Sizes
    device: torch.device
    work: Path
    log: Any  # text file
    dry: bool
    quick: bool = False
    start: float = T0
    peak_flops: float | None = None
    cache: dict = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        """A progress line on stdout and in the log, flushed at once (the user watches it live)."""
        line = f"[gpu_suite {self.elapsed():6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def share(self, flops_per_s: float) -> float | None:
        return flops_per_s / self.peak_flops if self.peak_flops else None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds of ``fn`` with the device drained before and after (GPU work is asynchronous)."""
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def memory(self) -> dict:
        """Peak device memory since the last reset (GPU), or the process's peak RSS (CPU)."""
        if self.device.type == "cuda":
            return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)}
        return {"peak_rss_gib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}

    def reset_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Suite], dict]
    estimate_s: float = 0.0  # skipped when an optional stage's estimate exceeds the budget left
    optional: bool = False


class StageTimeout(Exception):
    """A stage ran past the time the suite's budget left it."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in this (main) thread after ``seconds``: a hung stage must not eat the
    rented machine's remaining minutes. Subprocesses started with subprocess.run are killed."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise StageTimeout(f"cut after {seconds:.0f} s (the suite's time budget)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class RedoCounter(logging.Handler):
    """Counts the codec's "redone in fp32" warnings: a redo doubles a batch's time, and random
    weights could overflow where real ones do not, so a stage reports how many it saw."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "redone in fp32" in record.getMessage():
            self.count += 1


@contextlib.contextmanager
def counting_redos() -> Iterator[RedoCounter]:
    counter = RedoCounter()
    logger = logging.getLogger("latent_patch.codec")
    logger.addHandler(counter)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)


def free_memory() -> None:
    """Between stages: drop compiled graphs and cached blocks so each stage starts clean."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- shared inputs

def write_jpegs(root: Path, n: int, side: int, classes: int, seed: int = 0) -> Path:
    """``n`` JPEGs (q90, smooth random content, a bit larger than ``side``) in class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (side + int(rng.integers(0, side // 4 + 1)) for _ in range(2))
        small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
        path = root / f"class{i % classes:03d}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path, "JPEG", quality=90)
    return root


def jpegs(suite: Suite) -> Path:
    """The JPEG tree the encode and pipeline stages share (written once)."""
    if "jpegs" not in suite.cache:
        s = suite.sizes
        suite.cache["jpegs"] = write_jpegs(suite.work / "jpegs", s.encode_images, s.vae_res + s.vae_res // 8, s.classes)
    return suite.cache["jpegs"]


def vae_kwargs(sizes: Sizes) -> dict:
    n = len(sizes.vae["block_out_channels"])
    return dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, scaling_factor=0.18215, **sizes.vae)


def vae_dir(suite: Suite) -> Path:
    """A random-weight AutoencoderKL (SD-VAE architecture on a GPU) saved once for every stage."""
    if "vae" not in suite.cache:
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        path = suite.work / "vae"
        AutoencoderKL(**vae_kwargs(suite.sizes)).save_pretrained(path)
        suite.cache["vae"] = path
    return suite.cache["vae"]


def vae_dtype(sizes: Sizes) -> str | None:
    """bf16 for the VAE on a GPU: fp16 (the job's default) may overflow with random weights."""
    return None if sizes.amp == "none" else sizes.amp


def vae_encode_flops(sizes: Sizes) -> float:
    """FLOPs of one image through the VAE encoder at the stage's side, counted on meta tensors."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**vae_kwargs(sizes))
        x = torch.zeros(1, 3, sizes.vae_res, sizes.vae_res)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(x)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- peak

def stage_peak(suite: Suite) -> dict:
    """TFLOP/s of one large square matmul in the suite's training precision (bf16 on a GPU;
    fp32 on the CPU, where the dry stages train in fp32): the ceiling the others are held to."""
    n = suite.sizes.peak_n
    dtype = torch.bfloat16 if suite.device.type == "cuda" else torch.float32
    a, b, c = (torch.randn(n, n, device=suite.device, dtype=dtype) for _ in range(3))

    def matmuls(k: int) -> None:
        for _ in range(k):
            torch.matmul(a, b, out=c)  # into one buffer: a GPU queues thousands of 128 MiB results

    matmuls(3)
    iters, secs = 1, 0.0
    while secs < 1.0 and iters < 4096:  # at least a second of timed work
        iters *= 2
        secs = suite.timed(lambda: matmuls(iters))
    flops = 2 * n**3 * iters / secs
    suite.peak_flops = flops
    return {"tflops": round(flops / 1e12, 3), "n": n, "dtype": str(dtype).replace("torch.", ""),
            "iters": iters, "device_name": device_name(suite.device)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- training

def fresh_accelerate() -> None:
    """accelerate keeps one process-wide state whose settings (mixed precision, dynamo backend)
    are fixed by the first Accelerator; each training stage starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_config(sizes: Sizes, preset: str, compiled: bool, extra: tuple[str, ...] = (),
                 batch: int | None = None) -> TrainConfig:
    """The training config of one stage (through the project's loader: a bad key fails here);
    ``extra`` overrides come last (the REPA stage's ``repa.*``); ``batch``: other than the suite's."""
    B = batch or sizes.batch
    return config.load(TrainConfig, None, [
        f"model.preset={preset}", f"model.latent_size={sizes.latent}", "model.latent_channels=4",
        "model.num_classes=1000", f"data.batch_size={B}", f"optim.batch_size_global={B}",
        "run.tensorboard=false", f"run.mixed_precision={sizes.precision}", f"run.compile={str(compiled).lower()}",
        "run.out_dir=/tmp/gpu_suite_unused", *extra,
    ])


def synthetic_data(suite: Suite, n: int, C: int, R: int, num_classes: int, batch: int,
                   features: tuple[int, int, int] | None = None) -> tuple[MemoryLoader, dict | None]:
    """(the real in-memory loader over bench_train's synthetic latents, the manifest the trainer
    reads or None). Pinned on a GPU as ``loader.build_loader`` pins: a copy from pageable memory
    drains the GPU's queue, which would charge the REPA stage's feature grids (50 MB a batch of
    128 at 16x16x768) to its step time where a real run overlaps their copy with compute. With
    ``features`` (gh, gw, K) every sample also has a float16 grid (N(0, 1)) that batches carry as
    ``Batch.repr``, and the manifest has the ``repr`` entry ``align.build_projector`` checks.
    Latents, labels and their order are the same with or without: the REPA stage's two arms train
    on the same data."""
    base = synthetic_loader(n, C, R, num_classes, batch)
    info, feats, manifest = base.info, None, None
    if features is not None:
        gh, gw, K = features
        manifest = {"repr": {"grid": [gh, gw], "dims": K}}
        info = dataclasses.replace(info, manifest=manifest, repr_shape=(gh, gw, K))
        feats = torch.randn(n, gh, gw, K, generator=torch.Generator().manual_seed(1), dtype=torch.float16)
    loader = MemoryLoader(info, base.latents, base.labels, batch, seed=0, pin_memory=suite.device.type == "cuda",
                          features=feats)
    return loader, manifest


def step_plans(B: int, R: int) -> dict[str, StepPlan]:
    """A full step (side R, batch B) and a patch step (side R/2, batch 2B), as bench_train plans them."""
    half = R // 2
    return {"full": StepPlan(size=R, mult=1, patches=B, full_equiv=float(B)),
            "patch": StepPlan(size=half, mult=2, patches=2 * B, full_equiv=2 * B * (half / R) ** 2)}


def timed_steps(suite: Suite, jobs: dict[Hashable, tuple[Any, StepPlan]], rounds: int,
                block: int = 1) -> dict[Hashable, list[float]]:
    """Seconds per step of each block of ``block`` back-to-back steps of one job (a trainer and a
    step kind), the jobs interleaved ABBA over ``rounds`` so drifting load hits all alike: step
    kinds of one trainer, or the same kinds of two trainers (the 2025 block stage). The device is
    drained only around a block, as the loop itself never waits for a step: a sync per step would
    hide no host work."""
    times: dict[Hashable, list[float]] = {k: [] for k in jobs}
    keys = list(jobs)
    for i in range(rounds):
        for key in keys if i % 2 == 0 else keys[::-1]:
            trainer, plan = jobs[key]
            losses: list[torch.Tensor] = []
            secs = suite.timed(lambda: losses.extend(train_step(trainer, plan) for _ in range(block)))
            times[key].append(secs / block)
            if not bool(torch.isfinite(torch.stack(losses)).all()):
                raise RuntimeError(f"non-finite loss in a {key} step")
    return times


def make_trainer(suite: Suite, cfg: TrainConfig, acc: Any, features: tuple[int, int, int] | None = None) -> Any:
    """A fresh trainer of ``cfg`` on its own synthetic loader (same latents, labels and order for
    every trainer built here: arms compared in one stage train on the same data), batches of the
    config's ``data.batch_size``."""
    C, R, B = 4, suite.sizes.latent, cfg.data.batch_size
    loader, manifest = synthetic_data(suite, max(8 * B, 512), C, R, cfg.model.num_classes, B, features)
    return build_trainer(cfg, acc, iter(loader), loader, (C, R), loader.vae, manifest)


def kind_figures(suite: Suite, plan: StepPlan, times: list[float], per_patch: float) -> dict:
    """One step kind's figures from its timed blocks: the median step, patches/s, TFLOP/s at
    ``per_patch`` training FLOPs a patch, share of peak."""
    step_s = statistics.median(times)
    flops = per_patch * plan.patches / step_s
    return {"side": plan.size, "batch": plan.patches, "step_s": round(step_s, 5),
            "train_flops_per_patch": int(per_patch),
            "step_s_blocks": [round(x, 5) for x in times],  # one far above: a recompile
            "samples_s": round(plan.patches / step_s, 2), "tflops": round(flops / 1e12, 4),
            "share_of_peak": _round(suite.share(flops), 4)}


def run_train(suite: Suite, preset: str, compiled: bool, extra: tuple[str, ...] = (),
              features: tuple[int, int, int] | None = None) -> dict:
    """One model and mode: warm-up (the compile, when compiled), then timed full and patch steps.
    ``extra``: config overrides (``repa.*``); ``features``: the (gh, gw, K) grids the batches carry."""
    s = suite.sizes
    fresh_accelerate()
    cfg = train_config(s, preset, compiled, extra)
    trainer = make_trainer(suite, cfg, build_accelerator(cfg, with_trackers=False), features)
    C, R, B = 4, s.latent, s.batch
    plans = step_plans(B, R)
    jobs = {kind: (trainer, plan) for kind, plan in plans.items()}
    warm = s.compiled_warmup if compiled else s.warmup
    # interleaved like the timed steps, so every graph the alternation needs (a compile per shape)
    # is built before timing starts
    warmup_s = {k: round(sum(v), 3) for k, v in timed_steps(suite, jobs, warm).items()}
    suite.reset_memory()
    times = timed_steps(suite, jobs, s.train_rounds, s.train_block)
    out: dict[str, Any] = {
        "model": preset, "params_m": round(sum(p.numel() for p in trainer.net.parameters()) / 1e6, 2),
        "latent": [C, R, R], "batch": B, "precision": s.precision, "compiled": compiled,
        "timed_steps_per_kind": s.train_rounds * s.train_block, "warmup_steps_per_kind": warm, "warmup_s": warmup_s,
    }
    if trainer.projector is not None:
        out["repa"] = {**dataclasses.asdict(cfg.repa), "features": [*features, "float16"],
                       "projector_params_m": round(sum(p.numel() for p in trainer.projector.parameters()) / 1e6, 2)}
    for kind, plan in plans.items():
        # the trainer's own count: 3 x forward, plus the projector and the loss when aligning
        per_patch = training_flops(cfg.model, plan.size, cfg.repa, features[-1] if features else 0)
        out[kind] = kind_figures(suite, plan, times[kind], per_patch)
    full, patch = out["full"], out["patch"]
    # the paper's schedule {R/2: 0.5, R: 0.5} from the two measured step times
    sched = (0.5 * full["batch"] + 0.5 * patch["batch"]) / (0.5 * full["step_s"] + 0.5 * patch["step_s"])
    out.update({"latents_s": full["samples_s"], "patches_s": patch["samples_s"],
                "schedule_patches_s": round(sched, 2), "schedule_vs_full": round(sched / full["samples_s"], 3),
                "tflops": full["tflops"], "share_of_peak": full["share_of_peak"], **suite.memory()})
    return out


def train_stage(preset: str, compiled: bool) -> Callable[[Suite], dict]:
    def stage(suite: Suite) -> dict:
        why = None
        if compiled and suite.quick:
            why = "--quick: torch.compile takes over a minute on a CPU"
        elif compiled and suite.device.type == "cpu" and not compile_works():
            why = "torch.compile needs a C++ compiler on the CPU: none found"
        return {"model": preset, "compiled": True, "skipped": why} if why else run_train(suite, preset, compiled)

    return stage


def compile_works() -> bool:
    """Inductor on the CPU needs a C++ compiler; without one the compiled stage is skipped, not failed."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


def tag(preset: str) -> str:
    """"DiT-XL/2" -> "XL2": short stage names."""
    return preset.split("-", 1)[-1].replace("/", "")


REPA_TARGET = 0.05  # issue 28: a step with REPA within 5 % of the same step without, on a GPU


def stage_train_repa(suite: Suite) -> dict:
    """The training step with REPA (``repa.*`` of the sizes, synthetic feature grids in every
    batch) against the same steps without it, in this process on the same latents and labels:
    ``repa_overhead`` = step time with / without - 1 per step kind, the worse of the two at the
    top (issue 28's target: <= 0.05 on a GPU), and the projector's share of the counted FLOPs.

    The arms run one after the other, each a fresh trainer through ``run_train`` with its own
    warm-up steps, not side by side: two DiT-XL/2 trainers (weights, EMA, AdamW) beside one full
    step's activations would come near an H100's 80 GB. Both read the same data through the same
    pinned loader, so the aligning arm pays what a real run pays for its grids (gather, copy,
    resample and crop, projector, loss) and no more."""
    s = suite.sizes
    without = run_train(suite, s.repa_model, False)
    fresh_accelerate()
    free_memory()  # the first arm's trainer goes before the second is built
    aligned = run_train(suite, s.repa_model, False, s.repa, (*s.repr_grid, s.repr_dims))
    out: dict[str, Any] = {"model": s.repa_model, "latent": aligned["latent"], "batch": s.batch,
                           "precision": s.precision, "repa": aligned["repa"]}
    for kind in ("full", "patch"):
        a, b = without[kind], aligned[kind]
        out[kind] = {"side": b["side"], "batch": b["batch"], "step_s_without": a["step_s"], "step_s_with": b["step_s"],
                     "repa_overhead": round(b["step_s"] / a["step_s"] - 1, 4),
                     "projector_flops_share": round(1 - a["train_flops_per_patch"] / b["train_flops_per_patch"], 5),
                     "tflops_with": b["tflops"], "share_of_peak_with": b["share_of_peak"]}
    worst = max(out["full"]["repa_overhead"], out["patch"]["repa_overhead"])
    mem = {k: v for k, v in aligned.items() if k.startswith("peak_")}  # the aligning arm's own peak
    out.update({"repa_overhead": worst, "target": REPA_TARGET,
                "meets_target": None if suite.device.type != "cuda" else worst <= REPA_TARGET,
                "projector_flops_share": out["full"]["projector_flops_share"],
                "latents_s_with": aligned["latents_s"], "latents_s_without": without["latents_s"],
                "tflops": aligned["tflops"], "share_of_peak": aligned["share_of_peak"], **mem,
                "without": without, "with": aligned})
    return out


BLOCK_TARGET = 0.95  # issue 29: the 2025 block's training FLOP rate at least 95 % of today's, on a GPU


def block_presets(sizes: Sizes) -> dict[str, str]:
    """Today's block and the 2025 one (``models.BLOCK_2025`` as the "-2025" preset) of the
    stage's DiT, named as ``bench_train.py --block 2025`` names them."""
    return {"2022": sizes.block_model, "2025": f"{sizes.block_model}-2025"}


def built_block(net: torch.nn.Module) -> dict:
    """The block the built network really has (its config, its q/k norm modules counted), not the
    preset's name: a comparison of a block with itself must show here."""
    c = net.config
    qk = sum(1 for name, m in net.named_modules()
             if name.endswith(("q_norm", "k_norm")) and not isinstance(m, torch.nn.Identity))
    return {"pos": c.pos, "mlp": c.mlp, "norm": c.norm, "qk_norm_modules": qk}


def flop_rate(figures: dict, kinds: Iterable[str]) -> float:
    """Training FLOP/s over one step of each of ``kinds`` (both: the schedule's mix) from a block's
    kind figures: work over time of the steps together, not a mean of rates."""
    kinds = list(kinds)
    work = sum(figures[k]["train_flops_per_patch"] * figures[k]["batch"] for k in kinds)
    return work / sum(figures[k]["step_s"] for k in kinds)


def block_figures(suite: Suite, cfg: TrainConfig, trainer: Any, plans: dict[str, StepPlan],
                  times: dict[str, list[float]]) -> dict:
    """One block's figures: per step kind as the train_* stages, and its training FLOP rate on
    the {R/2: 0.5, R: 0.5} schedule (one full and one patch step: work over time of the pair),
    FLOPs as the issue defines them, 3 x ``forward_flops`` a patch."""
    out: dict[str, Any] = {"preset": cfg.model.preset, "block": built_block(trainer.net),
                           "params_m": round(sum(p.numel() for p in trainer.net.parameters()) / 1e6, 3)}
    for kind, plan in plans.items():
        out[kind] = kind_figures(suite, plan, times[kind], 3 * forward_flops(cfg.model, plan.size))
    flops = flop_rate(out, plans)
    out.update({"patches_s": round(sum(out[k]["batch"] for k in plans) / sum(out[k]["step_s"] for k in plans), 3),
                "train_gflop_s": round(flops / 1e9, 3), "tflops": round(flops / 1e12, 4),
                "share_of_peak": _round(suite.share(flops), 4)})
    return out


def stage_train_2025(suite: Suite) -> dict:
    """Today's DiT block against the 2025 block (RoPE, SwiGLU, RMSNorm, QK-norm) in the training
    step: each block's training FLOP rate (patches/s x 3 x forward FLOPs a patch) and
    ``block_flop_rate_ratio`` = 2025 / 2022 on the schedule's mix of full and patch steps (issue
    29's target: >= 0.95 on a GPU), per step kind too. Per FLOP, not per step: the blocks do
    different work (SwiGLU's 2/3-width MLP, the norms, the rotations).

    Unlike the REPA stage, both trainers live side by side and their steps interleave ABBA (the
    same kind of both, then the other kind), so that clocks, heat and load drift hit both alike;
    between steps a trainer holds weights, EMA and AdamW state only (its gradients are freed),
    about 11 GB for DiT-XL/2 (~13.5 GB with gradients alive), beside one step's activations. At
    half the suite's batch (64 for XL): one XL trainer peaked at 59.5 GiB at batch 128
    (reference/gpu.md), and a second one's state on top would come near an H100's 80 GB. Both
    read the same data."""
    s = suite.sizes
    fresh_accelerate()
    cfgs = {name: train_config(s, preset, False, batch=s.block_batch) for name, preset in block_presets(s).items()}
    acc = build_accelerator(cfgs["2022"], with_trackers=False)
    trainers = {name: make_trainer(suite, cfg, acc) for name, cfg in cfgs.items()}
    plans = step_plans(s.block_batch, s.latent)
    jobs = {(name, kind): (trainers[name], plan) for kind, plan in plans.items() for name in trainers}
    timed_steps(suite, jobs, s.warmup)
    suite.reset_memory()
    times = timed_steps(suite, jobs, s.train_rounds, s.train_block)
    blocks = {name: block_figures(suite, cfgs[name], trainers[name], plans, {k: times[name, k] for k in plans})
              for name in trainers}
    return compare_blocks(suite, blocks, plans)


def compare_blocks(suite: Suite, blocks: dict[str, dict], plans: dict[str, StepPlan]) -> dict:
    """The stage's line: ``bench_train.py --block 2025``'s figure names (params_m,
    train_gflops_per_patch, patches_s, train_gflop_s, block_flop_rate_ratio), per kind and at the
    top, with each block's own figures under ``blocks``."""
    s, old, new = suite.sizes, blocks["2022"], blocks["2025"]
    ratio = round(flop_rate(new, plans) / flop_rate(old, plans), 4)
    out: dict[str, Any] = {
        "model": s.block_model, "presets": block_presets(s), "block_2025": BLOCK_2025,
        "latent": [4, s.latent, s.latent], "batch": s.batch, "precision": s.precision,
        "timed_steps_per_kind": s.train_rounds * s.train_block,
        "params_m": {n: b["params_m"] for n, b in blocks.items()},
        "train_gflops_per_patch": {n: {str(b[k]["side"]): round(b[k]["train_flops_per_patch"] / 1e9, 4) for k in plans}
                                   for n, b in blocks.items()},
        "patches_s": {n: b["patches_s"] for n, b in blocks.items()},
        "train_gflop_s": {n: b["train_gflop_s"] for n, b in blocks.items()},
        "block_flop_rate_ratio": ratio, "target": BLOCK_TARGET,
        "meets_target": None if suite.device.type != "cuda" else ratio >= BLOCK_TARGET,
        "tflops": new["tflops"], "share_of_peak": new["share_of_peak"], **suite.memory(), "blocks": blocks,
    }
    for kind in plans:
        out[kind] = {"side": new[kind]["side"], "batch": new[kind]["batch"],
                     "step_s": {"2022": old[kind]["step_s"], "2025": new[kind]["step_s"]},
                     "block_flop_rate_ratio": round(flop_rate(new, [kind]) / flop_rate(old, [kind]), 4),
                     "tflops_2025": new[kind]["tflops"], "share_of_peak_2025": new[kind]["share_of_peak"]}
    return out


# --------------------------------------------------------------------------- sampling

class ForwardCount:
    """Records the batch of every network call (a forward pre-hook): the NFE the sampler made."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = net.register_forward_pre_hook(lambda _m, args: self.batches.append(int(args[0].shape[0])))


def build_sampler(suite: Suite, **extra: Any) -> tuple[ImageSampler, torch.nn.Module, ModelConfig]:
    """The job's sampler around a random-weight DiT and VAE: (sampler, bare network, its config)."""
    from diffusers import AutoencoderKL

    s, dev = suite.sizes, suite.device
    torch.manual_seed(0)
    mcfg = ModelConfig(preset=s.sample_model, latent_channels=4, latent_size=s.latent, num_classes=1000)
    net = build_model(mcfg).to(dev).eval().requires_grad_(False)
    codec = VAECodec(AutoencoderKL(**vae_kwargs(s)), "random-weight AutoencoderKL", dev, parse_dtype(vae_dtype(s), dev))
    sampler = ImageSampler(net, sigma_data=0.5, latent_channels=4, latent_size=s.latent, num_classes=1000,
                           sampler=SamplerConfig(steps=s.sample_steps, cfg_scale=1.5), decode=make_decoder(codec),
                           seed=0, device=dev, amp=s.amp, **extra)
    return sampler, net, mcfg


def time_generate(suite: Suite, sampler: ImageSampler) -> tuple[int, float]:
    """(images, seconds) of the job's batch loop over the timed batches, parts written to disk."""
    n, B = suite.sizes.sample_batch * suite.sizes.sample_batches, suite.sizes.sample_batch
    with tempfile.TemporaryDirectory(dir=suite.work) as out:
        return n, suite.timed(lambda: sampling.generate(sampler, out, n, B, progress=False))


def stage_sample(suite: Suite) -> dict:
    """Images/s of the sampling job's batch loop (noise -> sampler -> decode -> parts on disk)
    against the bare network forwards it cannot avoid (NFE x one forward at the batch it feeds)."""
    s, dev = suite.sizes, suite.device
    R, B = s.latent, s.sample_batch
    sampler, net, mcfg = build_sampler(suite)
    count = ForwardCount(net)
    with counting_redos() as redos:
        sampler.images(list(range(B)))  # warm-up: lazy init, allocator, kernel choice
        nfe, fwd_batch = len(count.batches), max(count.batches)
        count.handle.remove()
        suite.reset_memory()
        n, t_e2e = time_generate(suite, sampler)
        t_fwd = time_forwards(suite, net, mcfg, fwd_batch, nfe, s.amp)
        z = torch.randn(B, 4, R, R, device=dev)
        t_dec = suite.timed(lambda: sampler.decode(z))
    img_s = n / t_e2e
    suite.cache["sample_images_s"] = img_s
    bound = B / (nfe * t_fwd)
    flops = forward_flops(mcfg) * fwd_batch / t_fwd
    return {
        "model": s.sample_model, "latent": [4, R, R], "batch": B, "timed_images": n, "steps": s.sample_steps,
        "cfg_scale": sampler.sampler.cfg_scale, "nfe_per_batch": nfe, "forward_batch": fwd_batch, "amp": s.amp,
        "vae": f"{s.vae['block_out_channels']} x{s.vae['layers_per_block']}, random weights",
        "images_s": round(img_s, 3), "hours_50k": round(50_000 / img_s / 3600, 3),
        "forward_only_images_s": round(bound, 3), "share_of_forward_bound": round(img_s / bound, 3),
        "forward_s": round(t_fwd, 5), "decode_s_per_batch": round(t_dec, 4), "vae_fp32_redos": redos.count,
        "tflops": round(flops / 1e12, 4), "share_of_peak": _round(suite.share(flops), 4), **suite.memory(),
    }


def stage_sample_compiled(suite: Suite) -> dict:
    """The same loop with the network compiled (what sample.py does on a GPU by default): the
    first batch pays the compile and is reported apart."""
    if suite.quick:
        return {"skipped": "--quick: torch.compile takes over a minute on a CPU"}
    if "compile" not in inspect.signature(ImageSampler).parameters:
        return {"skipped": "this ImageSampler has no compile option"}
    sampler, _, _ = build_sampler(suite, compile=True)
    warm = suite.timed(lambda: sampler.images(list(range(suite.sizes.sample_batch))))
    n, secs = time_generate(suite, sampler)
    eager = suite.cache.get("sample_images_s")
    return {"model": suite.sizes.sample_model, "batch": suite.sizes.sample_batch, "steps": suite.sizes.sample_steps,
            "timed_images": n, "first_batch_s": round(warm, 2), "images_s": round(n / secs, 3),
            "hours_50k": round(50_000 / (n / secs) / 3600, 3),
            "vs_eager": round(n / secs / eager, 3) if eager else None, **suite.memory()}


def time_forwards(suite: Suite, net: torch.nn.Module, mcfg: ModelConfig, batch: int, nfe: int, amp: str) -> float:
    """Seconds of ONE bare forward at ``batch``, the mean over ``nfe`` back-to-back calls."""
    dev, R = suite.device, mcfg.latent_size
    x = torch.randn(batch, mcfg.latent_channels + 2, R, R, device=dev)
    c = torch.randn(batch, device=dev)
    labels = torch.randint(0, mcfg.num_classes, (batch,), device=dev)

    def forwards(k: int) -> None:
        for _ in range(k):
            net(x, c, labels)

    with torch.no_grad(), autocast(dev, amp):
        forwards(1)
        return suite.timed(lambda: forwards(nfe)) / nfe


# --------------------------------------------------------------------------- encoding

def encode_rate(suite: Suite, encode: Callable[[torch.Tensor], Any], x: torch.Tensor, calls: int) -> float:
    """Images/s of ``encode`` on the in-memory batch ``x``: one warm-up call (lazy init, kernel
    choice), then passes of ``calls`` back-to-back calls until at least 0.5 s is timed (a dry
    run's pass takes milliseconds)."""
    encode(x)
    passes, secs = 0, 0.0
    while passes == 0 or secs < 0.5:
        secs += suite.timed(lambda: [encode(x) for _ in range(calls)])
        passes += 1
    return passes * calls * len(x) / secs


def stage_encode(suite: Suite) -> dict:
    """Images/s of the encoding job (files -> decode workers -> VAE -> shards) against the VAE
    encoder alone on in-memory batches of the same size, dtype and count."""
    s, dev = suite.sizes, suite.device
    src, vae = jpegs(suite), vae_dir(suite)
    n = s.encode_images
    dtype = vae_dtype(s)
    runs = []
    with counting_redos() as redos:
        for i in range(2):  # the first run pays one-off costs (worker start, kernel choice)
            cfg = EncodeConfig(source=str(src), out=str(suite.work / f"encode{i}"), vae=str(vae),
                               resolution=s.vae_res, flips="none", batch_size=s.encode_batch, dtype=dtype,
                               device=str(dev), progress=False)
            t = time.perf_counter()
            with contextlib.redirect_stdout(suite.log):  # the job's own progress lines: log only
                done = run_encode(cfg)
            runs.append((done["images"], done["seconds"], time.perf_counter() - t))
        images, loop_s, total_s = runs[-1]
        codec = VAECodec.load(str(vae), dev, dtype)
        x = torch.rand(s.encode_batch, 3, s.vae_res, s.vae_res, device=dev) * 2 - 1
        vae_img_s = encode_rate(suite, codec.encode, x, math.ceil(n / s.encode_batch))
    if images != n:
        raise RuntimeError(f"the encode job encoded {images} of {n} images")
    per_image = vae_encode_flops(s)
    flops = per_image * vae_img_s
    pipe = images / loop_s
    suite.cache["encode_job_img_s"] = pipe  # the encode_repr stage's job is held against it
    return {
        "images": n, "resolution": s.vae_res, "batch": s.encode_batch, "dtype": str(codec.dtype).replace("torch.", ""),
        "vae": f"{s.vae['block_out_channels']} x{s.vae['layers_per_block']}, random weights",
        "pipeline_img_s": round(pipe, 2), "pipeline_total_img_s": round(images / total_s, 2),
        "first_run_img_s": round(runs[0][0] / runs[0][1], 2), "vae_img_s": round(vae_img_s, 2),
        "ratio": round(pipe / vae_img_s, 3), "vae_gflops_per_image": round(per_image / 1e9, 2),
        "tflops": round(flops / 1e12, 4), "share_of_peak": _round(suite.share(flops), 4),
        "vae_fp32_redos": redos.count,
    }


def repr_encoder(suite: Suite) -> tuple[ReprEncoder, Path]:
    """The representation encoder (DINOv2-B/14 at 224 px on a GPU, a small ViT of the same timm
    class dry) with random weights, in the VAE's dtype, as ``ReprEncoder`` wraps a loaded one;
    and the folder it is saved in (``represent.save_folder``), which ``--repr`` reads. Random
    weights cost what trained ones cost, and nothing is downloaded (the GPU machine has no network)."""
    s = suite.sizes
    torch.manual_seed(0)
    model = timm.create_model(s.repr_arch, pretrained=False, num_classes=0, **s.repr_args)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]  # DINOv2's: ImageNet's
    size = int(s.repr_args["img_size"])
    folder = save_folder(model, suite.work / "repr_encoder", s.repr_args, size, mean, std,
                         source="random weights (gpu_suite)")  # before ReprEncoder moves it to the device
    cfg = {"architecture": s.repr_arch, "image_size": size, "mean": list(mean), "std": list(std),
           "source": "random weights (gpu_suite)"}
    enc = ReprEncoder(model, f"random-weight {s.repr_arch}", cfg, suite.device, parse_dtype(vae_dtype(s), suite.device))
    return enc, folder


def stage_encode_repr(suite: Suite) -> dict:
    """Images/s of the representation encoder (``ReprEncoder.encode``: resize to its input,
    forward, the normed patch-token grid in float16) beside the VAE encoder's, on the same
    in-memory batches of the encode stage's size, side and dtype (issue 28: the feature grids
    are computed once, at encoding, so their cost is the encoding job's); then, if the budget
    still allows, the encoding job itself with ``--repr`` (``run_encode``, on the encode stage's
    JPEGs) against the same job without it (the encode stage's figure, when it ran)."""
    s, dev = suite.sizes, suite.device
    dtype = vae_dtype(s)
    enc, folder = repr_encoder(suite)
    x = torch.rand(s.encode_batch, 3, s.vae_res, s.vae_res, device=dev) * 2 - 1
    calls = math.ceil(s.encode_images / s.encode_batch)
    with counting_redos() as redos:
        codec = VAECodec.load(str(vae_dir(suite)), dev, dtype)
        vae_img_s = encode_rate(suite, codec.encode, x, calls)
        repr_img_s = encode_rate(suite, enc.encode, x, calls)
    grid, dim = list(enc.grid), enc.dim
    repr_flops, vae_flops = enc.forward_flops_per_image(), vae_encode_flops(s)
    del enc, codec, x
    free_memory()  # the job loads its own encoder and VAE
    out: dict[str, Any] = {
        "encoder": s.repr_arch, "encoder_input": s.repr_args["img_size"], "grid": grid, "dim": dim,
        "resolution": s.vae_res, "batch": s.encode_batch, "dtype": str(parse_dtype(dtype, dev)).replace("torch.", ""),
        "repr_img_s": round(repr_img_s, 2), "vae_img_s": round(vae_img_s, 2), "ratio": round(repr_img_s / vae_img_s, 3),
        "repr_gflops_per_image": round(repr_flops / 1e9, 3), "vae_gflops_per_image": round(vae_flops / 1e9, 3),
        "repr_tflops": round(repr_flops * repr_img_s / 1e12, 4),
        "repr_share_of_peak": _round(suite.share(repr_flops * repr_img_s), 4),
        "vae_tflops": round(vae_flops * vae_img_s / 1e12, 4),
        # the VAE and the encoder one after the other on each batch, as the job runs them
        "vae_plus_repr_img_s": round(1 / (1 / vae_img_s + 1 / repr_img_s), 2),
    }
    left = s.budget_s - suite.elapsed()
    if left < s.repr_job_estimate_s:
        out["job"] = {"skipped": f"time budget: {left:.0f} s left, the job needs about {s.repr_job_estimate_s:.0f} s"}
    else:
        cfg = EncodeConfig(source=str(jpegs(suite)), out=str(suite.work / "encode_repr"), vae=str(vae_dir(suite)),
                           resolution=s.vae_res, flips="none", batch_size=s.encode_batch, dtype=dtype,
                           device=str(dev), progress=False, repr=str(folder))
        with counting_redos() as job_redos, contextlib.redirect_stdout(suite.log):
            done = run_encode(cfg)
        if done["images"] != s.encode_images:
            raise RuntimeError(f"the encode job with --repr encoded {done['images']} of {s.encode_images} images")
        entry = json.loads((Path(cfg.out) / "manifest.json").read_text())["repr"]
        if entry["grid"] != grid or int(entry["dims"]) != dim:
            raise RuntimeError(f"the job stored {entry['grid']} x {entry['dims']} grids, not {grid} x {dim}")
        job_img_s = done["images"] / done["seconds"]
        plain = suite.cache.get("encode_job_img_s")
        out["job"] = {"images": done["images"], "img_s": round(job_img_s, 2), "repr_seconds": entry["seconds"],
                      "repr_share_of_job": round(entry["seconds"] / done["seconds"], 3),
                      "plain_job_img_s": _round(plain, 2),
                      "ratio_to_plain_job": round(job_img_s / plain, 3) if plain else None,
                      "vae_fp32_redos": job_redos.count}
    out["vae_fp32_redos"] = redos.count
    return out


# --------------------------------------------------------------------------- the three CLIs

def cli(suite: Suite, script: str, *args: str) -> float:
    """Run one of the project's CLIs as the user would; its output goes to the log. Seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(ROOT / script), *args]
    suite.say(f"  $ {' '.join(cmd[1:])}")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=suite.work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=max(30.0, suite.sizes.budget_s - suite.elapsed()))
    secs = time.perf_counter() - t
    suite.log.write(proc.stdout)
    suite.log.flush()
    if proc.returncode != 0:
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        raise RuntimeError(f"{script} exited {proc.returncode}: {tail[-400:]}")
    suite.cache["last_output"] = proc.stdout
    return secs


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def resumed_step(output: str) -> int | None:
    """The step train_latent.py says it resumed from ("resumed from .../step-... (step N)"), if any."""
    found = re.search(r"resumed from .*\(step (\d+)\)", output)
    return int(found.group(1)) if found else None


def stage_pipeline(suite: Suite) -> dict:
    """encode -> train -> train --resume auto -> sample through the CLIs, seconds per step, and a
    check that the second training run continued from the first one's checkpoint. Uncompiled (two
    compiles would cost minutes of the GPU's time; the compiled stages measure that path), and the
    dry run passes the very flags the GPU run does, so a flag the CLIs refuse fails here first."""
    s, w = suite.sizes, suite.work
    src, vae = jpegs(suite), vae_dir(suite)
    shards, run, out = w / "pipe_shards", w / "pipe_run", w / "pipe_samples"
    secs = {"encode_s": cli(suite, "encode_latents.py", "--source", str(src), "--out", str(shards), "--vae", str(vae),
                            "--resolution", str(s.vae_res), "--flips", "none", "--no-progress",
                            "--dtype", vae_dtype(s) or "fp32")}
    latent = s.vae_res // 2 ** (len(s.vae["block_out_channels"]) - 1)
    base = ["--config", str(ROOT / s.pipe_config), f"data.shards={shards}", f"model.latent_size={latent}",
            f"model.num_classes={s.classes}", f"run.out_dir={run}", "run.tensorboard=false", "run.compile=false",
            "eval.preview_every_patches=0", f"run.log_every_patches={s.pipe_patches // 4}", *s.pipe_overrides]
    secs["train_s"] = cli(suite, "train_latent.py", *base, f"run.total_patches={s.pipe_patches}",
                          f"run.ckpt_every_patches={s.pipe_patches}")
    first = checkpoint_steps(run)
    secs["train_resume_s"] = cli(suite, "train_latent.py", "--resume", "auto", *base,
                                 f"run.total_patches={2 * s.pipe_patches}", f"run.ckpt_every_patches={s.pipe_patches}")
    resumed = resumed_step(suite.cache["last_output"])
    final = checkpoint_steps(run)
    if not (first and resumed == first[-1] > 0 and final and final[-1] > resumed):
        raise RuntimeError(f"the resumed run did not continue: checkpoints {first} after the first run, {final} "
                           f"after the second, which logged resuming from step {resumed}")
    secs["sample_s"] = cli(suite, "sample.py", "--checkpoint", str(run), "--out", str(out),
                           "--num-samples", str(s.pipe_samples), "--steps", str(s.pipe_sample_steps),
                           "--batch-size", str(s.pipe_samples), "--vae", str(vae), "--cfg-scale", "1.5",
                           "--no-progress", "--amp", s.amp, "--decode-dtype", vae_dtype(s) or "fp32",
                           "--compile", "false")
    with np.load(out / "samples.npz") as f:
        made = int(f["arr_0"].shape[0])
    if made != s.pipe_samples:
        raise RuntimeError(f"sample.py wrote {made} samples, not {s.pipe_samples}")
    return {"images": s.encode_images, "resolution": s.vae_res, "latent": [4, latent, latent],
            "config": s.pipe_config, "patches_first_run": s.pipe_patches, "patches_total": 2 * s.pipe_patches,
            "first_run_step": first[-1], "resumed_from_step": resumed, "final_step": final[-1],
            "resume_continued": True, "samples": made, **{k: round(v, 2) for k, v in secs.items()},
            "total_s": round(sum(secs.values()), 2)}


# --------------------------------------------------------------------------- running and reporting

# Tests that only run on CUDA (they skip on the CPU): fp16 loss scaling across a resume, the GPU
# configs' bf16/compile defaults. The dry run runs the same command, where they skip.
CUDA_TESTS = ["tests/test_precision.py", "tests/test_devices.py"]


def stage_cuda_tests(suite: Suite) -> dict:
    """The test suite's CUDA-only tests, on this GPU: pass/skip counts (a failure is the stage's error)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-rs", "-k", "cuda", *CUDA_TESTS],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=max(30.0, suite.sizes.budget_s - suite.elapsed()))
    suite.log.write(proc.stdout)
    suite.log.flush()
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"CUDA tests failed: {last[-300:]}")
    return {"result": last, "seconds": round(time.perf_counter() - t, 1)}


def all_stages(sizes: Sizes) -> list[Stage]:
    """In the order they run: cheap, always-wanted figures first, compiles (slow, riskier) last,
    the optional ones (run only while the budget lasts) at the very end: REPA's two (issue 28,
    about a minute together on a GPU), then the 2025 block's (issue 29, about a minute), before
    the compiled sampling and DiT-XL/2 compile (2 and 4 minutes), so that a GPU run that cannot
    fit them all still measures the issues' targets."""
    stages = [Stage("peak", stage_peak)]
    stages += [Stage(f"train_{tag(m)}_eager", train_stage(m, False)) for m in sizes.train_models]
    stages += [Stage("sample", stage_sample), Stage("encode", stage_encode), Stage("pipeline", stage_pipeline),
               Stage("cuda_tests", stage_cuda_tests)]
    compiled = [Stage(f"train_{tag(m)}_compiled", train_stage(m, True), 240 if m in sizes.optional_compiled
                      else 150, optional=m in sizes.optional_compiled) for m in sizes.train_models]
    required = [st for st in compiled if not st.optional]
    repa = [Stage(f"train_{tag(sizes.repa_model)}_repa", stage_train_repa, sizes.repa_estimate_s, optional=True),
            Stage("encode_repr", stage_encode_repr, sizes.repr_estimate_s, optional=True),
            Stage(f"train_{tag(sizes.block_model)}_2025", stage_train_2025, sizes.block_estimate_s, optional=True)]
    sample = Stage("sample_compiled", stage_sample_compiled, sizes.sample_compile_estimate_s, optional=True)
    return stages + required + repa + [sample] + [st for st in compiled if st.optional]


def select(stages: list[Stage], only: str | None) -> list[Stage]:
    """``--only`` names stages or prefixes of them ("train" = every train_*); peak joins any
    selection that has a stage to hold against it. An unknown name is an error listing the known."""
    if not only:
        return stages
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    for w in wanted:
        if not any(st.name == w or st.name.startswith(w + "_") for st in stages):
            raise SystemExit(f"--only {w}: no such stage (known: {', '.join(st.name for st in stages)})")
    keep = [st for st in stages if any(st.name == w or st.name.startswith(w + "_") for w in wanted)]
    if keep and keep[0].name != "peak":
        keep.insert(0, stages[0])
    return keep


def run_stage(suite: Suite, stage: Stage) -> dict:
    """Run one stage within the budget; an exception becomes its line's "error", never the suite's end."""
    left = suite.sizes.budget_s - suite.elapsed()
    if stage.optional and left < stage.estimate_s:
        suite.say(f"stage {stage.name}: skipped ({left:.0f} s of the budget left)")
        return {"skipped": f"time budget: {left:.0f} s left, the stage needs about {stage.estimate_s:.0f} s"}
    suite.say(f"stage {stage.name}: running ({left:.0f} s of the budget left)")
    t = time.perf_counter()
    try:
        with deadline(max(left, 20.0)):
            result = stage.run(suite)
    except Exception as err:  # noqa: BLE001 - a stage's failure is reported, the suite goes on
        suite.log.write(traceback.format_exc())
        result = {"error": f"{type(err).__name__}: {err}"[:600]}
    finally:
        free_memory()
    result["wall_s"] = round(time.perf_counter() - t, 2)
    return result


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def table_rows(name: str, r: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(stage, what, rate, TFLOP/s, share of peak, wall s) rows of one stage's result."""
    def fmt(x: Any, spec: str = ".3g") -> str:
        return "-" if x is None else format(x, spec)

    status = "ERROR" if "error" in r else "skipped" if "skipped" in r else ""
    wall = fmt(r.get("wall_s"), ".1f")
    if status:
        return [(name, f"{status}: {r.get('error') or r.get('skipped')}"[:70], "-", "-", "-", wall)]
    if name == "peak":
        return [(name, f"matmul {r['n']}^3 {r['dtype']}", "-", fmt(r["tflops"]), "1", wall)]
    if name.startswith("train_") and name.endswith("_repa"):
        rows = [(name if kind == "full" else "",
                 f"{kind} side {r[kind]['side']} batch {r[kind]['batch']}: REPA {r[kind]['repa_overhead']:+.1%} "
                 f"(projector {r[kind]['projector_flops_share']:.1%} of FLOPs)",
                 f"{r[kind]['step_s_with']:.4g} / {r[kind]['step_s_without']:.4g} s", fmt(r[kind]["tflops_with"]),
                 fmt(r[kind]["share_of_peak_with"]), wall if kind == "full" else "") for kind in ("full", "patch")]
        verdict = {True: "met", False: "MISSED", None: "GPU only"}[r["meets_target"]]
        return rows + [("", f"overhead {r['repa_overhead']:+.1%}, target <= {r['target']:.0%}: {verdict}",
                        "with / without", "-", "-", "")]
    if name.startswith("train_") and name.endswith("_2025"):
        rows = [(name if kind == "full" else "",
                 f"{kind} side {r[kind]['side']} batch {r[kind]['batch']}: 2025 block's FLOP rate "
                 f"x{r[kind]['block_flop_rate_ratio']:.3f}", f"{r[kind]['step_s']['2025']:.4g} / "
                 f"{r[kind]['step_s']['2022']:.4g} s", fmt(r[kind]["tflops_2025"]), fmt(r[kind]["share_of_peak_2025"]),
                 wall if kind == "full" else "") for kind in ("full", "patch")]
        verdict = {True: "met", False: "MISSED", None: "GPU only"}[r["meets_target"]]
        return rows + [("", f"FLOP-rate ratio {r['block_flop_rate_ratio']:.3f} (schedule mix), target >= "
                            f"{r['target']:.2f}: {verdict}", "2025 / 2022", "-", "-", "")]
    if name.startswith("train_"):
        return [(name if kind == "full" else "", f"{kind} side {r[kind]['side']} batch {r[kind]['batch']}",
                 f"{r[kind]['samples_s']:.4g} {'latents' if kind == 'full' else 'patches'}/s",
                 fmt(r[kind]["tflops"]), fmt(r[kind]["share_of_peak"]), wall if kind == "full" else "")
                for kind in ("full", "patch")]
    if name == "sample_compiled":
        return [(name, f"e2e, compiled ({r['hours_50k']:.3g} h per 50k; first batch {r['first_batch_s']:.3g} s)",
                 f"{r['images_s']:.4g} img/s", "-", "-", wall)]
    if name == "sample":
        return [(name, f"e2e ({r['hours_50k']:.3g} h per 50k)", f"{r['images_s']:.4g} img/s", "-", "-", wall),
                ("", "network forwards only", f"{r['forward_only_images_s']:.4g} img/s", fmt(r["tflops"]),
                 fmt(r["share_of_peak"]), "")]
    if name == "encode":
        return [(name, f"pipeline (ratio to VAE {r['ratio']:.3g})", f"{r['pipeline_img_s']:.4g} img/s", "-", "-", wall),
                ("", "VAE encoder alone", f"{r['vae_img_s']:.4g} img/s", fmt(r["tflops"]), fmt(r["share_of_peak"]), "")]
    if name == "encode_repr":
        rows = [(name, f"{r['encoder']} {r['encoder_input']} px, grid {r['grid'][0]}x{r['grid'][1]}x{r['dim']} "
                       f"(ratio to VAE {r['ratio']:.3g})", f"{r['repr_img_s']:.4g} img/s", fmt(r["repr_tflops"]),
                 fmt(r["repr_share_of_peak"]), wall),
                ("", f"VAE encoder alone, batch {r['batch']} {r['dtype']}", f"{r['vae_img_s']:.4g} img/s",
                 fmt(r["vae_tflops"]), "-", "")]
        job = r["job"]
        if "skipped" in job:
            return rows + [("", f"job with --repr skipped: {job['skipped']}"[:70], "-", "-", "-", "")]
        plain = "-" if job["ratio_to_plain_job"] is None else f"{job['ratio_to_plain_job']:.3g}"
        return rows + [("", f"encode job with --repr (ratio to the plain job {plain})", f"{job['img_s']:.4g} img/s",
                        "-", "-", "")]
    if name == "pipeline":
        steps = (f"encode {r['encode_s']:.0f} s, train {r['train_s']:.0f} s, resume {r['train_resume_s']:.0f} s, "
                 f"sample {r['sample_s']:.0f} s")
        return [(name, steps, f"resumed at step {r['resumed_from_step']}", "-", "-", wall)]
    return [(name, "", "", "", "", wall)]


def print_table(suite: Suite, results: dict[str, dict]) -> None:
    head = ("stage", "what", "rate", "TFLOP/s", "of peak", "wall s")
    rows = [head]
    for name, r in results.items():
        try:
            rows += table_rows(name, r)
        except (KeyError, TypeError, ValueError):  # the table must never cost the summary line
            rows.append((name, "(see its JSON line)", "-", "-", "-", str(r.get("wall_s", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        suite.say(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            suite.say("-+-".join("-" * w for w in widths))


def emit(suite: Suite, obj: dict) -> None:
    """One JSON object on its own line, on stdout and in the log."""
    line = json.dumps(obj)
    print(line, flush=True)
    suite.log.write(line + "\n")
    suite.log.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU: every stage, < 5 min on 2 cores")
    p.add_argument("--quick", action="store_true",
                   help="--dry with the compiled stages skipped (torch.compile takes over a minute on a CPU): < 60 s")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "gpu_suite"), help="folder for the log and summary.json")
    p.add_argument("--only", default=None, help="comma-separated stages or prefixes, e.g. train,sample")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole suite from process start (default 420 on a GPU, 270 dry)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (JPEGs, shards, runs)")
    args = p.parse_args(argv)
    args.dry = args.dry or args.quick
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    sizes = DRY if dry else GPU
    if args.budget_s:
        sizes = dataclasses.replace(sizes, budget_s=args.budget_s)
    stages = select(all_stages(sizes), args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    device = torch.device("cpu" if dry else "cuda")
    with open(out / "gpu_suite.log", "w") as log:
        suite = Suite(sizes=sizes, device=device, work=work, log=log, dry=dry, quick=args.quick)
        suite.say(f"{'dry run (tiny sizes)' if suite.dry else 'full sizes'} on {device_name(device)}, torch "
                  f"{torch.__version__}; stages: {', '.join(st.name for st in stages)}; work in {work}")
        results: dict[str, dict] = {}
        try:
            for stage in stages:
                results[stage.name] = run_stage(suite, stage)
                emit(suite, {"stage": stage.name, **results[stage.name]})
        finally:
            if not args.keep_work:
                shutil.rmtree(work, ignore_errors=True)
        print_table(suite, results)
        failed = [n for n, r in results.items() if "error" in r]
        summary = {"suite": "gpu_suite", "mode": "dry" if suite.dry else "gpu", "device": device_name(device),
                   "torch": torch.__version__, "ok": not failed, "failed": failed,
                   "skipped": [n for n, r in results.items() if "skipped" in r],
                   "wall_s": round(suite.elapsed(), 1), "budget_s": sizes.budget_s,
                   "log": str(out / "gpu_suite.log"), "stages": results}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        emit(suite, summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
