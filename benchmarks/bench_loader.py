"""How fast do latents come out of the loader, next to the floor set by reading the tars at all?

Builds temporary shard sets at the ImageNet-256 latent size (mean and std 4x32x32 float16,
stacked as (2, 4, 32, 32) per design.md, plus cls and json members), written by webdataset's
TarWriter (so without the encoder's sample index: the loader makes it once, timed apart as
``index_once_s``), and measures on each set, in one process:

(a) streaming: an exact pass of the real loader (batch 256, in-process reader, the default 256
    streams) against Python's tarfile reading every member's bytes of the same shards; target
    ratio >= 0.85 on every set;
(b) in memory: random batch gathers from the in-RAM array; target >= 200,000 samples/s.

The sets: ``--quick`` the small one (6,000 samples in 1,000-sample shards: each shard cut among
~43 streams); the full run adds a mid-size one (60,000 samples: each shard cut among ~4 streams,
the case where a stream that parsed its shard from the start cost several times the read);
``--samples/--per-shard`` one set of your own. Generated in a temporary folder, never kept.
Both reads run from the page cache (one untimed warm-up read), alternate, and the best of
several rounds is kept, so a busy shared machine disturbs the ratio as little as possible.
Last stdout line: one JSON object (``ratio``: the lowest of the sets; ``sets``: each one's figures).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from latent_patch.config import DataConfig  # noqa: E402
from latent_patch.loader import build_loader  # noqa: E402
from latent_patch.shards import open_manifest, refs_from_manifest, with_indexes  # noqa: E402

LATENT = (4, 32, 32)


def write_shards(root: Path, num_samples: int, per_shard: int, seed: int = 0) -> None:
    """Shards and manifest in the design.md format (sha256 left empty: verification is off)."""
    rng = np.random.default_rng(seed)
    entries = []
    for j, start in enumerate(range(0, num_samples, per_shard)):
        n = min(per_shard, num_samples - start)
        lat = rng.standard_normal((n, 2, *LATENT), dtype=np.float32).astype(np.float16)
        name = f"shard-{j:06d}.tar"
        with wds.TarWriter(str(root / name), encoder=False, mtime=0) as w:
            for i in range(n):
                b = io.BytesIO()
                np.save(b, lat[i], allow_pickle=False)
                idx = start + i
                w.write({"__key__": f"{idx:08d}_img{idx}", "latent.npy": b.getvalue(),
                         "cls": str(idx % 1000).encode(),
                         "json": json.dumps({"source": f"n0/img{idx}.JPEG", "flip": False}).encode()})
        entries.append({"name": name, "num_samples": n, "sha256": ""})
    manifest = {"format": "latent-patch-shards/1", "num_samples": num_samples, "num_images": num_samples,
                "class_names": [f"c{k}" for k in range(1000)], "resolution": 256, "latent_shape": list(LATENT),
                "vae": {"id": "bench", "scaling_factor": 0.18215, "shift_factor": 0.0, "latent_channels": 4,
                        "downsample": 8},
                "flips": "none", "shards": entries, "skipped": [], "source": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def raw_read(root: Path) -> int:
    """The floor: tarfile reading every member's bytes, nothing decoded; returns samples."""
    members = 0
    for path in sorted(root.glob("shard-*.tar")):
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile():
                    tf.extractfile(m).read()
                    members += 1
    return members // 3  # latent.npy, cls, json


def loader_pass(root: Path, batch: int) -> int:
    """One exact pass of the real streaming loader, in-process, into training batches."""
    cfg = DataConfig(shards=str(root), batch_size=batch, num_workers=0, shuffle_buffer=2000)
    n = 0
    for b in build_loader(cfg, infinite=False):
        n += len(b.label)
    return n


def rate(fn, *args) -> float:
    t = time.perf_counter()
    n = fn(*args)
    return n / (time.perf_counter() - t)


