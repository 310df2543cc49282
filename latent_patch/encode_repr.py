"""The encoding job's representation targets (``encode_latents.py --repr``): the frozen encoder
set up for one run, its PCA fitted once per output folder, each batch's feature grids (timed apart
from the VAE) and the job's and the manifest's ``repr`` entries.

``represent.py`` is the encoder and the PCA's arithmetic; this module is what a resumable,
split job adds around them. The PCA must be ONE fit shared by every shard, whichever process or
job writes it: the first process to take ``OUT/repr_pca.lock`` encodes a seeded sample of the
training images, fits, and publishes ``OUT/repr_pca.json`` atomically; every other process and
every later run (a resume, another job of the split) reads that file (:func:`shared_pca`, the same
``filelock.do_once`` protocol as the source's listing). The fit's settings and a digest of its
result join the job's identity (``job.json``), so a resume with another encoder, K or seed is
refused instead of mixing two kinds of grid in one set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import filelock, fsutil
from .config import EncodeConfig
from .represent import ReprEncoder, apply_pca, fit_pca, pca_from_json, pca_to_json, sample_for_pca
from .seeds import derive_seed
from .shards.reader import REPR_EXT

log = logging.getLogger(__name__)

PCA_FILE = "repr_pca.json"  # the fit every process reads: its identity, its record, its parameters
PCA_LOCK = "repr_pca.lock"  # held (O_EXCL) by the one process fitting
PCA_FORMAT = "latent-patch-repr-pca/1"
PCA_DIGEST_KEY = "repr.pca.sha256"  # job.json's key that only a finished fit can fill
REPA_SIZE = 224  # REPA's DINOv2 input at 256 px; preprocess_raw_image uses 224 * (resolution // 256)

PixelBatches = Callable[[list[int]], Iterable[torch.Tensor]]
"""Input indices -> their [-1, 1] NCHW pixel batches on the encoder's device, bad images left out
(the job's own decode path, so the PCA sees what the shards will hold)."""


# ----------------------------------------------------------------------------- the encoder


def input_size(cfg: EncodeConfig) -> int | None:
    """``--repr-size``; else a folder's own size (None); else, for a hub id, REPA's rule: 224 px
    per 256 px of image (224 at ImageNet-256, 448 at 512)."""
    if cfg.repr_size is not None:
        return cfg.repr_size
    if cfg.repr == "demo" or Path(str(cfg.repr)).expanduser().is_dir():
        return None
    return REPA_SIZE * max(1, cfg.resolution // 256)


def load_encoder(cfg: EncodeConfig, device: torch.device, dtype: torch.dtype) -> ReprEncoder:
    """The run's encoder (the VAE's dtype on a GPU, fp32 on a CPU); errors start with the flag."""
    try:
        enc = ReprEncoder.load(str(cfg.repr), device=device, dtype=dtype, image_size=input_size(cfg))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise type(err)(f"--repr {cfg.repr}: {err}") from err
    if cfg.repr_dims is not None and cfg.repr_dims > enc.dim:
        raise ValueError(f"--repr-dims {cfg.repr_dims} is more than the encoder's token dimension "
                         f"{enc.dim} (--repr {cfg.repr}): a PCA keeps at most D dims")
    return enc


def job_entry(cfg: EncodeConfig, enc: ReprEncoder, pca_sha256: str | None = None) -> dict:
    """``job.json``'s ``repr``: what must stay equal for a resumed or parallel run (the encoder,
    the stored dims, the fit's settings and, once fitted, its digest)."""
    pca = None if cfg.repr_dims is None else {
        "images": cfg.repr_pca_images, "tokens": cfg.repr_pca_tokens, "seed": cfg.repr_pca_seed,
        "sha256": pca_sha256}
    return {"encoder": enc.describe(), "dims": cfg.repr_dims or enc.dim, "pca": pca}


# ----------------------------------------------------------------------------- the shared PCA


def pca_inputs(num_inputs: int, count: int, seed: int) -> list[int]:
    """The PCA's images: the first ``count`` of a seeded permutation of the listing (a sample
    across the classes of a class-sorted source), independent of the split into processes."""
    rng = np.random.default_rng(derive_seed("repr-pca-images", seed, num_inputs) % 2**63)
    return [int(i) for i in rng.permutation(num_inputs)[:count]]


def _tokens_check(cfg: EncodeConfig, enc: ReprEncoder, images: int) -> None:
    """K <= the tokens the fit sees, checked before (and after) encoding them."""
    tokens = min(cfg.repr_pca_tokens, images * enc.grid[0] * enc.grid[1])
    if cfg.repr_dims is not None and cfg.repr_dims > tokens:
        raise ValueError(f"--repr-dims {cfg.repr_dims} is more than the {tokens} tokens the PCA sees "
                         f"({images} images of --repr-pca-images {cfg.repr_pca_images} x "
                         f"{enc.grid[0] * enc.grid[1]} tokens, at most --repr-pca-tokens "
                         f"{cfg.repr_pca_tokens})")


def pca_identity(cfg: EncodeConfig, enc: ReprEncoder, listing_sha256: str) -> dict:
    """What a published fit must match to be reused: encoder, settings, the listing it sampled."""
    return {"encoder": enc.describe(), "dims": cfg.repr_dims, "images": cfg.repr_pca_images,
            "tokens": cfg.repr_pca_tokens, "seed": cfg.repr_pca_seed, "listing_sha256": listing_sha256}


def pca_digest(pca: dict[str, np.ndarray]) -> str:
    """Short fingerprint of a fit's parameters (job.json's ``repr.pca.sha256``)."""
    return hashlib.sha256(json.dumps(pca_to_json(pca), sort_keys=True).encode()).hexdigest()[:16]


def shared_pca(cfg: EncodeConfig, enc: ReprEncoder, listing_sha256: str, num_inputs: int,
               batches: PixelBatches) -> tuple[dict[str, np.ndarray], dict]:
    """(the PCA, its record) fitted once per output folder, whoever fits it (module docstring).

    A published fit of other settings (a run killed before it claimed the folder, then started
    with other flags) is fitted again: a folder with shards is refused earlier, by job.json."""
    out = Path(cfg.out)
    path, ident = out / PCA_FILE, pca_identity(cfg, enc, listing_sha256)

    def ready() -> tuple[dict[str, np.ndarray], dict] | None:
        return _read_pca(path, ident)

    def work() -> tuple[dict[str, np.ndarray], dict]:
        return _fit_and_publish(cfg, enc, ident, pca_inputs(num_inputs, cfg.repr_pca_images,
                                                             cfg.repr_pca_seed), batches, path)

    _tokens_check(cfg, enc, min(cfg.repr_pca_images, num_inputs))
    return filelock.do_once(out / PCA_LOCK, ready, work, f"the representation PCA {path}")


def _read_pca(path: Path, ident: dict) -> tuple[dict[str, np.ndarray], dict] | None:
    """The published fit when it is this job's; None when absent or fitted for other settings."""
    if not path.is_file():
        return None
    rec = fsutil.read_json(path)
    if not isinstance(rec, dict) or rec.get("format") != PCA_FORMAT or rec.get("identity") != ident:
        log.info("%s: fitted for other settings; fitting again", path)
        return None
    try:
        return pca_from_json(rec["pca"]), rec["fit"]
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: {err} (delete it to fit again)") from err


def _fit_and_publish(cfg: EncodeConfig, enc: ReprEncoder, ident: dict, inputs: list[int],
                     batches: PixelBatches, path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Encode the sample, keep a seeded token subset, fit, and publish atomically."""
    t0, seen = time.perf_counter(), [0]

    def grids() -> Iterator[torch.Tensor]:
        for x in batches(inputs):
            seen[0] += len(x)
            yield enc.encode(x)

    tokens = sample_for_pca(grids(), cfg.repr_pca_tokens, cfg.repr_pca_seed)
    _tokens_check(cfg, enc, seen[0])
    pca = fit_pca(tokens, int(cfg.repr_dims))
    fit = {"images": seen[0], "tokens": len(tokens), "seed": cfg.repr_pca_seed,
           "explained_variance": round(float(pca["explained_variance_ratio"].sum()), 6),
           "seconds": round(time.perf_counter() - t0, 3), "flops": seen[0] * enc.forward_flops_per_image()}
    fsutil.atomic_write_json(path, {"format": PCA_FORMAT, "identity": ident, "fit": fit, "pca": pca_to_json(pca)})
    print(f"fitted the representation PCA to {cfg.repr_dims} of {enc.dim} dims on {len(tokens)} tokens of "
          f"{seen[0]} images ({fit['explained_variance']:.1%} of their variance) in {fit['seconds']:.1f} s "
          f"-> {path} (shared by every process)", flush=True)
    return pca, fit


# ----------------------------------------------------------------------------- per batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReprTargets:
    """One run's encoder and (optional) PCA: feature grids per batch, with the encoder's own time."""

    def __init__(self, enc: ReprEncoder, pca: dict[str, np.ndarray] | None = None,
                 fit: dict | None = None) -> None:
        self.encoder, self.pca, self.fit = enc, pca, fit
        self.dims = enc.dim if pca is None else int(pca["components"].shape[0])
        self.flops_per_image = enc.forward_flops_per_image()
        self.seconds = 0.0  # since the last take_seconds()
        # the components on the device once, not copied per batch (apply_pca takes tensors as they are)
        self._pca_dev = None if pca is None else {
            k: torch.as_tensor(pca[k], dtype=torch.float32, device=enc.device) for k in ("mean", "components")}

    def features(self, x: torch.Tensor) -> np.ndarray:
        """[-1, 1] NCHW pixels -> float16 (B, gh, gw, K) grids on the host; the time from a synced
        device to the grids' arrival counts as the encoder's (PCA projection included)."""
        _sync(self.encoder.device)
        t = time.perf_counter()
        grid = self.encoder.encode(x)
        if self._pca_dev is not None:
            grid = apply_pca(grid, self._pca_dev)
        out = grid.cpu().numpy()
        self.seconds += time.perf_counter() - t
        return out

    def take_seconds(self) -> float:
        """The encoder's time since the last call (a shard's share, for its sidecar)."""
        secs, self.seconds = self.seconds, 0.0
        return secs

    def manifest_entry(self) -> dict:
        """The manifest's ``repr`` (``seconds`` and ``flops`` are summed in by assemble_manifest)."""
        pca = None if self.pca is None else {**(self.fit or {}), **pca_to_json(self.pca)}
        return {"member": REPR_EXT, **self.encoder.describe(), "dims": self.dims, "dtype": "float16",
                "pca": pca, "flops_per_image": self.flops_per_image}
