"""Representation targets (represent.py): tiny random-weight timm ViTs saved to folders, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from latent_patch import represent as rep
from latent_patch.represent import ReprEncoder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*, as DINOv2
ARCH = "vit_tiny_patch16_224"
CPU = torch.device("cpu")


def tiny_args(**extra) -> dict:
    return {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, **extra}


def tiny(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, num_classes=0, **tiny_args(**extra))


def in_memory(model: torch.nn.Module, size: int = 32) -> ReprEncoder:
    cfg = {"architecture": ARCH, "image_size": size, "mean": list(MEAN), "std": list(STD)}
    return ReprEncoder(model, "memory", cfg, CPU, torch.float32)


def saved(tmp_path, **extra):
    model = tiny(**extra)
    args = tiny_args(**extra)
    folder = rep.save_folder(model, tmp_path / "enc", args, args["img_size"], MEAN, STD, source="test")
    return model, folder


def pixels(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def manual_input(px: torch.Tensor) -> torch.Tensor:
    """REPA's preprocessing for DINOv2, written out: [0, 1], ImageNet mean/std."""
    return ((px + 1) / 2 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- the encoder

@pytest.mark.parametrize("extra, prefix", [({}, 1), ({"reg_tokens": 4}, 5),
                                           ({"no_embed_class": True, "reg_tokens": 2}, 3)])
def test_folder_encodes_like_the_model_without_prefix_tokens(tmp_path, extra, prefix):
    model, folder = saved(tmp_path, **extra)
    enc = ReprEncoder.load(str(folder), device="cpu")
    px = pixels()
    grid = enc.encode(px)
    assert grid.dtype == torch.float16 and grid.shape == (3, 4, 4, 32)
    assert enc.grid == (4, 4) and enc.dim == 32 and model.num_prefix_tokens == prefix
    assert torch.equal(grid, in_memory(model).encode(px))
    with torch.no_grad():
        ref = model.forward_features(manual_input(px))
    assert ref.shape[1] == 16 + prefix
    torch.testing.assert_close(grid, ref[:, prefix:].reshape(3, 4, 4, 32).half(), rtol=0, atol=1e-3)
    assert enc.describe() == {"spec": str(folder.resolve()), "architecture": ARCH, "image_size": 32,
                              "grid": [4, 4], "dim": 32, "mean": list(MEAN), "std": list(STD),
                              "dtype": "float16", "source": "test"}


def test_avg_pool_model_tokens_get_the_final_norm():
    """An avg-pool timm ViT moves its final norm after pooling (fc_norm): applied per token."""
    model = tiny(class_token=False, global_pool="avg")
    assert isinstance(model.norm, torch.nn.Identity) and model.num_prefix_tokens == 0
    with torch.no_grad():
        model.fc_norm.weight.mul_(3.0)
        feats = model.forward_features(manual_input(pixels()))
    grid = in_memory(model).encode(pixels())
    torch.testing.assert_close(grid, model.fc_norm(feats).reshape(3, 4, 4, 32).half(), rtol=0, atol=2e-3)


def test_preprocess_normalises_then_resizes_bicubic():
    enc = in_memory(tiny(img_size=48), size=48)
    px = pixels()
    want = F.interpolate(manual_input(px), size=(48, 48), mode="bicubic")
    assert torch.equal(enc.preprocess(px), want)
    with torch.no_grad():
        feats = enc.model.forward_features(want)[:, 1:]
    torch.testing.assert_close(enc.encode(px), feats.reshape(3, 6, 6, 32).half(), rtol=0, atol=1e-3)
    flat = in_memory(tiny()).preprocess(torch.full((1, 3, 32, 32), 0.2))  # (0.2 + 1) / 2 = 0.6
    for c in range(3):
        assert torch.allclose(flat[0, c], torch.tensor((0.6 - MEAN[c]) / STD[c]), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc.encode(torch.zeros(1, 1, 32, 32))


def test_flipped_image_features_are_not_the_flipped_grid():
    """The flip sample must encode the flipped PIXELS: flipping the grid is another thing."""
    enc = in_memory(tiny())
    px = pixels()
    own, flipped_grid = enc.encode(px.flip(3)), enc.encode(px).flip(2)
    assert (own.float() - flipped_grid.float()).abs().mean() > 0.1


def test_reduced_precision_overflow_is_redone_in_fp32(monkeypatch):
    model = tiny()
    cfg = {"architecture": ARCH, "image_size": 32, "mean": list(MEAN), "std": list(STD)}
    enc = ReprEncoder(model, "bf16", cfg, CPU, torch.bfloat16)
    real = model.forward_features

    def overflowing(x):
        out = real(x)
        return out * float("inf") if torch.is_autocast_enabled("cpu") else out

    monkeypatch.setattr(model, "forward_features", overflowing)
    assert torch.equal(enc.encode(pixels()), in_memory(tiny()).encode(pixels()))


def test_tokens_beyond_float16_are_refused():
    model = tiny()
    with torch.no_grad():
        model.norm.weight.fill_(1e6)
    with pytest.raises(RuntimeError, match="non-finite patch tokens"):
        in_memory(model).encode(pixels())


def test_forward_flops_count_attention():
    """2 x MACs: patch conv, qkv/proj/MLP linears and both attention matmuls, per block."""
    t, d, p = 17, 32, 8  # 16 patches + CLS
    per_block = 2 * t * (3 * d * d + d * d + 8 * d * d) + 2 * 2 * t * t * d
    want = 2 * 16 * (3 * p * p) * d + 2 * per_block
    assert in_memory(tiny()).forward_flops_per_image() == want


# --------------------------------------------------------------------------- loading errors

def _drop_std(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["std"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _other_shapes(folder):
    save_file(tiny(embed_dim=48).state_dict(), str(folder / "model.safetensors"))


def _fewer_blocks(folder):
    save_file(tiny(depth=1).state_dict(), str(folder / "model.safetensors"))


def _edit(key, value):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("breakage, match", [
    (lambda f: (f / "model.safetensors").unlink(), r"model\.safetensors: missing"),
    (_drop_std, r"config\.json: missing field\(s\) std"),
    (lambda f: (f / "config.json").write_text("{not json"), r"config\.json: unreadable"),
    (_other_shapes, r"model\.safetensors: does not fit .*size mismatch"),
    (_fewer_blocks, r"model\.safetensors: does not fit .*Missing key\(s\)"),
    (_edit("model_args", tiny_args(no_such_kwarg=1)), r"config\.json: field 'model_args'"),
    (_edit("architecture", "not_a_model"), r"config\.json: field 'architecture'"),
    (_edit("mean", [0.5, 0.5]), r"config\.json: field 'mean'"),
    (_edit("image_size", 48), r"image_size 48 but the model is built for \(32, 32\)"),
])
def test_bad_folder_names_file_and_field(tmp_path, breakage, match):
    _, folder = saved(tmp_path)
    breakage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ReprEncoder.load(str(folder), device="cpu")


def test_unknown_spec_other_size_or_non_vit_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder and not a timm model id"):
        ReprEncoder.load(str(tmp_path / "nowhere"), device="cpu")
    _, folder = saved(tmp_path)
    with pytest.raises(ValueError, match="image_size is 32, not the 224 asked for"):
        ReprEncoder.load(str(folder), device="cpu", image_size=224)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="not a ViT-style timm model"):
        ReprEncoder(cnn, "cnn", {"architecture": "resnet10t", "image_size": 32, "mean": MEAN, "std": STD},
                    CPU, torch.float32)


def test_hub_failure_is_one_line_naming_spec_and_folder(monkeypatch):
    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.\n"
                                      "Please check your connection.")

    monkeypatch.setattr(timm, "create_model", offline)
    spec = "vit_base_patch14_dinov2.lvd142m"
    with pytest.raises(RuntimeError) as info:
        ReprEncoder.load(spec, device="cpu", image_size=224)
    msg = str(info.value)
    assert "\n" not in msg and spec in msg and "local folder" in msg and "LocalEntryNotFoundError" in msg


def test_timm_id_path_reads_pretrained_cfg(monkeypatch):
    """The id path: pretrained=True, num_classes=0, img_size when asked; mean/std from pretrained_cfg."""
    calls = []
    real = timm.create_model

    def fake(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, dict(kwargs)))
        torch.manual_seed(0)
        return real(ARCH, pretrained=False, **{**tiny_args(), **kwargs})

    monkeypatch.setattr(timm, "create_model", fake)
    enc = ReprEncoder.load(f"{ARCH}.augreg_in21k", device="cpu", image_size=32)
    assert calls == [(f"{ARCH}.augreg_in21k", True, {"num_classes": 0, "img_size": 32})]
    info = enc.describe()
    assert (info["mean"], info["std"], info["image_size"]) == ([0.5] * 3, [0.5] * 3, 32)
    assert info["spec"] == f"{ARCH}.augreg_in21k" and info["architecture"] == ARCH
    ReprEncoder.load(ARCH, device="cpu")
    assert calls[-1][2] == {"num_classes": 0}


# --------------------------------------------------------------------------- PCA

def low_rank(n: int = 400, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, 3)))[0]
    x = (rng.standard_normal((n, 3)) * [5.0, 3.0, 2.0]) @ basis.T + 1e-3 * rng.standard_normal((n, d))
    return x + rng.standard_normal(d), basis


