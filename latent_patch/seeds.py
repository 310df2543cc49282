"""One seed mixer for every random stream of the project (training, data order, samples, previews).

A stream is named by a tuple such as ``(run seed, rank, "step")`` or ``("sample", seed, index)``;
its seed is a hash of that tuple, so two streams never share draws, nearby tuples give unrelated
streams (plain ``seed + i`` would make run seed 1 a shifted copy of seed 0), and the value is the
same in every process (Python's ``hash()`` is salted per process).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the stream's name, e.g. ``derive_seed(seed, rank, "schedule")``."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def global_rng_state() -> dict[str, Any]:
    """torch's (CPU and CUDA), Python's and numpy's global streams, as tensors and plain values:
    a checkpoint read with ``torch.load(weights_only=True)`` holds them (it cannot hold ndarrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` captured."""
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    s = state["numpy"]
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
