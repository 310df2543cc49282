"""Train a Patch Diffusion denoiser on pre-encoded latent shards.

    python train_latent.py --config configs/imagenet256_dit_b2.yaml data.shards=shards/in256 run.out_dir=runs/b2
    torchrun --nproc_per_node 8 train_latent.py --config ... [--resume auto]
    accelerate launch --num_processes 8 train_latent.py --config ...

Everything else (the loop, checkpoints, logging) lives in latent_patch/train.py.
"""

import sys


from latent_patch.train import main

if __name__ == "__main__":
    sys.exit(main())
