"""The shared low-level helpers: .npy headers, the background writer, the seed mixer."""

from __future__ import annotations

import hashlib
import io
import threading
import time

import numpy as np
import pytest

from latent_patch import fsutil
from latent_patch.seeds import derive_seed


@pytest.mark.parametrize("shape, dtype", [((2, 4, 32, 32), "<f2"), ((50, 64, 64, 3), "|u1"), ((7,), "<i8"), ((), "<f4")])
def test_npy_header_is_what_np_save_writes(shape, dtype):
    buf = io.BytesIO()
    a = np.zeros(shape, dtype=dtype)
    np.save(buf, a, allow_pickle=False)
    assert buf.getvalue() == fsutil.npy_header(shape, dtype) + a.tobytes()


def test_background_writer_keeps_order_bounds_the_queue_and_reraises(tmp_path):
    done, most = [], [0]
    writer = fsutil.BackgroundWriter(depth=2)

    def slow(i: int) -> None:
        time.sleep(0.02)
        done.append(i)

    for i in range(6):
        writer.submit(slow, i)
        most[0] = max(most[0], len(writer.pending))
    writer.wait()
    assert done == list(range(6)) and most[0] <= 2

    def fail() -> None:
        raise OSError("disk full")

    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):  # surfaces in the caller's thread
        writer.close()
    assert not any(t.name.startswith("writer") and t.is_alive() for t in threading.enumerate())


def test_derive_seed_is_stable_and_separates_streams():
    expect = int.from_bytes(hashlib.sha256(b"0/1/step").digest()[:8], "little") & (2**63 - 1)
    assert derive_seed(0, 1, "step") == expect  # the training streams of older checkpoints keep their values
    seeds = {derive_seed("sample", 0, i) for i in range(1000)} | {derive_seed("sample", 1, i) for i in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)
