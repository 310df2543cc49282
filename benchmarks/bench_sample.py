"""End-to-end sampling throughput vs the bound set by the network and the VAE alone.

e2e: the real sampling job's batch loop (``sampling.generate``: per-sample generators, EDM
sampler with guidance, VAE decode to uint8, parts written by the background writer into a
temporary OUT; WRITING INCLUDED, the final assembly into samples.npz / PNGs EXCLUDED), timed
after one warm-up batch. bound: NFE x (one bare network forward at the batch the sampler
actually feeds it: 2B when guidance is on) + one VAE decode of B, both measured in the same
run, so ``ratio = e2e / bound`` is the share of time spent in the two unavoidable parts.

Also prints a FLOP-based estimate of 50k samples of DiT-XL/2 and of the authors' ADM U-Net on
one H100 (forward FLOPs counted by torch's FlopCounterMode on meta tensors; the assumptions are
printed with the numbers). Last line: one JSON object.

    python benchmarks/bench_sample.py --quick        # < 60 s on a 2-core CPU
    python benchmarks/bench_sample.py --model DiT-B/2 --latent-size 32 --batch-size 64 --steps 18
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latent_patch import dist, edm, sampling  # noqa: E402
from latent_patch.codec import VAECodec, make_decoder  # noqa: E402
from latent_patch.edm import SamplerConfig  # noqa: E402
from latent_patch.models import ModelConfig, build_model, forward_flops  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense BF16 tensor-core peak (no sparsity)
ASSUMED_MFU = 0.40  # sustained share of peak for inference forwards at large batch (assumption)
SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)


class CountingNet(torch.nn.Module):
    """Counts forwards and their batch sizes, so the bound uses the NFE the sampler really made."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.batches: list[int] = []

    def forward(self, x, c_noise, labels):
        self.batches.append(x.shape[0])
        return self.net(x, c_noise, labels)


