"""Reduced precision that users rely on: fp16 training with loss scaling (the GradScaler's state
across a resume), sample.py's --amp, the VAE's fp16/bf16 decode with its fp32 redo on overflow,
and --decode-dtype.

fp16 training needs CUDA in the product (``train.build_accelerator`` refuses it on the CPU, and
accelerate would silently run CPU "fp16" in fp32). On the CPU the loss-scaling path is exercised
with a faithful stand-in: an accelerate ``Accelerator`` whose fp16 autocast and
``torch.amp.GradScaler("cpu")`` are switched on by hand, so accelerate's own backward / unscale /
step / update code runs with a real scaler; the real CUDA path has its own test (skipped here).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import sample as sample_cli
from latent_patch import checkpoint as ck
from latent_patch import codec as codec_mod
from latent_patch.codec import VAECodec
from tests.test_sampling import _tiny_vae, _write_checkpoint, load_npz  # noqa: F401
from tests.trainkit import metrics, tiny_cfg

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

INIT_SCALE = 2.0**24  # overflows fp16 gradients at first: the scaler must back off, so its state moves


# --------------------------------------------------------------------------- fp16 training, loss scaling

def scaler_states_at_resume(monkeypatch) -> list:
    """The loss scaler's state right after each ``checkpoint.resume`` (a spy around the real one)."""
    restored: list = []
    real_resume = ck.resume

    def resume(run, ckpt):
        real_resume(run, ckpt)
        restored.append(run.accelerator.scaler.state_dict())

    monkeypatch.setattr(ck, "resume", resume)
    return restored


def _cpu_fp16_accelerator(made: list):
    """train.build_accelerator's stand-in: accelerate's fp16 machinery switched on for the CPU."""

    def build(cfg, with_trackers: bool = True):
        from accelerate import Accelerator

        acc = Accelerator(cpu=True, mixed_precision="fp16", project_dir=cfg.run.out_dir)
        assert acc.scaler is None  # accelerate leaves CPU fp16 off; the product refuses it (next test)
        acc.native_amp = True  # prepare() now wraps the forward in fp16 autocast
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=3)
        made.append(acc)
        return acc

    return build


def test_fp16_loss_scaler_state_is_saved_and_restored_on_resume(shards, tmp_path, monkeypatch):  # noqa: F811
    import latent_patch.train as train_mod

    made: list = []
    monkeypatch.setattr(train_mod, "build_accelerator", _cpu_fp16_accelerator(made))
    restored = scaler_states_at_resume(monkeypatch)
    # the autocast really is fp16 inside the network
    seen: set = set()
    real_build = train_mod.build_trainer

    def build_trainer(*a, **k):
        tr = real_build(*a, **k)
        tr.net.x_embedder.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        return tr

    monkeypatch.setattr(train_mod, "build_trainer", build_trainer)
    common = ["run.total_patches=480", "run.log_every_patches=1", "run.ckpt_every_patches=240", "run.keep_last=0",
              "run.mixed_precision=fp16"]
    train_mod.train(tiny_cfg(shards, tmp_path / "a", *common))
    assert seen == {torch.float16}
    mid_step, mid = ck.list_complete(tmp_path / "a")[0]
    saved = ck.load_state(mid / ck.STATE_FILE)["scaler"]
    assert isinstance(saved, dict), saved  # the fp16 run saved its scaler
    assert set(saved) >= {"scale", "_growth_tracker"} and saved["growth_interval"] == 3
    assert saved["scale"] < INIT_SCALE  # overflowing steps were skipped and the scale backed off
    assert made[0].scaler.get_scale() != INIT_SCALE
    # resume from the middle into another folder: a FRESH scaler (init 2^24) gets the saved state ...
    train_mod.train(tiny_cfg(shards, tmp_path / "b", *common), str(mid))
    assert restored == [saved]
    # ... and the continuation is the uninterrupted run's, loss for loss (a scaler restarted at
    # 2^24 would skip the next steps as overflows and the losses would part)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert sorted(b) == [s for s in sorted(a) if s > mid_step] and len(b) >= 5
    assert all(a[s]["loss"] == b[s]["loss"] for s in b), [(s, a[s]["loss"], b[s]["loss"]) for s in b]
    final_a = ck.load_state(ck.find_latest(tmp_path / "a") / ck.STATE_FILE)["scaler"]
    final_b = ck.load_state(ck.find_latest(tmp_path / "b") / ck.STATE_FILE)["scaler"]
    assert final_a == final_b


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal only")
def test_fp16_on_the_cpu_is_refused_naming_the_key(shards, tmp_path, capsys):  # noqa: F811
    from train_latent import main

    from tests.trainkit import TINY

    rc = main(["--config", str(TINY), f"data.shards={shards}", f"run.out_dir={tmp_path / 'run'}",
               "run.tensorboard=false", "run.mixed_precision=fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1] == ("train_latent.py: error: run.mixed_precision=fp16 needs a CUDA GPU (loss scaling); "
                                   "on the CPU use bf16 or no")
    assert not (tmp_path / "run").exists()  # refused before the run folder gets any file


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs CUDA (GPU suite)")
def test_fp16_on_cuda_scales_the_loss_and_resumes_the_scaler(shards, tmp_path, monkeypatch):  # noqa: F811
    import latent_patch.train as train_mod

    restored = scaler_states_at_resume(monkeypatch)
    common = ["run.total_patches=480", "run.log_every_patches=1", "run.ckpt_every_patches=240", "run.keep_last=0",
              "run.mixed_precision=fp16", "run.compile=false"]
    train_mod.train(tiny_cfg(shards, tmp_path / "a", *common))
    _, mid = ck.list_complete(tmp_path / "a")[0]
    saved = ck.load_state(mid / ck.STATE_FILE)["scaler"]
    assert saved and saved["scale"] > 0 and "_growth_tracker" in saved
    train_mod.train(tiny_cfg(shards, tmp_path / "b", *common), str(mid))
    assert restored == [saved]
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "b").values())


