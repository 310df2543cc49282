"""latent-patch: Patch Diffusion in the latent space of the Stable Diffusion VAE.

Data flow, one module per stage (docs/design.md has the map):
    sources.py (what the inputs are) + images.py (decode, ADM crop) -> codec.py (VAE; what a latent is) -> shards/ (tar shards +
    manifest) -> loader.py (shards back into batches) -> patches.py (random crops + coordinates)
    -> models/ (DiT, U-Net) -> edm.py (preconditioning, loss, sampler) -> checkpoint.py
    -> the jobs: encode.py, train.py (+ monitor.py, evaluate.py), sampling.py, fid.py
All configs live in config.py.
"""

import os

# Idle OpenMP threads sleep instead of spinning. On a shared or oversubscribed CPU (decode
# workers beside the VAE, other jobs) spinning threads made encoding, training and sampling
# 10-100x slower here. It must be set before torch loads its OpenMP runtime, so it lives here,
# where every entry point passes before importing torch; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["LatentPatchPipeline", "__version__"]


def __getattr__(name: str):
    """``from latent_patch import LatentPatchPipeline`` without importing diffusers' pipelines (~5 s)
    on every ``import latent_patch``: the pipeline module loads on first use."""
    if name == "LatentPatchPipeline":
        from .pipeline import LatentPatchPipeline

        return LatentPatchPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