def small_vae(latent_channels: int, levels: int, width: int) -> torch.nn.Module:
    """A random-weight AutoencoderKL of the SD layout but narrower: decode cost, not quality, matters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=(width,) * levels, layers_per_block=1, norm_num_groups=min(32, width))


def bound_inputs(B: int, fwd_batch: int, mcfg: ModelConfig, device: torch.device):
    C, R = mcfg.latent_channels, mcfg.latent_size
    x = torch.randn(fwd_batch, C + 2, R, R, device=device)
    c = torch.randn(fwd_batch, device=device)
    labels = torch.randint(0, mcfg.num_classes, (fwd_batch,), device=device)
    return (x, c, labels), torch.randn(B, C, R, R, device=device)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run(sampler, counting, net, decode, B: int, fwd_batch: int, mcfg: ModelConfig, device: torch.device,
        repeats: int) -> dict:
    """Interleave ``repeats`` rounds of (one e2e batch through ``sampling.generate`` into a fresh
    OUT, then the bound's parts: NFE bare forwards + one decode) and compare medians, so load
    spikes on a shared machine hit both sides alike instead of skewing one of them."""
    net_args, z = bound_inputs(B, fwd_batch, mcfg, device)
    with torch.no_grad():  # warm-up of every path (lazy init, allocator, kernel selection)
        sampler.images(list(range(B)))
        net(*net_args)
        decode(z)
    e2e_s, fwd_s, dec_s, nfes = [], [], [], []
    for _ in range(repeats):
        counting.batches.clear()
        with tempfile.TemporaryDirectory() as out:
            e2e_s.append(timed(lambda: sampling.generate(sampler, out, B, B, progress=False), device))
        nfes.append(len(counting.batches))
        with torch.no_grad():
            fwd_s.append(timed(lambda: [net(*net_args) for _ in range(nfes[-1])], device) / nfes[-1])
            dec_s.append(timed(lambda: decode(z), device))
    nfe = nfes[0]
    t_e2e, t_fwd, t_dec = (statistics.median(v) for v in (e2e_s, fwd_s, dec_s))
    return {"e2e_img_s": B / t_e2e, "bound_img_s": B / (nfe * t_fwd + t_dec), "nfe_per_batch": nfe,
            "forward_batches": sorted(set(counting.batches)), "t_batch_e2e_s": [round(v, 4) for v in e2e_s],
            "t_forward_s": round(t_fwd, 5), "t_decode_s": round(t_dec, 5)}


# --------------------------------------------------------------------------- FLOP estimate

def vae_decode_flops(latent_size: int = 32) -> float:
    """FLOPs of one SD-VAE decode (the sd-vae-ft-ema architecture) at batch 1."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, **SD_VAE)
        z = torch.empty(1, 4, latent_size, latent_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(z)
    return float(counter.get_total_flops())


def h100_estimates(n: int = 50_000) -> dict:
    """Hours for n samples on one H100 at ASSUMED_MFU of dense BF16 peak, guidance on every step."""
    eff = H100_BF16_DENSE_TFLOPS * 1e12 * ASSUMED_MFU
    dec = vae_decode_flops()
    out = {"h100_assumptions": f"{H100_BF16_DENSE_TFLOPS:g} TFLOP/s dense bf16 x MFU {ASSUMED_MFU:g}; CFG doubles "
                               f"every forward; FLOPs = 2 x MACs from FlopCounterMode; +1 SD-VAE decode per image",
           "sd_vae_decode_gflops": round(dec / 1e9, 1)}
    for key, preset in (("dit_xl2", "DiT-XL/2"), ("adm_unet", "adm-imagenet256")):
        fwd = forward_flops(ModelConfig(preset=preset))
        out[f"{key}_fwd_gflops"] = round(fwd / 1e9, 1)
        for label, nfe in (("heun18", 35), ("authors256", 511)):
            total = n * (nfe * 2 * fwd + dec)
            out[f"{key}_{label}_cfg_50k_h100_hours"] = round(total / eff / 3600, 3)
    return out


# --------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings that finish in < 60 s on a 2-core CPU")
    p.add_argument("--model", default=None, help="model preset (default DiT-S/2; quick: DiT-T/2)")
    p.add_argument("--latent-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed batches (median taken)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU: shared cores)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--vae", default=None, help="VAE spec (e.g. a local SD-VAE folder); default a small random one")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-based H100 estimate")
    args = p.parse_args(argv)

    quick = args.quick
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.model or ("DiT-T/2" if quick else "DiT-S/2")
    R = args.latent_size or (16 if quick else 32)
    B = args.batch_size or (16 if quick else 64)
    steps = args.steps or (6 if quick else 18)
    repeats = args.repeats or (5 if quick else 7)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)  # oversubscribed OpenMP threads stall unpredictably
    dist.configure_device(device)  # as sample.py's job does (on the CPU: dist.keep_heap)
    mcfg = ModelConfig(preset=preset, latent_channels=4, latent_size=R, num_classes=10)
    torch.manual_seed(0)
    net = build_model(mcfg).to(device).eval().requires_grad_(False)
    counting = CountingNet(net)
    if args.vae:
        codec = VAECodec.load(args.vae, device)
    else:
        codec = VAECodec(small_vae(4, 2 if quick else 4, 32 if quick else 64), "random-small", device,
                         torch.float16 if device.type == "cuda" else torch.float32)
    decode = make_decoder(codec)
    cfg = SamplerConfig(steps=steps, cfg_scale=args.cfg_scale)
    sampler = edm.ImageSampler(counting, sigma_data=0.5, latent_channels=4, latent_size=R, num_classes=10,
                                    sampler=cfg, decode=decode, seed=0, device=device)
    fwd_batch = 2 * B if args.cfg_scale != 1.0 else B
    r = run(sampler, counting, net, decode, B, fwd_batch, mcfg, device, repeats)
    result = {
        "e2e_img_s": round(r["e2e_img_s"], 3), "bound_img_s": round(r["bound_img_s"], 3),
        "ratio": round(r["e2e_img_s"] / r["bound_img_s"], 3),
        "model": preset, "latent": [4, R, R], "batch_size": B, "forward_batch": fwd_batch, "steps": steps,
        "cfg_scale": args.cfg_scale, "repeats": repeats, **{k: v for k, v in r.items() if "img_s" not in k},
        "vae": codec.name, "device": str(device), "threads": torch.get_num_threads(),
        "writing": "included (each timed batch writes its part npz and waits for it); assembly excluded",
    }
    if not args.no_flops:
        result.update(h100_estimates())
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
