"""The shard format: VAE posteriors of a dataset as webdataset-layout tar shards plus a manifest.

One sample per source image (two with flips): ``KEY.latent.npy`` (float16 ``(2, C, h, w)``: the
UNSCALED posterior mean and std), ``KEY.cls`` (ASCII class index), ``KEY.json`` (provenance,
never read back) and, encoded with ``--repr``, ``KEY.repr.npy`` (float16 ``(gh, gw, K)`` feature
grid). ``manifest.json`` lists the shards with counts and sha256 and carries what training needs:
latent shape, class names and counts, the VAE and its factors, latent statistics, the grids' ``repr``.

- ``writer``:   the encoder's side: tars, sidecars, atomic commit of each shard.
- ``manifest``: file names, the manifest (assemble, write, read and check).
- ``verify``:   a whole set checked against its manifest (sha256, counts, indexes).
- ``reader``:   the loader's side: one shard's samples (or a range, found by the shard's index),
                checked, without unpickling anything.
"""

from .manifest import (
    FORMAT, JOB_FILE, MANIFEST, URL_SCHEME, ShardError, assemble_manifest, manifest_file, num_shards_for,
    open_manifest, read_sidecars, shard_name, shard_paths, sidecar_name, write_manifest,
)
from .reader import (
    INDEX_SUFFIX, LABEL_EXT, LATENT_EXT, SampleDecoder, ShardRef, index_path, read_shard, refs_from_manifest,
    refs_from_urls, scan_offsets, with_indexes,
)
from .verify import verify_shards
from .writer import (
    LatentStats, ShardBuilder, TarStream, encode_sample, is_complete, npy_bytes, remove_stale, sample_key,
)

__all__ = [
    "FORMAT", "JOB_FILE", "MANIFEST", "URL_SCHEME", "ShardError", "assemble_manifest", "manifest_file",
    "num_shards_for", "open_manifest", "read_sidecars", "shard_name", "shard_paths", "sidecar_name",
    "verify_shards", "write_manifest", "INDEX_SUFFIX", "index_path", "scan_offsets", "with_indexes", "LABEL_EXT", "LATENT_EXT", "SampleDecoder", "ShardRef", "read_shard",
    "refs_from_manifest", "refs_from_urls", "LatentStats", "ShardBuilder", "TarStream", "encode_sample",
    "is_complete", "npy_bytes", "remove_stale", "sample_key",
]
