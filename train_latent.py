"""Train a Patch Diffusion denoiser on pre-encoded latent shards.

    python train_latent.py --config configs/imagenet256_dit_b2.yaml data.shards=shards/in256 run.out_dir=runs/b2
    torchrun --nproc_per_node 8 train_latent.py --config ... [--resume auto]
    accelerate launch --num_processes 8 train_latent.py --config ...
    python train_latent.py --config ... --build-cache   # the in-memory cache, before the GPU job

The command line only; the loop, checkpoints and logging live in latent_patch/train.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from latent_patch import checkpoint
from latent_patch import config as config_mod
from latent_patch.cli import HelpFormatter
from latent_patch.config import TrainConfig
from latent_patch.loader import build_loader, cache_path
from latent_patch.monitor import TrainingError, close_logging, log, setup_logging
from latent_patch.train import train


def main(argv: list[str] | None = None) -> int:
    """CLI: ``train_latent.py --config CONFIG [--resume auto|PATH] [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="train_latent.py", formatter_class=HelpFormatter,
        description="Train a Patch Diffusion denoiser on pre-encoded latents (works under torchrun / accelerate launch).")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", default=None,
                        help="'auto' = latest complete checkpoint of run.out_dir (fresh start if none); "
                             "or a checkpoint / run folder (default: a fresh start, refused where run.out_dir "
                             "already holds checkpoints)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (same as run.progress=false)")
    parser.add_argument("--build-cache", action="store_true",
                        help="only build data.cache (in-memory mode) and exit: one process, before the GPU job")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=2e-4 run.out_dir=runs/x")
    args = parser.parse_intermixed_args(argv)  # overrides before, between or after the options
    try:
        cfg = config_mod.load(TrainConfig, args.config, [*args.overrides, *(["run.progress=false"] if args.no_progress else [])])
    except config_mod.ConfigError as err:
        parser.error(str(err))
    if args.build_cache and not (cfg.data.in_memory and cfg.data.cache is not None):
        parser.error(f"--build-cache needs data.in_memory=true and a data.cache (got in_memory={cfg.data.in_memory}, "
                     f"cache={cfg.data.cache})")
    setup_logging(None, True)  # console now; prepare_run adds RUN/log.txt
    try:
        if args.build_cache:
            build_loader(cfg.data, infinite=False)
            log.info("cache ready: %s", cache_path(cfg.data))
            return 0
        train(cfg, args.resume)
    except (TrainingError, checkpoint.CheckpointError, ValueError, FileNotFoundError) as err:
        # ValueError covers ShardError, ConfigError and malformed files (read_json names them).
        # One line like every entry point's refusals (argparse's format), also kept in RUN/log.txt.
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (err,), None))
        print(f"{parser.prog}: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        close_logging()
    return 0


if __name__ == "__main__":
    sys.exit(main())
