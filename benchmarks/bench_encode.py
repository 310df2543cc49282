"""Encoding pipeline throughput vs the bound set by its two parts measured alone.

Whole pipeline: JPEG files on disk -> shards, through the real job code (encode.run_encode),
timed over its encoding loop (``pipeline_img_s``, the per-image rate) and over the whole call
including one-off set-up and the manifest (``pipeline_total_img_s``).
Parts, measured in the same run on the same machine: the bare VAE encoder on in-memory tensors
(same VAE, same batch size, all cores) and the bare decode + ADM crop (one process, the way a
decoding stage runs). On a CPU both parts share the cores, so the bound is
1 / (t_vae + t_decode) per image; ratio = pipeline / bound (target >= 0.9).

Other users' load drifts, so the benchmark makes many short repeats, each timing the parts on
half the images just before the pipeline run and half just after it; the JSON reports the repeat
with the median ratio (the lower one for an even count), all repeats' ratios, and the
best-of-each ratio for comparison.
The LAST stdout line is one JSON object.

    python benchmarks/bench_encode.py --quick          # tiny VAE, 20-45 s on 2 shared cores
    python benchmarks/bench_encode.py --sd-vae --quick # SD-VAE architecture, random weights
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as encode_latents.py: sleep, don't spin

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latent_patch.codec import VAECodec  # noqa: E402
from latent_patch.config import EncodeConfig  # noqa: E402
from latent_patch.encode import choose_parallelism, run_encode  # noqa: E402
from latent_patch.images import load_image  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
QUICK_BUDGET_S = 30.0  # after imports; the acceptance run allows 55 s in all
TINY_VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)


def make_jpegs(root: Path, n: int, seed: int = 0) -> list[Path]:
    """ImageNet-like JPEGs (350-500 x 300-450, q90, smooth content + grain) in 2 class folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(350, 500)), int(rng.integers(300, 450))
        small = Image.fromarray((rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255).astype(np.uint8))
        a = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
        a = np.clip(a + rng.integers(-12, 12, a.shape), 0, 255).astype(np.uint8)
        p = root / f"c{i % 2}" / f"img_{i:05d}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p, "JPEG", quality=90)
        paths.append(p)
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


def time_vae(codec: VAECodec, n: int, res: int, batch: int, threads: int) -> float:
    """Seconds for the bare encoder over n images of in-memory tensors, in batches."""
    torch.set_num_threads(threads)
    x = torch.rand(batch, 3, res, res) * 2 - 1
    codec.encode(x[:2])  # warm-up (allocator, kernels)
    t = time.perf_counter()
    for start in range(0, n, batch):
        codec.encode(x[: min(batch, n - start)])
    return time.perf_counter() - t


def time_decode(paths: list[Path], res: int) -> float:
    """Seconds to read, decode and ADM-crop every file in one process."""
    t = time.perf_counter()
    for p in paths:
        load_image(p.read_bytes(), res)
    return time.perf_counter() - t


def measure_repeat(codec: VAECodec, paths: list[Path], cfg: EncodeConfig,
                   threads: int) -> tuple[float, float, float, float]:
    """(t_vae, t_decode, t_pipeline_loop, t_pipeline_total) for all images; each part is timed on
    half the images just before the pipeline run and half just after, so drifting load from
    other users hits all of them alike."""
    n, h = len(paths), len(paths) // 2
    res, batch = cfg.resolution, cfg.batch_size
    t_vae = time_vae(codec, h, res, batch, threads)
    t_dec = time_decode(paths[:h], res)
    t_loop, t_total = time_pipeline(cfg)
    t_vae += time_vae(codec, n - h, res, batch, threads)
    t_dec += time_decode(paths[h:], res)
    return t_vae, t_dec, t_loop, t_total


def time_pipeline(cfg: EncodeConfig) -> tuple[float, float]:
    """(seconds of the job's encoding loop, seconds of the whole job).

    The loop is files -> decode workers -> VAE -> tars -> sidecars, start to last commit (what
    runs per image); the whole job adds the one-off set-up (listing, VAE load, job.json) and the
    manifest, which a real-size job amortises but a few hundred images do not.
    """
    t = time.perf_counter()
    done = run_encode(cfg)
    return done["seconds"], time.perf_counter() - t


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (< 60 s on 2 cores)")
    p.add_argument("--sd-vae", action="store_true", help="SD-VAE architecture at a small count")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="override the job's choice")
    p.add_argument("--threads", type=int, default=None, help="override the job's choice")
    return p.parse_args()


def main() -> None:
    start = time.perf_counter()
    args = parse_args()
    if args.sd_vae:
        n, res, batch, reps = (24, 64, 8, 2) if args.quick else (64, 128, 8, 3)
    else:
        n, res, batch, reps = (192, 64, 32, 8) if args.quick else (1024, 64, 32, 8)
    n, res = args.images or n, args.resolution or res
    batch, reps = args.batch_size or batch, args.repeats or reps
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        paths = make_jpegs(tmp_p / "src", n)
        vae_name, params = make_vae(tmp_p / "vae", args.sd_vae)
        codec = VAECodec.load(str(tmp_p / "vae"), device="cpu")
        cfg = EncodeConfig(source=str(tmp_p / "src"), out="", vae=str(tmp_p / "vae"),
                           resolution=res, flips="none", shard_size=EncodeConfig.shard_size,
                           batch_size=batch,
                           workers=args.workers, threads=args.threads, device="cpu",
                           progress=False)
        workers, threads = choose_parallelism(cfg, torch.device("cpu"))
        all_cores = max(threads, len(os.sched_getaffinity(0)))
        rows = []  # (t_vae, t_decode, t_pipeline_loop, t_pipeline_total) per repeat
        for r in range(reps):
            if args.quick and r >= 3 and time.perf_counter() - start > QUICK_BUDGET_S:
                break  # a loaded machine: keep --quick within its minute
            cfg.out = str(tmp_p / f"out{r}")
            rows.append(measure_repeat(codec, paths, cfg, all_cores))
            v, d, p, _ = rows[-1]
            print(f"repeat {r}: vae {n / v:.1f} img/s, decode {n / d:.1f} img/s, pipeline "
                  f"{n / p:.1f} img/s, ratio {(v + d) / p:.3f}", file=sys.stderr, flush=True)
    ratios = [(v + d) / p for v, d, p, _ in rows]
    v, d, p, tot = rows[sorted(range(len(rows)), key=ratios.__getitem__)[(len(rows) - 1) // 2]]
    best = (min(r[0] for r in rows) + min(r[1] for r in rows)) / min(r[2] for r in rows)
    print(json.dumps({
        "pipeline_img_s": round(n / p, 2), "vae_img_s": round(n / v, 2),
        "decode_img_s": round(n / d, 2), "bound_img_s": round(n / (v + d), 2),
        "ratio": round((v + d) / p, 3), "vae": vae_name, "params": params,
        "pipeline_total_img_s": round(n / tot, 2), "ratio_total": round((v + d) / tot, 3),
        "ratios_all_repeats": [round(x, 3) for x in ratios], "ratio_best_of_each": round(best, 3),
        "images": n, "resolution": res, "batch_size": batch, "repeats": len(rows),
        "workers": workers, "threads": threads, "vae_threads": all_cores,
        "cpus": len(os.sched_getaffinity(0)), "source": "JPEG q90, 350-500 x 300-450 px",
    }))


if __name__ == "__main__":
    main()
