"""A trained run as a diffusers pipeline: ``LatentPatchPipeline`` (EMA network + VAE + what a latent means).

    pipe = LatentPatchPipeline.from_pretrained("exported")        # written by `sample.py export`
    images = pipe(class_labels=[0, "Trouser"], generator=torch.Generator().manual_seed(0)).images

The folder is diffusers' own layout (``model_index.json``, ``denoiser/`` and ``vae/``, each a
config.json + safetensors), so it loads without the training code's checkpoints:

- ``denoiser`` (:class:`LatentPatchDenoiser`, a ModelMixin + ConfigMixin): the network rebuilt from
  its ``ModelConfig`` (``config.json["model"]``) inside EDM's ``Precond`` (``sigma_data``), plus what
  the model's latents mean: the per-channel ``LatentNorm`` it was trained with (``latent_norm_mean``,
  ``latent_norm_gain``) and the VAE scaling its shards used (``scaling_factor``, ``shift_factor``).
- ``vae``: diffusers' AutoencoderKL (the SD VAE, or the demo VAE).
- the pipeline's config: ``class_names`` (the shards' manifest) and ``sampler``, the sampler
  settings the run recommends (only those that differ from ``SamplerConfig``'s defaults).

A call runs the very code of ``sample.py``: ``edm.sample`` (one Heun loop for everything) and
``codec.make_decoder`` (undo the normalisation, VAE decode, uint8). Given the per-sample generators
of ``sample.py`` (:meth:`LatentPatchPipeline.sample_generators`) and the same float operations
(same batch, device and CPU thread count; ``sample.py --amp none --compile false``; on a GPU
``sample.py`` also turns on TF32, which a pipeline leaves to its caller), the images equal
``sample.py``'s bit for bit. Otherwise they differ by float rounding (measured: 1 level of 255 in a
few pixels between 1 and 2 CPU threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from . import checkpoint
from . import config as config_mod
from .cli import HelpFormatter
from .codec import LatentNorm, VAECodec, make_decoder, model_norm, parse_dtype
from .config import ModelConfig, SamplerConfig
from .edm import Precond, RowRandn, sample
from .models import build_model

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# `DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR)` imports DIR/pipeline.py and takes the
# pipeline class it finds there: this one line (the package must be installed).
CUSTOM_PIPELINE_FILE = "pipeline.py"
_CUSTOM_PIPELINE_SOURCE = '"""Loads with latent-patch installed."""\nfrom latent_patch.pipeline import LatentPatchPipeline  # noqa: F401\n'


class LatentPatchDenoiser(ModelMixin, ConfigMixin):
    """``D(x_noisy, sigma, coords, class_labels)``: a trained network inside EDM's preconditioning,
    rebuilt from its config alone (``model``: the run's ModelConfig; ``sigma_data``).

    It also carries what its latents mean, for the decoder: ``latent_norm_mean`` / ``latent_norm_gain``
    (``codec.LatentNorm``, None when the run used the VAE's scaling only) and the scaling/shift of
    the run's shards (``scaling_factor``, ``shift_factor``).
    """

    @register_to_config
    def __init__(self, model: dict[str, Any] | None = None, sigma_data: float = 0.5, scaling_factor: float = 0.18215,
                 shift_factor: float = 0.0, latent_norm_mean: list[float] | None = None,
                 latent_norm_gain: list[float] | None = None) -> None:
        super().__init__()
        if (latent_norm_mean is None) != (latent_norm_gain is None):
            raise ValueError("latent_norm_mean and latent_norm_gain go together (both or neither)")
        self.precond = Precond(build_model(self.model_config), sigma_data)

    @property
    def model_config(self) -> ModelConfig:
        """The network's ModelConfig (gradient checkpointing off: this is for inference)."""
        data = dict(self.config.model or {}, grad_checkpointing=False)
        return config_mod.from_dict(ModelConfig, data, source="denoiser config.json: model")

    @property
    def latent_norm(self) -> LatentNorm | None:
        mean, gain = self.config.latent_norm_mean, self.config.latent_norm_gain
        return None if mean is None else LatentNorm(tuple(float(m) for m in mean), tuple(float(g) for g in gain))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, R, R) of the latents the network generates."""
        m = self.model_config
        return m.latent_channels, m.latent_size, m.latent_size

    @property
    def num_classes(self) -> int:
        """Real classes; index ``num_classes`` is the null (unconditional) class."""
        return self.model_config.num_classes

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor | float, coords: torch.Tensor,
                class_labels: torch.Tensor) -> torch.Tensor:
        return self.precond(x_noisy, sigma, coords, class_labels)


class _GeneratorRows(RowRandn):
    """``edm.RowRandn`` over given generators: row b of every draw comes from ``generators[b]``."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:  # the generators are given: no seeding
        self.generators = list(generators)
        self.device = self.generators[0].device
        if any(g.device != self.device for g in self.generators):
            raise ValueError("the per-sample generators must all be on one device")


class LatentPatchPipeline(DiffusionPipeline):
    """Class-conditional generation with a trained latent-patch model (like diffusers' DiTPipeline).

    ``pipe(class_labels=[...], num_inference_steps=18, guidance_scale=1.5, generator=...)`` returns
    an ``ImagePipelineOutput``. Built from a training run by :meth:`from_checkpoint` /
    ``python sample.py export``; saved and loaded with ``save_pretrained`` / ``from_pretrained``.
    """

    model_cpu_offload_seq = "denoiser->vae"

    def __init__(self, denoiser: LatentPatchDenoiser, vae: AutoencoderKL, class_names: list[str] | None = None,
                 sampler: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, vae=vae)
        sampler = dict(sampler or {})
        config_mod.from_dict(SamplerConfig, sampler, source="pipeline sampler")  # refuse unknown keys now
        self.register_to_config(class_names=list(class_names or []), sampler=sampler)

    # ------------------------------------------------------------------ building from a run

    @classmethod
    def from_checkpoint(cls, path: str | Path, use_ema: bool = True, vae: str | None = None) -> "LatentPatchPipeline":
        """The pipeline of a run folder (its latest complete checkpoint) or a checkpoint folder, on the CPU.

        ``vae``: a VAE spec (hub id, folder, "demo") in place of the one the run's manifest names.
        """
        ckpt = checkpoint.resolve_checkpoint(path)
        net, cfg, manifest = checkpoint.load_inference_model(ckpt, use_ema=use_ema, device="cpu")
        info = (manifest or {}).get("vae") or {}
        spec = vae or info.get("id")
        if not spec:
            raise ValueError(f"{ckpt}: the checkpoint carries no shards manifest naming its VAE: pass --vae SPEC")
        codec = VAECodec.load(spec, device="cpu")
        if codec.latent_channels != cfg.model.latent_channels:
            raise ValueError(f"--vae {codec.name}: the VAE has {codec.latent_channels} latent channels but the model "
                             f"generates {cfg.model.latent_channels}; pass the VAE the shards were encoded with")
        norm = model_norm(cfg, manifest, ckpt)
        model = config_mod.to_dict(dataclasses.replace(cfg.model, grad_checkpointing=False))
        with torch.device("meta"):  # the config only: the loaded network goes in below, not a second copy
            denoiser = LatentPatchDenoiser(
                model=model, sigma_data=float(cfg.edm.sigma_data),
                scaling_factor=float(info.get("scaling_factor", codec.scaling_factor)),
                shift_factor=float(info.get("shift_factor", codec.shift_factor)),
                latent_norm_mean=None if norm is None else list(norm.mean),
                latent_norm_gain=None if norm is None else list(norm.gain))
        denoiser.precond.net = net
        codec.vae.to(memory_format=torch.contiguous_format)  # VAECodec made it channels_last
        return cls(denoiser=denoiser.eval(), vae=codec.vae, class_names=list((manifest or {}).get("class_names") or []),
                   sampler=recommended_sampler(cfg))

    # ------------------------------------------------------------------ settings and labels

    def sampler_config(self, num_inference_steps: int | None = None, guidance_scale: float | None = None) -> SamplerConfig:
        """The sampler a call uses: the defaults, the run's recommendations (config ``sampler``), the call's arguments."""
        cfg = config_mod.from_dict(SamplerConfig, dict(self.config.sampler or {}), source="pipeline sampler")
        if num_inference_steps is not None:
            cfg = dataclasses.replace(cfg, steps=int(num_inference_steps))
        if guidance_scale is not None:
            cfg = dataclasses.replace(cfg, cfg_scale=float(guidance_scale))
        if cfg.steps < 1:
            raise ValueError(f"num_inference_steps={cfg.steps}: at least 1")
        return cfg

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class index (as DiTPipeline's ``labels``)."""
        return {name: i for i, name in enumerate(self.config.class_names or [])}

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class names -> class indices; an unknown name is an error listing the known ones."""
        names = [label] if isinstance(label, str) else list(label)
        known = self.labels
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"unknown class name(s) {missing}; known: {list(known)}")
        return [known[n] for n in names]

    def label_tensor(self, class_labels: int | str | Sequence[int | str] | torch.Tensor) -> torch.Tensor:
        """int64 class indices of ``class_labels`` (ints, names, or a mix), checked against the model."""
        if isinstance(class_labels, torch.Tensor):
            values = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (int, str, np.integer)):
            values = [class_labels]
        else:
            values = list(class_labels)
        ids = [self.get_label_ids(v)[0] if isinstance(v, str) else int(v) for v in values]
        k = self.denoiser.num_classes
        if not ids:
            raise ValueError("class_labels is empty: give one label per image")
        if k > 0 and not all(0 <= i < k for i in ids):
            raise ValueError(f"class_labels {ids}: every class must lie in 0..{k - 1}")
        if k <= 0 and any(ids):
            raise ValueError("an unconditional model takes class label 0 only (one per image)")
        return torch.as_tensor(ids, dtype=torch.int64)

    @staticmethod
    def sample_generators(indices: Sequence[int], seed: int = 0, device: str | torch.device = "cpu") -> list[torch.Generator]:
        """The generators ``sample.py --seed SEED`` gives samples ``indices``: pass them as
        ``generator=`` (with the labels ``sample.py`` uses, ``edm.index_labels``) to get its images."""
        return RowRandn(seed, indices, device).generators

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(self, class_labels: int | str | Sequence[int | str] | torch.Tensor,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 output_type: str = "pil", return_dict: bool = True,
                 decode_dtype: str | torch.dtype | None = None) -> ImagePipelineOutput | tuple:
        """Generate one image per class label.

        class_labels: class indices or names (``self.labels``), one per image.
        num_inference_steps / guidance_scale: override the sampler's steps and guidance weight w
            (``D_u + w (D_c - D_u)``; 1 = no guidance, one network pass per evaluation); the other
            settings are the run's recommendation (config ``sampler``) or EDM's 18-step Heun defaults.
        generator: one torch.Generator for the whole batch, or a list of one per image (each
            image's noise then comes from its own generator, as ``sample.py`` does; see
            :meth:`sample_generators`).
        output_type: "pil" (list of PIL images), "np" (float32 (B, H, W, 3) in [0, 1]), "pt"
            (float32 (B, 3, H, W) in [0, 1]), or "latent" (the model's latents, before decoding).
            Pixels are the 8-bit images ``sample.py`` writes (``np`` / ``pt`` are them / 255).
        decode_dtype: VAE decode precision (default as ``sample.py``: fp16 on a GPU, fp32 on the CPU).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
        device = self._execution_device
        labels = self.label_tensor(class_labels).to(device)
        cfg = self.sampler_config(num_inference_steps, guidance_scale)
        k = self.denoiser.num_classes
        noise, churn = _noise(generator, len(labels), self.denoiser.latent_shape, device)
        x0 = sample(self.denoiser, noise, labels, cfg, k if k > 0 else None, generator=churn)
        pixels = None if output_type == "latent" else self.decode_uint8(x0, decode_dtype)
        if pixels is None:
            images: Any = x0
        elif output_type == "pil":
            images = [Image.fromarray(im) for im in pixels.numpy()]
        elif output_type == "np":
            images = pixels.numpy().astype(np.float32) / 255.0
        else:
            images = pixels.permute(0, 3, 1, 2).float() / 255.0
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode_uint8(self, latents: torch.Tensor, decode_dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """The model's latents -> uint8 images (B, H, W, 3) on the CPU: ``sample.py``'s decoder."""
        device = latents.device
        codec = VAECodec(self.vae, "pipeline", device, parse_dtype(decode_dtype, device))
        d = self.denoiser.config
        return make_decoder(codec, d.scaling_factor, d.shift_factor, None, self.denoiser.latent_norm)(latents)


def _noise(generator: torch.Generator | Sequence[torch.Generator] | None, batch: int, shape: tuple[int, ...],
           device: torch.device) -> tuple[torch.Tensor, Any]:
    """(initial noise on ``device``, the churn noise source for ``edm.sample``) from ``generator``."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} class labels: give one per image (or one)")
        rows = _GeneratorRows(generator)
        return rows.randn(shape).to(device), rows.randn_like
    gen_device = generator.device if generator is not None else device
    return torch.randn((batch, *shape), generator=generator, device=gen_device).to(device), generator


def recommended_sampler(cfg: Any) -> dict[str, Any]:
    """The sampler settings a training config recommends (a ``sampler`` section, when the config
    has one), as the entries that differ from ``SamplerConfig``'s defaults (plain JSON: no inf)."""
    rec = getattr(cfg, "sampler", None)
    if rec is None:
        return {}
    if not isinstance(rec, SamplerConfig):
        rec = config_mod.from_dict(SamplerConfig, dict(config_mod.to_dict(rec)), source="config sampler")
    default = config_mod.to_dict(SamplerConfig())
    return {k: v for k, v in config_mod.to_dict(rec).items() if v != default[k]}


def export_pipeline(path: str | Path, out: str | Path, use_ema: bool = True, vae: str | None = None) -> Path:
    """Write the pipeline of a run / checkpoint to ``out`` (``save_pretrained`` layout + ``pipeline.py``).

    Written into a temporary sibling and renamed, so ``out`` is never half-written; an earlier
    export there is replaced, any other non-empty folder is refused.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").is_file())):
        raise ValueError(f"--out {out}: exists and is not an exported pipeline; choose another folder")
    pipe = LatentPatchPipeline.from_checkpoint(path, use_ema=use_ema, vae=vae)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / CUSTOM_PIPELINE_FILE).write_text(_CUSTOM_PIPELINE_SOURCE)
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.rglob("*"):  # the weights come out 0600 (written via a temporary file): readable as any file
        if f.is_file():
            f.chmod(0o666 & ~umask)
    if out.exists():
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def main_export(argv: Sequence[str] | None = None) -> Path:
    """``sample.py export``: a run (its latest checkpoint) or a checkpoint as a diffusers pipeline folder
    (``LatentPatchPipeline``: model_index.json, denoiser/, vae/)."""
    p = argparse.ArgumentParser(prog="sample.py export", description=main_export.__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder (latest complete checkpoint) or checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (an earlier export there is replaced)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of the checkpoint")
    p.add_argument("--vae", default=None, help="VAE spec (hub id, folder, 'demo'); default: the manifest's")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    ckpt = checkpoint.resolve_checkpoint(args.checkpoint)
    out = export_pipeline(ckpt, args.out, use_ema=args.weights == "ema", vae=args.vae)
    secs = time.perf_counter() - t0
    mib = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20
    print(f"export done: LatentPatchPipeline ({args.weights} weights of {ckpt}) in {out}, {mib:.1f} MiB; "
          f"{secs:.1f} s ({mib / max(secs, 1e-9):.1f} MiB/s)", flush=True)
    return out
