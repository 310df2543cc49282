"""One seed mixer for every random stream of the project (training, data order, samples, previews).

A stream is named by a tuple such as ``(run seed, rank, "step")`` or ``("sample", seed, index)``;
its seed is a hash of that tuple, so two streams never share draws, nearby tuples give unrelated
streams (plain ``seed + i`` would make run seed 1 a shifted copy of seed 0), and the value is the
same in every process (Python's ``hash()`` is salted per process).
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the stream's name, e.g. ``derive_seed(seed, rank, "schedule")``."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