def memory_rate(root: Path, batch: int, seconds: float, rounds: int) -> tuple[float, float, int]:
    """(best gather samples/s, load seconds, samples) for the in-memory mode."""
    t = time.perf_counter()
    loader = build_loader(DataConfig(shards=str(root), batch_size=batch, in_memory=True, num_workers=0))
    load_s = time.perf_counter() - t
    it = iter(loader)
    for _ in range(20):
        next(it)
    best = 0.0
    for _ in range(rounds):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            n += len(next(it).label)
        best = max(best, n / (time.perf_counter() - t))
    return best, load_s, len(loader.latents)


def index_once(root: Path) -> float:
    """Seconds to make the sample index of shards written without one (once per shard set)."""
    t = time.perf_counter()
    with_indexes(refs_from_manifest(open_manifest(root), root))
    return time.perf_counter() - t


def measure_set(samples: int, per_shard: int, batch: int, rounds: int) -> dict:
    """Write one set, then alternate raw reads and loader passes; the figures of the best rounds."""
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_shards(root, samples, per_shard)
        shards = len(list(root.glob("*.tar")))
        print(f"== {samples} samples in {shards} shards of {per_shard} (written in {time.perf_counter() - t:.1f} s)")
        index_s = index_once(root)
        print(f"sample index     : made once in {index_s:.2f} s (the encoder writes it with each shard)")
        raw_read(root)  # warm the page cache for both paths
        raws, loads = [], []
        for _ in range(rounds):
            raws.append(rate(raw_read, root))
            loads.append(rate(loader_pass, root, batch))
        raw_best, load_best = max(raws), max(loads)
        print(f"raw tarfile read : best {raw_best:9.0f}  median {statistics.median(raws):9.0f} samples/s")
        print(f"streaming loader : best {load_best:9.0f}  median {statistics.median(loads):9.0f} samples/s"
              f"  (exact pass, batch {batch}, in-process reader, shuffle buffer 2000)")
        print(f"ratio loader/raw : {load_best / raw_best:.2f} (target >= 0.85)")
        mem, load_s, n = memory_rate(root, batch, 0.5, 2 * rounds)
        print(f"in-memory        : loaded {n} samples in {load_s:.1f} s; gather {mem:9.0f} samples/s (target >= 200000)")
    return {"samples": samples, "per_shard": per_shard, "shards": shards, "ratio": round(load_best / raw_best, 3),
            "loader_samples_s": round(load_best), "raw_samples_s": round(raw_best),
            "loader_median_samples_s": round(statistics.median(loads)),
            "raw_median_samples_s": round(statistics.median(raws)), "index_once_s": round(index_s, 3),
            "memory_samples_s": round(mem), "memory_load_s": round(load_s, 2)}


QUICK_SET = (6000, 1000)
MIDSIZE_SET = (60000, 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small set only (finishes well within 60 s)")
    ap.add_argument("--samples", type=int, default=None,
                    help="one set of this many samples instead (default: 6000, then 60000 unless --quick)")
    ap.add_argument("--per-shard", type=int, default=1000, help="samples per shard of --samples' set (1000)")
    ap.add_argument("--batch", type=int, default=256, help="loader batch size (256)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per path (5; 3 with --quick)")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    sets = ([(args.samples, args.per_shard)] if args.samples else [QUICK_SET] if args.quick
            else [QUICK_SET, MIDSIZE_SET])
    results = [measure_set(n, per, args.batch, rounds) for n, per in sets]
    low = min(results, key=lambda r: r["ratio"])
    print(f"lowest ratio {low['ratio']:.2f} over {len(results)} set(s) (target >= 0.85 on each)")
    print(json.dumps({
        "ratio": low["ratio"], "loader_samples_s": low["loader_samples_s"], "raw_samples_s": low["raw_samples_s"],
        "memory_samples_s": min(r["memory_samples_s"] for r in results), "sets": results,
        "batch": args.batch, "rounds": rounds, "latent": [2, *LATENT], "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
