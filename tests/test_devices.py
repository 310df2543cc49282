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
