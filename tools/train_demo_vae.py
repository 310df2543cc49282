"""Train the demo autoencoder (the offline stand-in for the SD VAE) on the embedded Fashion-MNIST.

    nice -n 5 python tools/train_demo_vae.py                  # writes latent_patch/assets/demo_vae/

A small diffusers AutoencoderKL: 3 -> 4 latent channels, three encoder / decoder stages
(block_out_channels of length 3, so 64 px -> 16x16 latents, downsampling 4). Trained on the 10,000
shipped training images at 64 px RGB (the demo's preprocessing, tools/build_demo_data.py) with
random horizontal flips, on a sample of the posterior, with the LDM-style loss

    loss = mean |x - x_hat| + mse_weight * mean (x - x_hat)^2 + kl_weight * KL(q(z|x) || N(0, I)) / pixels

(KL summed over a sample's latent elements, divided by its pixel count: the per-pixel analogue of
LDM's `rec_sum + 1e-6 * kl_sum`), Adam, linear warm-up then cosine decay, progress counted in
training images seen. Afterwards `scaling_factor` = 1 / std of the posterior means over the
training set (SD's 0.18215 rule), `shift_factor` stays null, and the model is saved with
`save_pretrained` (config.json + diffusion_pytorch_model.safetensors, float32) next to a
training.json with the settings and the measured latent statistics and held-out PSNR.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_demo_data import DEFAULT_ASSETS, seeded_splits, to_float  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "latent_patch" / "assets" / "demo_vae"


def build_vae(widths=(16, 32, 64), norm_groups=16, layers_per_block=1):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=tuple(widths), layers_per_block=layers_per_block,
        norm_num_groups=norm_groups, sample_size=64, scaling_factor=1.0, shift_factor=None,
    )


def psnr_uint8(reference: torch.Tensor, decoded: torch.Tensor) -> tuple[float, float]:
    """uint8 reference vs decoded pixels in [-1, 1] (clamped and rounded to uint8, as a user sees
    them). Returns (PSNR of the mean MSE over the set, mean of the per-image PSNRs), in dB."""
    out = ((decoded.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((out - reference.float()) ** 2).flatten(1).mean(1)
    per_image = 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))
    return (10 * math.log10(255.0 ** 2 / max(mse.mean().item(), 1e-10)), per_image.mean().item())


@torch.no_grad()
def reconstruct(vae, pixels: torch.Tensor, sample: bool = False, batch: int = 100,
                generator: torch.Generator | None = None) -> torch.Tensor:
    vae.eval()
    outs = []
    for i in range(0, len(pixels), batch):
        post = vae.encode(to_float(pixels[i:i + batch])).latent_dist
        z = post.sample(generator) if sample else post.mode()
        outs.append(vae.decode(z).sample)
    return torch.cat(outs)


@torch.no_grad()
def latent_moments(vae, pixels: torch.Tensor, batch: int = 100) -> tuple[float, float, float]:
    """(mean, std) of the posterior means over every latent element, and the mean posterior std."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        post = vae.encode(to_float(pixels[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    means = torch.cat(means).double()
    return means.mean().item(), means.std().item(), torch.cat(stds).double().mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_ASSETS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--widths", type=int, nargs=3, default=(16, 32, 64))
    p.add_argument("--norm-groups", type=int, default=16)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--kimg", type=float, default=100, help="training images seen, in thousands")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-kimg", type=float, default=2)
    p.add_argument("--mse-weight", type=float, default=1.0)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--eval-every-kimg", type=float, default=10)
    p.add_argument("--eval-images", type=int, default=500, help="held-out images for progress PSNR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    gen, (train_x, _), (test_x, _) = seeded_splits(args.data, args.seed, args.threads)
    eval_x = test_x[:args.eval_images]

    vae = build_vae(args.widths, args.norm_groups, args.layers_per_block)
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"AutoencoderKL {tuple(args.widths)}: {n_params / 1e6:.3f}M parameters", flush=True)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    total_steps = int(args.kimg * 1000 / args.batch)
    warmup = max(1, int(args.warmup_kimg * 1000 / args.batch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total_steps - warmup))))))
    eval_steps = max(1, int(args.eval_every_kimg * 1000 / args.batch))

    start = time.time()
    order, pos = torch.randperm(len(train_x), generator=gen), 0
    run = {"rec": 0.0, "kl": 0.0, "n": 0}
    for step in range(1, total_steps + 1):
        vae.train()
        if pos + args.batch > len(order):
            order, pos = torch.randperm(len(train_x), generator=gen), 0
        x = to_float(train_x[order[pos:pos + args.batch]])
        pos += args.batch
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)

        post = vae.encode(x).latent_dist
        x_hat = vae.decode(post.sample(gen)).sample
        rec = (x_hat - x).abs().mean() + args.mse_weight * ((x_hat - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run["rec"] += rec.item()
        run["kl"] += kl.item()
        run["n"] += 1

        if step % eval_steps == 0 or step == total_steps:
            psnr, _ = psnr_uint8(eval_x, reconstruct(vae, eval_x))
            print(f"kimg {step * args.batch / 1000:7.1f}  rec {run['rec'] / run['n']:.5f}  "
                  f"kl/pixel {run['kl'] / run['n']:.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"held-out PSNR ({len(eval_x)} img) {psnr:.2f} dB  {time.time() - start:.0f}s", flush=True)
            run = {"rec": 0.0, "kl": 0.0, "n": 0}
    train_s = time.time() - start

    mean, std, post_std = latent_moments(vae, train_x)
    scaling_factor = float(f"{1.0 / std:.5g}")
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=None)
    print(f"training latents: mean {mean:.4f} std {std:.4f} (mean posterior std {post_std:.2e}) "
          f"-> scaling_factor {scaling_factor}", flush=True)

    psnr_mode = psnr_uint8(test_x, reconstruct(vae, test_x))
    psnr_sample = psnr_uint8(test_x, reconstruct(vae, test_x, sample=True,
                                                 generator=torch.Generator().manual_seed(args.seed)))
    print(f"held-out PSNR on {len(test_x)} images: posterior mean {psnr_mode[0]:.2f} dB "
          f"(per-image mean {psnr_mode[1]:.2f}), posterior sample {psnr_sample[0]:.2f} dB", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(args.out, safe_serialization=True)
    report = {
        "parameters": n_params, "train_kimg": args.kimg, "train_seconds": round(train_s),
        "args": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "latent_mean": mean, "latent_std": std, "mean_posterior_std": post_std,
        "scaling_factor": scaling_factor,
        "heldout_images": len(test_x),
        "heldout_psnr_db": {"posterior_mean": psnr_mode[0], "posterior_mean_per_image_avg": psnr_mode[1],
                            "posterior_sample": psnr_sample[0]},
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    weights = args.out / "diffusion_pytorch_model.safetensors"
    print(f"saved {args.out} ({weights.stat().st_size / 1e6:.2f} MB weights); {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
