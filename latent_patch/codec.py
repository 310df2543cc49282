"""The VAE and everything a latent is: load the VAE by hub id, local folder or "demo"; pixels <->
posterior; scale/shift; per-channel normalisation; one posterior draw; latents -> uint8 images.

Everything stored on disk is UNSCALED (raw VAE units: the posterior mean and std), and the
scaling/shift factors travel in the manifest, so one set of shards serves any normalisation.
Training and sampling work with scaled latents ``z = (x - shift) * scale``, optionally
standardised per channel (:class:`LatentNorm`, ``data.latent_norm=channel``); the model sees that
and the decoder undoes both (:func:`make_decoder`), so training, previews, training-time FID and
``sample.py`` all map a latent the same way.
Weights stay in fp32; reduced precision on the GPU is autocast, so a batch that overflows in
fp16 can be redone in fp32 instead of writing NaNs.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .dist import DTYPES, autocast

log = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEMO_VAE_DIR = Path(__file__).resolve().parent / "assets" / "demo_vae"


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute dtype: fp16 by default on the GPU, always fp32 on the CPU (no fast half path)."""
    if device.type != "cuda":
        if dtype not in (None, "fp32", "float32", torch.float32):
            log.warning("dtype %s requested on %s: using fp32 (reduced precision is GPU-only)",
                        dtype, device)
        return torch.float32
    if dtype is None:
        return torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, fp16, bf16")
    return DTYPES[dtype]


def resolve_spec(spec: str) -> tuple[str, Path | None]:
    """(display name, local folder or None for a hub id); "demo" is the shipped demo VAE."""
    if spec == "demo":
        if not (DEMO_VAE_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"the demo VAE is not built yet ({DEMO_VAE_DIR} has no config.json): "
                "run `python tools/train_demo_vae.py` first")
        return "demo", DEMO_VAE_DIR
    p = Path(spec).expanduser()
    if p.exists():
        if (p / "config.json").is_file():
            return str(p.resolve()), p
        if (p / "vae" / "config.json").is_file():  # a whole pipeline folder
            return str(p.resolve()), p / "vae"
        raise FileNotFoundError(f"--vae {spec}: folder has no config.json (nor vae/config.json); "
                                "expected a diffusers AutoencoderKL saved with save_pretrained")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise FileNotFoundError(f"--vae {spec}: no such folder (and not a hub id like org/name)")
    return spec, None


def _load_model(spec: str) -> tuple[str, torch.nn.Module]:
    from diffusers import AutoencoderKL

    name, folder = resolve_spec(spec)
    if folder is not None:
        try:
            return name, AutoencoderKL.from_pretrained(folder)
        except Exception as err:
            raise RuntimeError(f"--vae {spec}: cannot load an AutoencoderKL from {folder}: "
                               f"{err}") from err
    try:
        return name, AutoencoderKL.from_pretrained(spec)
    except Exception as err:
        raise RuntimeError(
            f"cannot fetch the VAE '{spec}' from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Without hub access, download it "
            "elsewhere (e.g. `huggingface-cli download " + spec + " --local-dir DIR`) and pass "
            "the local folder: --vae DIR") from err


