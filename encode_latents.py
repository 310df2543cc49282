"""Encode an image dataset into VAE-latent webdataset shards (see docs/design.md).

    python encode_latents.py --source data/imagenet/train --out shards/in256 \
        --vae stabilityai/sd-vae-ft-ema --resolution 256 --flips both --shard-size 5000

Several processes: ``torchrun --nproc_per_node 8 encode_latents.py ...``; independent jobs (SLURM
arrays): ``--num-jobs N --job-index I``. Re-running the same command resumes a killed run.
``--verify --out DIR`` checks every shard's sha256 against the manifest. ``--repr ENCODER`` also
stores a frozen encoder's patch-token grid per sample (REPA's targets, computed once here).
"""

from __future__ import annotations

import argparse
import sys

from latent_patch.codec import DEFAULT_VAE
from latent_patch.cli import HelpFormatter, int_at_least
from latent_patch.config import EncodeConfig
from latent_patch.encode import run_encode, verify
from latent_patch.images import DEFAULT_MAX_PIXELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encode_latents.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help="class-folder tree (e.g. ImageNet train), flat folder + "
                   "--labels, or webdataset tars (path, 'a-{000..009}.tar', glob, folder of tars); "
                   "required unless --verify")
    what.add_argument("--verify", action="store_true",
                      help="instead of encoding: only check the shards in --out against its manifest.json")
    p.add_argument("--out", default="shards/",
                   help="output folder for shard-*.tar + manifest.json (default: shards/)")
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help=f"hub id, local AutoencoderKL folder, or 'demo' (default: {DEFAULT_VAE})")
    p.add_argument("--resolution", type=int_at_least(8), default=256,
                   help="ADM center-crop size (default: 256)")
    p.add_argument("--flips", choices=("none", "both"), default="none",
                   help="'both' also stores the encode of each horizontally flipped image "
                   "(default: none)")
    p.add_argument("--shard-size", type=int_at_least(1), default=EncodeConfig.shard_size,
                   help=f"max samples per shard (default: {EncodeConfig.shard_size})")
    p.add_argument("--num-jobs", type=int_at_least(1), default=1,
                   help="independent jobs in total, e.g. a SLURM array (default: 1)")
    p.add_argument("--job-index", type=int_at_least(0), default=0,
                   help="this job's index, 0-based (default: 0)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64,
                   help="images per VAE call (default: 64)")
    p.add_argument("--labels", help="label file for a flat folder (LOC_val_solution.csv or "
                   "'filename label' lines) (default: none: labels from class subfolders or the tars' .cls)")
    p.add_argument("--workers", type=int_at_least(0), default=None,
                   help="decoding worker processes (default: cores - 1 with a GPU, "
                   "0 = inline on the CPU)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch threads of the encoding process on the CPU (default: its cores)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="VAE compute precision on the GPU (default fp16; the CPU uses fp32)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda (default: cuda:LOCAL_RANK "
                   "when available)")
    p.add_argument("--max-pixels", type=int_at_least(1), default=DEFAULT_MAX_PIXELS,
                   help=f"skip images with more pixels, a decompression-bomb guard (default: "
                   f"{DEFAULT_MAX_PIXELS}, PIL's own hard limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_repr_options(p)
    return p


def add_repr_options(p: argparse.ArgumentParser) -> None:
    """The representation targets' flags (latent_patch/encode_repr.py)."""
    g = p.add_argument_group("representation targets (REPA), stored beside each latent as repr.npy")
    g.add_argument("--repr", metavar="ENCODER", default=None,
                   help="also store this frozen ViT's patch-token grid (float16 gh x gw x K) per "
                   "sample and flip: a timm model id (e.g. vit_base_patch14_dinov2.lvd142m, fetched "
                   "from the hub), a local folder (config.json + model.safetensors) or 'demo' "
                   "(default: none)")
    g.add_argument("--repr-size", metavar="PX", type=int_at_least(1), default=None,
                   help="the encoder's input size (default: a folder's own; for a hub id REPA's 224 x "
                   "(--resolution // 256), at least 224)")
    g.add_argument("--repr-dims", metavar="K", type=int_at_least(1), default=None,
                   help="store K dims: a PCA fitted once per --out on a seeded sample of the "
                   "training images (default: all D dims, no PCA)")
    g.add_argument("--repr-pca-images", metavar="N", type=int_at_least(1), default=None,
                   help=f"images the PCA's tokens come from (default: {EncodeConfig.repr_pca_images})")
    g.add_argument("--repr-pca-tokens", metavar="T", type=int_at_least(1), default=None,
                   help=f"tokens the PCA is fitted on, a seeded subset of those images' "
                   f"(default: {EncodeConfig.repr_pca_tokens})")
    g.add_argument("--repr-pca-seed", metavar="S", type=int, default=None,
                   help=f"the PCA sample's seed (default: {EncodeConfig.repr_pca_seed})")


def repr_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """EncodeConfig's repr_* fields from the flags; a refining flag without what it refines is refused."""
    pca = {"repr_pca_images": args.repr_pca_images, "repr_pca_tokens": args.repr_pca_tokens,
           "repr_pca_seed": args.repr_pca_seed}
    if args.repr is None and (args.repr_size is not None or args.repr_dims is not None):
        parser.error("--repr-size and --repr-dims refine --repr ENCODER, which is missing")
    given = [k for k, v in pca.items() if v is not None]
    if args.repr_dims is None and given:
        parser.error(f"--{given[0].replace('_', '-')} sets the PCA of --repr-dims K, which is missing")
    return {"repr": args.repr, "repr_size": args.repr_size, "repr_dims": args.repr_dims,
            **{k: v for k, v in pca.items() if v is not None}}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        try:
            return verify(args.out)
        except (FileNotFoundError, ValueError, KeyError) as err:
            print(f"encode_latents.py: error: {args.out}: cannot verify ({err})", file=sys.stderr)
            return 1
    if args.job_index >= args.num_jobs:
        parser.error(f"--job-index {args.job_index} must be < --num-jobs {args.num_jobs}")
    if args.flips == "both" and args.shard_size < 2:
        parser.error("--shard-size must be >= 2 with --flips both (an image and its flip)")
    cfg = EncodeConfig(
        source=args.source, out=args.out, vae=args.vae, resolution=args.resolution,
        flips=args.flips, shard_size=args.shard_size, num_jobs=args.num_jobs,
        job_index=args.job_index, batch_size=args.batch_size, labels=args.labels,
        workers=args.workers, threads=args.threads, dtype=args.dtype, device=args.device,
        max_pixels=args.max_pixels, progress=not args.no_progress, **repr_settings(parser, args))
    try:
        run_encode(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"encode_latents.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
