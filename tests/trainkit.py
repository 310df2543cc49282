"""Helpers of the training tests (test_train, test_precision, test_schedules, test_compile_cpu):
the tiny config, its shards, and the run's metrics; conftest's ``shards`` fixture uses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from latent_patch import config
from latent_patch.config import TrainConfig
from tests.synthetic_shards import write_latent_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu_dit.yaml"


def write_train_shards(out: Path, n: int = 64, C: int = 4, R: int = 8, num_classes: int = 10, per_shard: int = 32,
                       features: tuple[int, int] | None = None) -> Path:
    """Shards of class templates + small per-sample noise (learnable), std 0.05, scaling 0.5.
    ``features`` (grid, K): also a (grid, grid, K) representation grid per sample, a function
    of its class and place (learnable targets for the alignment loss)."""
    rng = np.random.default_rng(0)
    templates = rng.standard_normal((num_classes, C, R, R)).astype(np.float32)

    def sample(i: int) -> tuple[np.ndarray, np.ndarray, int]:  # drawn in order: one rng stream
        y = i % num_classes
        return templates[y] + 0.1 * rng.standard_normal((C, R, R)), np.full((C, R, R), 0.05), y

    grids = None
    if features is not None:
        grid, k = features
        grids = np.random.default_rng(1).standard_normal((num_classes, grid, grid, k)).astype(np.float32)
    counts = [min(per_shard, n - j) for j in range(0, n, per_shard)]
    write_latent_shards(out, counts, sample, num_classes, (C, R, R), sha256=False, class_prefix="class",
                        source={"path": "synthetic", "kind": "synthetic", "num_inputs": n, "listing_sha256": ""},
                        features=None if grids is None else lambda i: grids[i % num_classes])
    return out


def tiny_cfg(shards: Path, out: Path, *overrides: str) -> TrainConfig:
    base = [f"data.shards={shards}", f"run.out_dir={out}", "run.tensorboard=false"]
    return config.load(TrainConfig, TINY, [*base, *overrides])


def metrics(run: Path) -> dict[int, dict]:
    """Last metrics.jsonl record per step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out
