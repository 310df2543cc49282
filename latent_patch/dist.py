"""Processes and devices: rank and world size from torchrun / accelerate env, barriers, the
default device and its settings (TF32 on CUDA, a heap that keeps its pages on the CPU), and
autocast by precision name.

Encoding and sampling split work by (rank, world size) without needing a process group for the
split itself; a gloo/nccl group is only started when the job must synchronise (barriers).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as tdist

# Collective timeout of every process group we make (NCCL's default is 10 min): a first step can
# follow a long checkpoint load or compile on one rank. Long waits by design (the latent cache's
# build, encode listings) poll files instead of sitting in a collective.
GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank/world size as set by torchrun (RANK, WORLD_SIZE, LOCAL_RANK), else by SLURM's srun
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID: without them ``srun python encode_latents.py`` would
    repeat all the work on every task); a plain run is 0 of 1."""
    env = os.environ
    if "WORLD_SIZE" not in env and "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-010,012],cpu01" -> "gpu003"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read its first host")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def adopt_slurm_env() -> None:
    """Under srun without torchrun, write the torchrun-style variables torch and accelerate read
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR = the job's first node, MASTER_PORT from the job
    id); a no-op when torchrun's variables are set or SLURM's are absent."""
    env = os.environ
    if "WORLD_SIZE" in env or "SLURM_NTASKS" not in env or "SLURM_PROCID" not in env:
        return
    info = dist_info()
    if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
        env["MASTER_ADDR"] = first_host(env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
        env["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))


def init_process_group() -> bool:
    """Start the default process group when launched by torchrun with more than one process.

    NCCL when CUDA is available, gloo otherwise (so the same code path is tested on the CPU).
    Returns True when a group is (now) active.
    """
    info = dist_info()
    if info.world_size <= 1:
        return False
    if tdist.is_initialized():
        return True
    adopt_slurm_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)  # local rank, not global rank: multi-node safe
    tdist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
    return True


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def _group_device() -> torch.device:
    return default_device() if tdist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (UTF-8 bytes in a tensor: nothing is pickled); as is alone."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return text
    dev = _group_device()
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=dev)
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    tdist.broadcast(size, src=0)
    buf = data if tdist.get_rank() == 0 else torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
    tdist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode()


def same_on_all_ranks(text: str) -> bool:
    """Do all ranks hold the same ``text``? (its sha256 gathered from every rank; True alone)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return True
    import hashlib

    dev = _group_device()
    mine = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8, device=dev)
    every = [torch.zeros_like(mine) for _ in range(tdist.get_world_size())]
    tdist.all_gather(every, mine)
    return all(torch.equal(e, every[0]) for e in every)


def sum_over_ranks(value: int) -> int:
    """``value`` summed over every rank (itself alone): totals for a job's summary line."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_group_device())
    tdist.all_reduce(t)
    return int(t.item())


def destroy() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info().local_rank)
    return torch.device("cpu")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
"""Precision names accepted on command lines and in configs."""


def autocast(device: torch.device, dtype: torch.dtype | str | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` ("none", None or fp32: a no-op context)."""
    if dtype in (None, "none", "no"):
        return contextlib.nullcontext()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# --------------------------------------------------------------------------- device policies
# Resolved from the device TYPE, so the GPU defaults are chosen (and tested) without a GPU.

def resolve_precision(setting: str | bool, device_type: str) -> str:
    """Training autocast: "auto" is bf16 on CUDA (no loss scaling needed) and fp32 ("no") elsewhere."""
    if setting is False:
        return "no"
    if setting == "auto":
        return "bf16" if device_type == "cuda" else "no"
    return str(setting)


def resolve_compile(setting: str | bool, device_type: str) -> bool:
    """torch.compile: "auto" compiles on CUDA only. On the CPU it needs a C++ compiler and minutes
    of compiling, and its float rounding differs from eager steps; for long runs it pays (DiT-S/2:
    +6 % with the 2022 block, +19 % with the 2025 one; BENCHMARKS.md), so there it is opt-in."""
    if setting == "auto":
        return device_type == "cuda"
    return bool(setting)


def configure_device(device: torch.device) -> None:
    """TF32 for every fp32 matmul and convolution on CUDA (about 8x the fp32 rate, ~fp16 mantissa,
    fp32 range). On the CPU no number changes; only the host allocator keeps its pages (keep_heap)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_heap()


KEEP_HEAP_PAD = 512 << 20
"""Slack each glibc heap extension takes (M_TOP_PAD): a step's temporaries reuse mapped pages."""
KEEP_HEAP_TRIM = 1 << 30
"""Free memory at the heap's top beyond this goes back to the system (M_TRIM_THRESHOLD)."""
KEEP_HEAP_MMAP = 1 << 30
"""Only blocks this large get a mapping of their own (M_MMAP_THRESHOLD). Setting the pad freezes
glibc's adaptive threshold wherever it stands (128 KiB to 32 MiB), and every tensor above it
would be mapped and unmapped anew whenever the heap's top is short."""
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)


def keep_heap() -> bool:
    """Tell glibc's malloc to keep the memory a CPU run frees, once per process; True if it did.

    Why: with glibc's defaults every large temporary grows the heap (or gets its own mapping)
    and goes back to the system when freed, so the next one page-faults its memory in again, and
    a DiT step makes many (figures: BENCHMARKS.md, "The CPU allocator default"). PyTorch's CPU
    guide reaches the same by preloading jemalloc/tcmalloc; this needs nothing installed, and no
    computed number changes (only where tensors live). The cost: up to 1 GiB of freed memory at
    the heap's top stays resident per process (KEEP_HEAP_TRIM). Left to the user where they chose already: a
    ``MALLOC_*_`` variable, ``glibc.malloc`` in ``GLIBC_TUNABLES``, another allocator in
    ``LD_PRELOAD``, or ``LATENT_PATCH_KEEP_HEAP=0``. A no-op off glibc.
    """
    global _heap_kept
    if _heap_kept is not None:
        return _heap_kept
    env = os.environ
    chosen = (env.get("LATENT_PATCH_KEEP_HEAP", "1") == "0" or any(k.startswith("MALLOC_") and k.endswith("_") for k in env)
              or "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or "malloc" in env.get("LD_PRELOAD", ""))
    libc = None if chosen else _glibc()
    settings = ((_M_TOP_PAD, KEEP_HEAP_PAD), (_M_TRIM_THRESHOLD, KEEP_HEAP_TRIM), (_M_MMAP_THRESHOLD, KEEP_HEAP_MMAP))
    _heap_kept = libc is not None and all([libc.mallopt(param, value) for param, value in settings])
    return _heap_kept


_heap_kept: bool | None = None


def _glibc():
    """The C library when it is glibc (it has gnu_get_libc_version), else None (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc
    except (OSError, AttributeError):
        return None
    return libc


def compile_network(net: torch.nn.Module, backend: str = "inductor", num_shapes: int = 1,
                    mode: str | None = None) -> torch.nn.Module:
    """``torch.compile`` with static shapes: one graph per input shape (a patch side, a batch size),
    never a dynamic-shape graph, and a guard cache big enough that the schedule's shapes never
    evict each other (which would recompile at every change of side)."""
    import torch._dynamo

    needed = 4 * num_shapes + 4  # train/eval and grad/no-grad variants of every shape, and slack
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, needed)
    limit = getattr(torch._dynamo.config, "accumulated_cache_size_limit", None)
    if limit is not None:
        torch._dynamo.config.accumulated_cache_size_limit = max(limit, 4 * needed)
    return torch.compile(net, backend=backend, dynamic=False, mode=mode)
