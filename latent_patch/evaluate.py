"""Training-time evaluation of the EMA weights: preview grids and FID/FD at intervals.

Both sample through the same code as ``sample.py`` (``edm.ImageSampler``: per-index noise and
labels, the same sampler and decoder), inside a forked RNG, so a run with evaluations trains
exactly as one without. FID samples are split over all ranks and their features gathered.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import dist, fid
from .checkpoint import ckpt_name
from .codec import VAECodec, manifest_decoder, model_norm
from .config import SamplerConfig
from .edm import ImageSampler, Precond, plan_batches, sample
from .images import save_grid
from .monitor import TrainingError, log
from .seeds import derive_seed
from .shards import manifest_file, open_manifest


def _fork_rng(device: torch.device):
    """Evaluations draw their own noise; the training streams continue as if they had not run."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class Previewer:
    """Samples a few full latents with the EMA model and saves them, VAE-decoded, as a PNG grid."""

    def __init__(self, trainer: Any) -> None:
        """Load the VAE before the first step, so a wrong one fails now and not at the first preview.

        The manifest's VAE being unavailable (offline hub id) only skips previews, with a log
        line; a VAE the user named in ``eval.vae`` must load and fit the latents.
        """
        cfg = trainer.cfg.eval
        self.codec = None
        self.disabled = cfg.preview_every_patches <= 0 or not trainer.accelerator.is_main_process
        if self.disabled:
            return
        spec = cfg.vae or ((trainer.manifest or {}).get("vae") or {}).get("id")
        try:
            self.codec = VAECodec.load(spec, device=trainer.accelerator.device)
        except Exception as err:  # offline hub id, missing folder
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if cfg.vae:
                raise TrainingError(f"eval.vae={cfg.vae}: cannot load it ({reason})") from err
            log.info("previews skipped: VAE %r is not available (%s); set eval.vae=DIR", spec, reason)
            self.disabled = True
            return
        if self.codec.latent_channels != trainer.C:
            raise TrainingError(f"preview VAE {spec} has {self.codec.latent_channels} latent channels but the "
                                f"shards' latents have {trainer.C}: set eval.vae to the VAE that encoded them")

    def __call__(self, trainer: Any) -> Path | None:
        """Write RUN/previews/step-XXXXXXXXX.png; does not touch any training RNG."""
        if self.disabled:
            return None
        cfg, dev = trainer.cfg.eval, trainer.accelerator.device
        per_row = max(1, cfg.preview_per_class)
        rows = max(1, math.ceil(cfg.preview_images / per_row))
        classes = torch.linspace(0, trainer.cfg.model.num_classes - 1, rows).round().long()
        labels = classes.repeat_interleave(per_row).to(dev)
        gen = torch.Generator(dev).manual_seed(derive_seed(trainer.cfg.run.seed, 0, "preview"))  # same noise each time
        noise = torch.randn((len(labels), trainer.C, trainer.R, trainer.R), generator=gen, device=dev)
        # inference_mode (not no_grad): codec.decode clamps its inference-mode output in place
        with _fork_rng(dev), torch.inference_mode():
            z = sample(Precond(trainer.ema, trainer.cfg.edm.sigma_data), noise, labels,
                       SamplerConfig(steps=cfg.preview_steps), null_class=trainer.cfg.model.num_classes, generator=gen)
            images = manifest_decoder(self.codec, trainer.manifest, trainer.norm)(z)
        path = Path(trainer.cfg.run.out_dir) / "previews" / f"{ckpt_name(trainer.progress.step)}.png"
        save_grid(images.numpy(), path, per_row)
        log.info("preview: %s (classes %s)", path, classes.tolist())
        return path