class VAECodec:
    """A diffusers AutoencoderKL with the project's conventions (see docs/design.md)."""

    def __init__(self, vae: torch.nn.Module, name: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        cfg = vae.config
        # channels_last: faster on GPUs and, measured here, ~25% faster on the CPU too
        self.vae = vae.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
        self.name = name
        self.device = device
        self.dtype = dtype
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 0.18215)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def load(cls, spec: str = DEFAULT_VAE, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> "VAECodec":
        """Load from a hub id, a local save_pretrained folder, or "demo"."""
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device)
        name, vae = _load_model(spec)
        return cls(vae, name, device, parse_dtype(dtype, device))

    def info(self) -> dict:
        """The manifest's ``vae`` entry."""
        return {"id": self.name, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "latent_channels": self.latent_channels,
                "downsample": self.downsample}

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run ``fn`` under the compute dtype; redo in fp32 if reduced precision overflowed."""
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        if self.dtype != torch.float32 and not all(torch.isfinite(o).all() for o in outs):
            log.warning("non-finite VAE output in %s: batch redone in fp32", self.dtype)
            with torch.inference_mode():
                out = fn(x)
        return out

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels NCHW in [-1, 1] -> posterior (mean, std), unscaled, float32 on the device."""
        x = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

        def fn(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            post = self.vae.encode(t).latent_dist
            return post.mean.float(), post.std.float()

        return self._run(fn, x)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the normalised latent the diffusion model sees."""
        return (x - self.shift_factor) * self.scaling_factor

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale`."""
        return z / self.scaling_factor + self.shift_factor

    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels NCHW in [-1, 1] (float32)."""
        x = self.unscale(z_scaled.to(self.device).float())
        return self._run(lambda t: self.vae.decode(t).sample.float(), x).clamp(-1, 1)

    def decode_uint8(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> uint8 images NHWC on the CPU (ready for PNG / npz)."""
        return _to_uint8(self.decode(z_scaled)).cpu()

    def decode_uint8_start(self, z_scaled: torch.Tensor) -> Callable[[], torch.Tensor]:
        """:meth:`decode_uint8` without waiting: the decode and the copy to (pinned) host memory
        are queued on the device and the returned call waits for them. The same pixels as
        :meth:`decode_uint8`; a reduced-precision decode that overflowed is redone in fp32 there."""
        x = self.unscale(z_scaled.to(self.device).float())
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.vae.decode(x).sample.float()
        with torch.inference_mode():
            # the flag is copied FIRST: the images' event then completes both copies (an event
            # waits for everything queued before it on the stream), so result() never reads a
            # flag still in flight (a stale True wrote NaN pixels, a stale False decoded a good batch twice)
            finite_host, _ = _copy_to_host(torch.isfinite(out).all())
            images, done = _copy_to_host(_to_uint8(out.clamp(-1, 1)))

        def result() -> torch.Tensor:
            if done is not None:
                done.synchronize()
            if self.dtype != torch.float32 and not bool(finite_host):
                return self.decode_uint8(z_scaled)  # _run redoes it in fp32 (and logs it)
            return images

        return result


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (NCHW) -> uint8 NHWC on the same device."""
    with torch.inference_mode():
        x = x.add(1).mul_(127.5).round_().clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1)


def _copy_to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of ``t`` and, on CUDA, the event that marks it complete (pinned, non-blocking):
    the event also completes every copy queued before it on the stream, never one queued after."""
    if t.device.type != "cuda":
        return t.cpu(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


# --------------------------------------------------------------------------- what the model sees

LATENT_NORMS = ("scale", "channel")


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel affine map ``(z - mean) * gain`` on top of the VAE's own scaling.

    Why: EDM's preconditioning assumes every channel has std ``sigma_data``. A VAE whose channels
    differ a lot (the demo VAE: stds 0.38..1.65 after its single scaling factor) then gets too
    little noise on the wide channels and too much on the narrow ones; EDM2 standardises per
    channel for the same reason.
    """

    mean: tuple[float, ...]
    gain: tuple[float, ...]

    def _view(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        return _channel_tensor(values, z.device, z.dtype)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (NCHW) -> what the model sees."""
        return (z - self._view(self.mean, z)) * self._view(self.gain, z)

    def undo(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`apply`: model output -> scaled latent for the decoder."""
        return z / self._view(self.gain, z) + self._view(self.mean, z)


@functools.lru_cache(maxsize=16)
def _channel_tensor(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, C, 1, 1) constants, made once per device: no host-to-device copy in every training step."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def latent_norm(mode: str, manifest: dict | None, target_std: float, where: str = "manifest") -> LatentNorm | None:
    """The normalisation ``data.latent_norm`` names (None for "scale": nothing on top of the VAE's).

    ``where`` names the manifest in errors (a shard folder or a checkpoint).
    """
    if mode not in LATENT_NORMS:
        raise ValueError(f"data.latent_norm={mode!r}: expected one of {', '.join(LATENT_NORMS)}")
    if mode == "scale":
        return None
    stats = (manifest or {}).get("latent_stats") or {}
    mean, std = stats.get("mean") or [], stats.get("std") or []
    if not mean or len(mean) != len(std):
        raise ValueError(f"data.latent_norm=channel needs latent_stats (mean, std per channel) in {where}; "
                         f"it has {stats!r}: re-encode with a current encode_latents.py")
    if not all(math.isfinite(m) and math.isfinite(s) and s > 0 for m, s in zip(mean, std)):
        raise ValueError(f"data.latent_norm=channel: latent_stats in {where} has a non-finite or zero std: {std}")
    return LatentNorm(tuple(float(m) for m in mean), tuple(float(target_std) / float(s) for s in std))


def model_norm(cfg: Any, manifest: dict | None, where: Any = "the run's manifest") -> LatentNorm | None:
    """The normalisation a model was trained with, from its TrainConfig (``data.latent_norm``) and
    its shards' manifest; configs older than the option have no ``data`` section: "scale"."""
    mode = getattr(getattr(cfg, "data", None), "latent_norm", "scale")
    return latent_norm(mode, manifest, cfg.edm.sigma_data, where=str(where))


def draw_latent(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One posterior sample ``(mean + std * eps - shift) * scale`` in float32, on the inputs' device.

    Move the float16 batch to the training device first: drawing ``eps`` there is nearly free,
    while on the CPU it would be the slowest step of the whole input pipeline.
    """
    if mean.shape != std.shape or mean.device != std.device:
        raise ValueError(f"mean {tuple(mean.shape)} on {mean.device} and std {tuple(std.shape)} on {std.device} differ")
    m, s = mean.float(), std.float()
    eps = torch.randn(m.shape, generator=generator, device=m.device, dtype=torch.float32)
    return (m + s * eps - shift_factor) * scaling_factor


class Decoder:
    """What the model generates (B, C, h, w) on the sampling device -> uint8 images (B, H, W, 3) on the
    CPU, undoing the normalisation the model was TRAINED with (see :func:`make_decoder`)."""

    def __init__(self, codec: VAECodec, scaling_factor: float, shift_factor: float, batch_size: int | None,
                 norm: LatentNorm | None) -> None:
        self.codec, self.s_m, self.t_m, self.batch_size, self.norm = codec, scaling_factor, shift_factor, batch_size, norm
        self.same = math.isclose(scaling_factor, codec.scaling_factor) and math.isclose(shift_factor, codec.shift_factor)

    @torch.inference_mode()  # the codec works on inference tensors (its in-place clamp needs this mode)
    def _codec_latents(self, z: torch.Tensor) -> torch.Tensor:
        z = z if self.norm is None else self.norm.undo(z)
        return z if self.same else self.codec.scale(z / self.s_m + self.t_m)

    def _chunks(self, z: torch.Tensor) -> list[torch.Tensor]:
        step = self.batch_size or len(z)
        return [z[i:i + step] for i in range(0, len(z), step)]

    @torch.inference_mode()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.codec.decode_uint8(c) for c in self._chunks(self._codec_latents(z))])

    @torch.inference_mode()
    def start(self, z: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Queue the decode (on a GPU it overlaps whatever is queued next); the call returns the images."""
        if not hasattr(self.codec, "decode_uint8_start"):
            images = self(z)
            return lambda: images
        parts = [self.codec.decode_uint8_start(c) for c in self._chunks(self._codec_latents(z))]
        return lambda: torch.cat([p() for p in parts])


def make_decoder(codec: VAECodec, scaling_factor: float | None = None, shift_factor: float | None = None,
                 batch_size: int | None = None, norm: LatentNorm | None = None) -> Decoder:
    """Decoder through ``codec``, undoing the normalisation the model was TRAINED with.

    ``norm`` (``data.latent_norm=channel``) is undone first. The manifest's factors (what the
    loader used) may differ from the VAE config's (e.g. a dataset-specific scale); latents are
    mapped manifest-scaled -> raw -> codec-scaled, then decoded in chunks of ``batch_size`` (the
    VAE decoder at 256 px is the memory peak).
    """
    s_m = codec.scaling_factor if scaling_factor is None else scaling_factor
    t_m = codec.shift_factor if shift_factor is None else shift_factor
    return Decoder(codec, s_m, t_m, batch_size, norm)


def manifest_decoder(codec: VAECodec, manifest: dict | None, norm: LatentNorm | None,
                     batch_size: int | None = None) -> Decoder:
    """:func:`make_decoder` with the scaling the shards' manifest recorded (the codec's when absent)."""
    vae = (manifest or {}).get("vae") or {}
    return make_decoder(codec, vae.get("scaling_factor"), vae.get("shift_factor"), batch_size, norm)
