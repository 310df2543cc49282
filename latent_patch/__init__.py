"""latent-patch: Patch Diffusion in the latent space of the Stable Diffusion VAE.

Data flow, one module per stage:
    images.py (source images, ADM crop) -> codec.py (VAE) -> shards.py (tar shards + manifest)
    -> loader.py (shards back into batches) -> patches.py (random crops + coordinates)
    -> models/ (DiT, U-Net) -> edm.py (preconditioning, loss, sampler) -> train.py / sampling.py
    -> codec.py (decode) -> fid.py
"""

__version__ = "0.1.0"