class Evaluator:
    """FID (FD with the demo features) of the EMA weights every ``eval.fid_every_patches`` patches.

    Call it on every rank. Results go to RUN/fid.jsonl, the log and tensorboard.
    """

    def __init__(self, trainer: Any) -> None:
        cfg = trainer.cfg.eval
        self.enabled = cfg.fid_every_patches > 0
        if self.enabled and not cfg.fid_ref:
            raise TrainingError("eval.fid_every_patches is set but eval.fid_ref is not: name a stats npz or an image folder")
        self.codec = None

    def __call__(self, trainer: Any) -> dict:
        cfg, dev = trainer.cfg.eval, trainer.accelerator.device
        if self.codec is None:
            self.codec = VAECodec.load(cfg.vae or (trainer.manifest or {})["vae"]["id"], device=dev)
        with _fork_rng(dev):
            metrics = evaluate_model(
                trainer.ema, trainer.cfg, cfg.fid_num_samples, cfg.fid_ref, features=cfg.fid_features,
                codec=self.codec, manifest=trainer.manifest,
                sampler=SamplerConfig(steps=cfg.fid_steps, cfg_scale=cfg.fid_cfg_scale),
                distributed=trainer.world_size > 1)
        record = {"step": trainer.progress.step, "patches": trainer.progress.patches, **metrics}
        if trainer.accelerator.is_main_process:
            name = "fid" if "fid" in metrics else "fd"
            log.info("%s %.3f on %d samples at %s patches", name.upper(), metrics[name], cfg.fid_num_samples,
                     f"{trainer.progress.patches:,}")
            with open(Path(trainer.cfg.run.out_dir) / "fid.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if trainer.cfg.run.tensorboard:
                trainer.accelerator.log({f"eval/{name}": metrics[name]}, step=trainer.progress.step)
        return record


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: Any, num_samples: int, ref: Any, *,
                   features: Any = "inception", codec: Any = None, manifest: dict | None = None,
                   sampler: SamplerConfig | None = None, seed: int = 0, batch_size: int = 64,
                   inception: str | None = None, distributed: bool = False, progress: bool = False) -> dict:
    """FID/FD of ``num_samples`` fresh samples of an in-memory model (e.g. the EMA during training).

    ``cfg`` is the run's TrainConfig (model shape, sigma_data, shards); ``ref`` a stats npz / image
    folder / ``fid.Stats``; ``features`` "inception", "demo" or a ``fid.FeatureExtractor``. Pass
    ``codec`` (and reuse ``ref`` as a loaded Stats) to avoid reloading them at every evaluation.
    With ``distributed=True`` call it on EVERY rank: ranks split the indices and gather the
    features, and each returns the same metrics; otherwise call it on one process only.
    Images are never written; the sampled indices and noise are those of ``sample.py``.
    """
    device = next(model.parameters()).device
    extractor = features if isinstance(features, fid.FeatureExtractor) else fid.build_extractor(
        features, device, inception)
    manifest = manifest if manifest is not None else _manifest_of(cfg)
    if codec is None:
        vae_id = ((manifest or {}).get("vae") or {}).get("id")
        if not vae_id:
            raise ValueError("the run's shards manifest names no VAE: pass codec=")
        codec = VAECodec.load(vae_id, device)
    decode = manifest_decoder(codec, manifest, model_norm(cfg, manifest))
    was_training = model.training
    model.eval()
    try:
        img_sampler = ImageSampler(model, sigma_data=cfg.edm.sigma_data, latent_channels=cfg.model.latent_channels,
                                   latent_size=cfg.model.latent_size, num_classes=cfg.model.num_classes,
                                   sampler=sampler or SamplerConfig(), decode=decode, seed=seed, device=device)
        info = dist.dist_info() if distributed else dist.DistInfo(0, 1, 0)
        collector = fid.FeatureCollector(extractor)
        t0 = time.perf_counter()
        resolution = None
        for block in tqdm(plan_batches(range(num_samples), batch_size, info.rank, info.world_size),
                          desc="eval samples", unit="batch", disable=not progress):
            images, labels = img_sampler.images(block)
            resolution = images.shape[1]
            collector.add(images, labels)
        if distributed and info.world_size > 1:
            collector = _gather_collector(collector, extractor, device)
        stats_ref = fid.load_reference(ref, extractor, resolution=resolution)
        metrics = fid.score(collector, stats_ref, str(ref) if not isinstance(ref, fid.Stats) else ref.source)
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        return metrics
    finally:
        model.train(was_training)


def _manifest_of(cfg: Any) -> dict | None:
    """The run's shards manifest, read through the shard format's checked reader (None: no shards)."""
    shards = getattr(getattr(cfg, "data", None), "shards", None)
    return open_manifest(shards) if shards and manifest_file(shards).is_file() else None


def _gather_collector(collector: fid.FeatureCollector, extractor: Any, device: torch.device) -> fid.FeatureCollector:
    """All ranks' features (+ predictions, labels) into one collector on every rank (no pickle:
    padded float64 tensors through all_gather)."""
    import torch.distributed as tdist

    feats = collector.features()
    extra = (np.stack([np.concatenate(collector.preds), np.concatenate(collector.labels)], 1)
             if collector.preds else np.zeros((len(feats), 0)))
    rows = torch.from_numpy(np.concatenate([feats, extra], 1)).to(device, torch.float64)
    n = torch.tensor([rows.shape[0]], device=device)
    counts = [torch.zeros_like(n) for _ in range(tdist.get_world_size())]
    tdist.all_gather(counts, n)
    width, most = rows.shape[1], int(max(c.item() for c in counts))
    padded = torch.zeros(most, width, dtype=torch.float64, device=device)
    padded[:rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in counts]
    tdist.all_gather(parts, padded)
    allrows = torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)]).cpu().numpy()
    out = fid.FeatureCollector(extractor)
    d = feats.shape[1]
    out.feats = [allrows[:, :d]]
    if extra.shape[1]:
        out.preds, out.labels = [allrows[:, d].astype(np.int64)], [allrows[:, d + 1].astype(np.int64)]
    return out