# --------------------------------------------------------------------------- sample.py --amp, --decode-dtype

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("amp")
    _tiny_vae(root / "vae")
    _write_checkpoint(root / "run", root / "vae")
    return root / "run"


def _sample(run: Path, out: Path, *flags: str) -> tuple[np.ndarray, dict]:
    sample_cli.main(["--checkpoint", str(run), "--out", str(out), "--num-samples", "3", "--batch-size", "3",
                     "--steps", "2", "--save", "npz", "--grid", "0", "--no-progress", *flags])
    return load_npz(out)[0], json.loads((out / "sampling.json").read_text())["identity"]


def _net_dtypes(monkeypatch) -> set:
    """The dtypes the network's first linear layer computes in, whichever run loads it next."""
    seen: set = set()
    real = ck.load_inference_model

    def load(*a, **k):
        net, cfg, manifest = real(*a, **k)
        net.x_embedder.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        return net, cfg, manifest

    monkeypatch.setattr(ck, "load_inference_model", load)
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_amp_bf16_runs_the_network_in_bf16_and_is_recorded(run, tmp_path, monkeypatch, capsys):
    seen = _net_dtypes(monkeypatch)
    bf16, ident = _sample(run, tmp_path / "bf16", "--amp", "bf16")
    assert seen == {torch.bfloat16} and ident["amp"] == "bf16"
    seen.clear()
    fp32, ident_none = _sample(run, tmp_path / "none", "--amp", "none")
    assert seen == {torch.float32} and ident_none["amp"] == "none"
    seen.clear()
    _, ident_auto = _sample(run, tmp_path / "auto")  # auto is fp32 on the CPU
    assert seen == {torch.float32} and ident_auto["amp"] == "none"
    assert bf16.shape == fp32.shape == (3, 16, 16, 3) and not np.array_equal(bf16, fp32)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the recorded setting guards the folder
        _sample(run, tmp_path / "bf16", "--amp", "none")
    assert "amp: 'bf16' -> 'none'" in capsys.readouterr().err


def _vae_dtypes(monkeypatch) -> set:
    seen: set = set()
    real = VAECodec.load.__func__

    def load(cls, *a, **k):
        codec = real(cls, *a, **k)
        codec.vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        return codec

    monkeypatch.setattr(VAECodec, "load", classmethod(load))
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_decode_dtype_is_recorded_and_used(run, tmp_path, monkeypatch, caplog):
    seen = _vae_dtypes(monkeypatch)
    # on the CPU a reduced decode dtype is not used (parse_dtype: fp32 only), and the record says so
    with caplog.at_level(logging.WARNING, logger="latent_patch.codec"):
        cpu_bf16, ident = _sample(run, tmp_path / "cpu", "--decode-dtype", "bf16")
    assert ident["vae"]["decode_dtype"] == "float32" and seen == {torch.float32}
    assert "dtype bf16 requested on cpu: using fp32" in caplog.text
    # with the GPU policy (reduced precision allowed), the flag reaches the decoder and the record
    monkeypatch.setattr(codec_mod, "parse_dtype", lambda dtype, device: codec_mod.DTYPES[dtype or "fp16"])
    made = {}
    for flag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        seen.clear()
        made[flag], ident = _sample(run, tmp_path / flag, "--decode-dtype", flag)
        assert seen == {dtype} and ident["vae"]["decode_dtype"] == str(dtype).replace("torch.", "")
    assert np.array_equal(made["fp32"], cpu_bf16)
    assert not np.array_equal(made["bf16"], made["fp32"])  # the decode really ran in bf16
    assert np.abs(made["bf16"].astype(int) - made["fp32"]).max() <= 16


# --------------------------------------------------------------------------- VAE reduced-precision decode

