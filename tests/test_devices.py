"""Device policies chosen from the device TYPE (so the GPU defaults are tested without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latent_patch import config, dist
from latent_patch.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["imagenet256_dit_xl2.yaml", "imagenet256_dit_b2.yaml", "imagenet256_adm_unet.yaml"])
def test_gpu_configs_train_in_bf16_and_compiled_on_cuda(name):
    run = config.load(TrainConfig, CONFIGS / name).run
    assert dist.resolve_precision(run.mixed_precision, "cuda") == "bf16"
    assert dist.resolve_compile(run.compile, "cuda") is True
    assert dist.resolve_compile(run.compile, "cpu") is False  # the same file on a CPU stays eager


def test_auto_defaults_per_device_type():
    run = TrainConfig().run
    assert (run.mixed_precision, run.compile) == ("auto", "auto")
    assert dist.resolve_precision("auto", "cuda") == "bf16" and dist.resolve_precision("auto", "cpu") == "no"
    assert dist.resolve_precision(False, "cuda") == "no" and dist.resolve_precision("fp16", "cuda") == "fp16"
    assert dist.resolve_compile("auto", "cuda") and not dist.resolve_compile("auto", "cpu")
    assert dist.resolve_compile(True, "cpu") and not dist.resolve_compile(False, "cuda")


def test_fid_sampling_defaults_to_fp32_on_every_device():
    """Issue 27: sample.py's network precision is fp32 unless asked (DiT, ADM and EDM2 sample their
    published FIDs in fp32/TF32); bf16 moved the demo's FD (README). No device-dependent 'auto'."""
    from latent_patch.sampling import build_parser

    args = build_parser().parse_args(["--checkpoint", "run", "--out", "out"])
    assert args.amp == "none"
    assert build_parser().parse_args(["--checkpoint", "run", "--out", "out", "--amp", "bf16"]).amp == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--checkpoint", "run", "--out", "out", "--amp", "auto"])


def test_tf32_only_on_cuda(monkeypatch):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        dist.configure_device(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        dist.configure_device(torch.device("cuda", 0))  # sets flags only; needs no GPU
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_compile_network_raises_the_guard_cache_for_the_schedule():
    import torch._dynamo

    old = torch._dynamo.config.cache_size_limit
    try:
        torch._dynamo.config.cache_size_limit = 2
        dist.compile_network(torch.nn.Linear(2, 2), backend="eager", num_shapes=3)
        assert torch._dynamo.config.cache_size_limit >= 3 * 4
    finally:
        torch._dynamo.config.cache_size_limit = old


_HEAP_PROBE = r"""
import json, resource, sys, torch
from latent_patch import dist
from latent_patch.models import ModelConfig, build_model
torch.set_num_threads(1)
dist.KEEP_HEAP_PAD = 64 << 20  # a smaller pad than the default's, so the live set below outgrows it
dist.configure_device(torch.device("cpu"))
torch.manual_seed(0)
net = build_model(ModelConfig(preset="DiT-T/2-2025", num_classes=10, latent_size=16))
x = torch.randn(8, 6, 16, 16)  # 4 latent + 2 coordinate channels
t, y = torch.rand(8), torch.randint(0, 10, (8,))
net(x, t, y).square().mean().backward()
grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
big = torch.randn(1024, 8192)  # 32 MiB: every product is a large temporary
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    (big * 2 + 1).sum()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # 6 x 48 MiB live: beyond the pad and glibc's 32 MiB ceiling for its adaptive threshold
    live = [torch.ones(48 << 18) for _ in range(6)]
    del live
beyond_pad = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": dist.keep_heap(), "faults": faults, "beyond_pad": beyond_pad, "grads": grads.tolist()}))
"""


def _heap_probe(keep: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["LATENT_PATCH_KEEP_HEAP"] = keep
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_runs_keep_the_heap_without_changing_a_number():
    """configure_device(cpu) tells glibc to keep freed memory (dist.keep_heap): large temporaries
    stop page-faulting their memory in anew (fault counts, not time), also where the live set
    outgrows the pad and tensors exceed glibc's adaptive mmap ceiling, and the gradients of a
    DiT-2025 step are the same bits as with glibc's defaults (same thread count and batch)."""
    if dist._glibc() is None:
        pytest.skip("keep_heap tunes glibc's malloc only")
    kept, default = _heap_probe("1"), _heap_probe("0")
    assert kept["kept"] is True and default["kept"] is False
    assert kept["grads"] == default["grads"]
    if default["faults"] < 20 * 8192:  # 4 KiB pages: ~8k per 32 MiB temporary, 20 passes
        pytest.skip(f"glibc's defaults faulted only {default['faults']} times: no per-page churn to remove "
                    "here (transparent huge pages set to 'always'?)")
    assert kept["faults"] < default["faults"] / 4, (kept["faults"], default["faults"])
    # 288 MiB live (~74k pages) three times: kept, only the first pass faults them in
    assert default["beyond_pad"] > 2.5 * 73728 and kept["beyond_pad"] < default["beyond_pad"] / 2, \
        (kept["beyond_pad"], default["beyond_pad"])


def test_keep_heap_leaves_a_users_own_allocator_choice(monkeypatch):
    monkeypatch.setattr(dist, "_heap_kept", None)
    monkeypatch.setattr(dist, "_glibc", lambda: pytest.fail("mallopt must not be reached"))
    for name, value in [("LATENT_PATCH_KEEP_HEAP", "0"), ("MALLOC_TOP_PAD_", "0"),
                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            monkeypatch.setattr(dist, "_heap_kept", None)
            assert dist.keep_heap() is False, name