def test_fit_pca_recovers_a_low_rank_subspace():
    x, basis = low_rank()
    pca = rep.fit_pca(x, 3)
    c = pca["components"]
    assert c.shape == (3, 16) and pca["mean"].shape == (16,)
    assert np.allclose(c @ c.T, np.eye(3), atol=1e-12)
    assert np.abs(c.T @ c - basis @ basis.T).max() < 1e-4  # the same subspace
    evr = pca["explained_variance_ratio"]
    assert evr.sum() > 0.9999 and np.all(np.diff(evr) < 0)
    assert np.allclose(pca["mean"], x.mean(axis=0))


def test_fit_pca_signs_are_fixed():
    x, _ = low_rank()
    a, b = rep.fit_pca(x, 3), rep.fit_pca(x, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = a["components"]
    assert np.all(c[np.arange(3), np.abs(c).argmax(axis=1)] > 0)
    shuffled = rep.fit_pca(x[np.random.default_rng(5).permutation(len(x))], 3)["components"]
    assert np.allclose(shuffled, c, atol=1e-9)  # sample order may flip raw SVD signs, not these


def test_fit_pca_refuses_bad_inputs():
    with pytest.raises(ValueError, match="k <= min"):
        rep.fit_pca(np.zeros((10, 4)), 5)
    with pytest.raises(ValueError, match="no variance"):
        rep.fit_pca(np.ones((10, 4)), 2)


def test_apply_pca_projects_grids():
    x, _ = low_rank()
    pca = rep.fit_pca(x, 3)
    grid = torch.from_numpy(x[:32].reshape(2, 4, 4, 16)).half()
    out = rep.apply_pca(grid, pca)
    assert out.shape == (2, 4, 4, 3) and out.dtype == torch.float16
    want = (grid.double().numpy() - pca["mean"]) @ pca["components"].T
    assert np.allclose(out.float().numpy(), want, atol=2e-2)
    with pytest.raises(ValueError, match="D=8"):
        rep.apply_pca(grid[..., :8], pca)


def test_pca_json_round_trip_is_exact():
    pca = rep.fit_pca(low_rank()[0], 3)
    back = rep.pca_from_json(json.loads(json.dumps(rep.pca_to_json(pca))))
    assert all(np.array_equal(back[k], pca[k]) for k in pca)


def _broken(key, fn):
    def make(obj):
        obj[key] = fn(obj[key])
        return obj
    return make


@pytest.mark.parametrize("breakage, match", [
    (lambda o: {k: v for k, v in o.items() if k != "components"}, r"pca\.components: missing"),
    (_broken("mean", lambda v: v[:-1]), r"pca\.mean .* do not fit"),
    (_broken("explained_variance_ratio", lambda v: [float("nan")] + v[1:]),
     r"pca\.explained_variance_ratio: expected a finite"),
    (_broken("components", lambda v: [[2 * e for e in v[0]]] + v[1:]), r"pca\.components: rows are not orthonormal"),
    (_broken("mean", lambda v: ["a"] + v[1:]), r"pca\.mean: not a numeric array"),
    (_broken("components", lambda v: v[0]), r"pca\.components: expected a finite non-empty 2-D"),
])
def test_pca_from_json_names_the_bad_field(breakage, match):
    obj = rep.pca_to_json(rep.fit_pca(low_rank()[0], 3))
    with pytest.raises(ValueError, match=match):
        rep.pca_from_json(breakage(obj))


def test_sample_for_pca_ignores_batching():
    grids = np.random.default_rng(0).standard_normal((12, 4, 4, 8)).astype(np.float16)
    tokens = grids.reshape(-1, 8).astype(np.float32)

    def draw(sizes, seed=3, budget=50):
        starts = np.cumsum([0] + sizes)
        return rep.sample_for_pca((torch.from_numpy(grids[a:b]) for a, b in zip(starts, starts[1:])),
                                  budget, seed)

    ref = draw([12])
    assert ref.shape == (50, 8) and ref.dtype == np.float32
    for sizes in ([1] * 12, [5, 7], [3, 3, 3, 3], [11, 1]):
        assert np.array_equal(draw(sizes), ref)
    rows = [int(np.flatnonzero((tokens == r).all(axis=1))[0]) for r in ref]
    assert rows == sorted(set(rows)) and rows != list(range(50))  # distinct, stream order, not a prefix
    assert not np.array_equal(draw([12], seed=4), ref)
    assert np.array_equal(draw([4, 8], budget=10_000), tokens)
    with pytest.raises(ValueError, match="no grids"):
        rep.sample_for_pca(iter([]), 5, 0)