@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """(plain tiny VAE, the same with a decoder whose activations overflow fp16 but not fp32/bf16)."""
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("vae")
    _tiny_vae(path)
    plain = AutoencoderKL.from_pretrained(path)
    hot = AutoencoderKL.from_pretrained(path)
    with torch.no_grad():  # x1e5 into GroupNorms: fp32/bf16 normalise it away, fp16 (max 65504) overflows
        hot.decoder.conv_in.weight.mul_(1e5)
        hot.decoder.conv_in.bias.mul_(1e5)
    return plain, hot


def _codec(vae, dtype) -> VAECodec:
    # VAECodec.load maps any dtype to fp32 on the CPU; the constructor takes the GPU's choice as is
    return VAECodec(vae, "tiny", torch.device("cpu"), dtype)


def test_fp16_decode_that_overflows_is_redone_in_fp32(vaes, caplog):
    plain, hot = vaes
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    raw = z / hot.config.scaling_factor
    with torch.no_grad():  # the premise: this decoder overflows in fp16 only
        with torch.autocast("cpu", dtype=torch.float16):
            assert not torch.isfinite(hot.decode(raw).sample).all()
        assert torch.isfinite(hot.decode(raw).sample).all()
    ref = _codec(hot, torch.float32)
    fp16 = _codec(hot, torch.float16)
    with caplog.at_level(logging.WARNING, logger="latent_patch.codec"):
        out = fp16.decode(z)
        images = fp16.decode_uint8(z)
        queued = fp16.decode_uint8_start(z)()  # the sampling job's path
        decoded = codec_mod.make_decoder(fp16, batch_size=2)(z)
    assert torch.isfinite(out).all() and torch.equal(out, ref.decode(z))
    assert torch.equal(images, ref.decode_uint8(z)) and torch.equal(queued, images) and torch.equal(decoded, images)
    assert caplog.text.count("non-finite VAE output in torch.float16: batch redone in fp32") >= 3
    # bf16 has fp32's range: no overflow, no redo, close to fp32
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latent_patch.codec"):
        bf16 = _codec(hot, torch.bfloat16).decode(z)
    assert "redone" not in caplog.text and torch.isfinite(bf16).all()
    assert not torch.equal(bf16, ref.decode(z)) and (bf16 - ref.decode(z)).abs().max() < 0.1
    # a decoder that does not overflow stays in fp16 (close to fp32, not equal), without a redo
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latent_patch.codec"):
        half = _codec(plain, torch.float16).decode(z)
    full = _codec(plain, torch.float32).decode(z)
    assert "redone" not in caplog.text and not torch.equal(half, full) and (half - full).abs().max() < 0.02


class _AsyncCopies:
    """``codec._copy_to_host`` as a device does it: each host tensor holds a stale value until an
    event recorded after its copy is synchronized; an event completes every copy queued before it
    on the stream, none queued after. The stale flag is ``stale_flag``, stale pixels are 0."""

    def __init__(self, stale_flag: bool) -> None:
        self.stale_flag = stale_flag
        self.queued: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, "_AsyncCopies.Event"]:
        host = torch.full(t.shape, self.stale_flag, dtype=t.dtype) if t.dtype == torch.bool else torch.zeros_like(t)
        self.queued.append((host, t.clone()))
        return host, self.Event(self, len(self.queued))

    class Event:
        def __init__(self, copies: "_AsyncCopies", after: int) -> None:
            self.copies, self.after = copies, after

        def synchronize(self) -> None:
            with torch.inference_mode():  # the hosts are inference tensors, as the real ones
                for host, value in self.copies.queued[: self.after]:
                    host.copy_(value)


@pytest.mark.parametrize("stale_flag", [True, False])
def test_queued_decode_waits_for_the_finite_flag(vaes, monkeypatch, caplog, stale_flag):
    """Issue 27: decode_uint8_start's result must not read the overflow flag before its copy lands.
    A stale True wrote an overflowed fp16 batch's NaN pixels as uint8; a stale False decoded a good
    batch a second time."""
    plain, hot = vaes
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae, dtype = (hot, torch.float16) if stale_flag else (plain, torch.bfloat16)
    expected = _codec(vae, dtype).decode_uint8(z)  # fp32 redo for the hot one, bf16 pixels for the plain one
    assert torch.equal(expected, _codec(vae, torch.float32).decode_uint8(z)) == stale_flag  # the premise
    monkeypatch.setattr(codec_mod, "_copy_to_host", _AsyncCopies(stale_flag))
    decodes: list = []  # autocast on, per decode
    real = vae.decode

    def decode(*a, **k):
        decodes.append(torch.is_autocast_enabled("cpu"))
        return real(*a, **k)

    monkeypatch.setattr(vae, "decode", decode)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latent_patch.codec"):
        images = _codec(vae, dtype).decode_uint8_start(z)()
    assert torch.equal(images, expected), "the flag was read before its copy landed"
    assert ("redone in fp32" in caplog.text) == stale_flag
    if not stale_flag:
        assert decodes == [True], "a good batch was decoded again"
