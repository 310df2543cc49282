"""Representation alignment (issue 28, align.py): targets under each patch's tokens, the loss, the
DiT's aligned tokens under routing, the loader's feature grids, and training: off is unchanged,
on trains, saves and resumes its projector exactly, and refuses what cannot align."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from latent_patch import align, checkpoint
from latent_patch.budget import training_flops
from latent_patch.config import DataConfig, ModelConfig, RepaConfig
from latent_patch.loader import build_loader
from latent_patch.models import build_model
from latent_patch.models.dit import DiT, draw_route, routed_keep
from latent_patch.patches import crop, random_crops_at
from latent_patch.shards import ShardError
from latent_patch.train import TrainingError, prepare_run, train
from tests.synthetic_shards import indexed, write_latent_shards
from tests.trainkit import tiny_cfg, write_train_shards

REPA = ["repa.weight=0.5", "repa.block=1", "repa.proj_hidden=32"]


def token_codes(G: int) -> torch.Tensor:
    """(1, 2, G, G) targets whose K=2 values at token (r, c) are (r, c): any crop says where it came from."""
    r, c = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    return torch.stack([r, c]).float()[None]


@pytest.mark.parametrize("R,p,size", [(8, 2, 4), (8, 2, 6), (16, 2, 8), (16, 4, 8), (8, 2, 8)])
def test_patch_targets_sit_under_the_tokens_of_every_drawable_crop(R, p, size):
    """For every offset the trainer can draw, token i of the crop (the DiT's row-major order, its
    place read from the crop's own coordinate channels) gets the full grid's target at that place."""
    G, targets = R // p, token_codes(R // p)
    for oy in range(0, R - size + 1, p):
        for ox in range(0, R - size + 1, p):
            offsets = torch.tensor([[oy, ox]])
            _, coords = crop(torch.zeros(1, 1, R, R), offsets, size)
            centre = F.avg_pool2d(coords, p)  # the token's mean coordinate, as DiT.pos_embed reads it
            place = ((centre + 1) / 2 * (R - 1) - (p - 1) / 2) / p  # back to full-grid token units
            col, row = place[0, 0].flatten().round(), place[0, 1].flatten().round()
            got = align.patch_targets(targets, offsets, size, p)[0]
            assert torch.equal(got[:, 0], row) and torch.equal(got[:, 1], col), (oy, ox)
            assert got.shape == ((size // p) ** 2, 2) and int(row.max()) < G


def test_token_targets_resample_by_area_only_where_the_grids_differ():
    f = torch.randn(2, 8, 8, 3, dtype=torch.float16)
    same = align.token_targets(f, 8)
    assert torch.equal(same, f.float().permute(0, 3, 1, 2))
    down = align.token_targets(f, 4)  # 2 x 2 features per token: their mean
    want = f.float().permute(0, 3, 1, 2).unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2))
    assert torch.allclose(down, want, atol=1e-6)
    up = align.token_targets(f, 16)  # each feature covers 2 x 2 tokens
    assert torch.equal(up[..., ::2, ::2], up[..., 1::2, 1::2]) and torch.equal(up[..., ::2, ::2], same)


def test_alignment_loss_is_negative_cosine_over_the_counted_tokens():
    t = torch.randn(2, 6, 5)
    assert torch.allclose(align.alignment_loss(3 * t, t, None), torch.full((2,), -1.0), atol=1e-6)
    assert torch.allclose(align.alignment_loss(-t, t, None), torch.full((2,), 1.0), atol=1e-6)
    kept = torch.tensor([[5, 0, 2], [1, 1, 4]])
    z = torch.stack([t[b, kept[b]] for b in range(2)])
    assert torch.allclose(align.alignment_loss(z, t, kept), torch.full((2,), -1.0), atol=1e-6)
    assert not torch.allclose(align.alignment_loss(z, t, kept.flip(1)), torch.full((2,), -1.0), atol=1e-3)


def dit(**kw) -> DiT:
    torch.manual_seed(0)
    net = DiT(in_channels=6, out_channels=4, latent_size=8, patch_size=2, hidden_size=32, depth=4, num_heads=2,
              num_classes=3, **kw)
    for prm in net.parameters():  # adaLN-Zero starts every block as the identity: wake them up
        torch.nn.init.normal_(prm, std=0.05)
    return net.eval()


def block_outputs(net: DiT, *args) -> list[torch.Tensor]:
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in net.blocks]
    net(*args)
    for h in hooks:
        h.remove()
    return seen


def test_dit_returns_the_tokens_after_the_aligned_block_and_which_went_through_it():
    x, c, y = torch.randn(2, 6, 8, 8), torch.randn(2), torch.tensor([0, 2])
    net = dit()
    seen = block_outputs(net, x, c, y)
    out, tokens, kept = net(x, c, y, align_block=2)
    assert torch.equal(out, net(x, c, y)) and torch.equal(tokens, seen[1]) and kept is None
    routed = dit(route_ratio=0.5, route_start=1, route_end=2)
    route = draw_route(2, 16, torch.Generator().manual_seed(0))
    n = routed_keep(16, 0.5)
    for block, in_span in ((1, False), (2, True), (3, True), (4, False)):
        seen = block_outputs(routed, x, c, y, route)
        out, tokens, kept = routed(x, c, y, route, align_block=block)
        assert torch.equal(out, routed(x, c, y, route)) and torch.equal(tokens, seen[block - 1])
        if in_span:  # before the rejoin: the kept tokens only, and which they are
            assert tokens.shape[1] == n and torch.equal(kept, route[:, :n])
        else:
            assert tokens.shape[1] == 16 and kept is None


def test_aligned_tokens_and_flops_count_the_projector_on_the_tokens_it_sees():
    model = ModelConfig(preset="DiT-T/2", latent_size=8, num_classes=10)
    repa = RepaConfig(weight=0.5, block=1, proj_hidden=32)
    base = training_flops(model, 8)
    per_token = 2 * (64 * 32 + 32 * 32 + 32 * 16) + 6 * 16
    assert training_flops(model, 8, repa, 16) == pytest.approx(base + 3 * 16 * per_token)
    assert training_flops(model, 8, RepaConfig(weight=0.0), 16) == base
    routed = ModelConfig(preset="DiT-S/2", latent_size=8, num_classes=10, depth=4, route_ratio=0.5, route_start=1,
                         route_end=2)
    assert align.aligned_tokens(routed, RepaConfig(block=2), 16) == routed_keep(16, 0.5)
    assert align.aligned_tokens(routed, RepaConfig(block=1), 16) == 16
    assert align.aligned_tokens(routed, RepaConfig(block=4), 16) == 16


def test_loaders_deliver_each_samples_own_feature_grid(tmp_path):
    """In memory (with and without the cache) and streamed: sample i's grid holds i."""
    man = write_latent_shards(tmp_path / "s", [12, 9, 11], indexed((4, 4, 4), 5), 5, (4, 4, 4),
                              features=lambda i: np.full((2, 2, 3), i, np.float32))
    base = dict(shards=str(man.parent), batch_size=8, num_workers=0)
    for extra in (dict(in_memory=True), dict(in_memory=True, cache="auto"), dict(in_memory=False)):
        loader = build_loader(DataConfig(**base, **extra), infinite=False, features=True)
        seen = []
        for batch in loader:
            ids = batch.mean[:, 0, 0, 0].long()
            assert batch.repr.shape == (len(ids), 2, 2, 3)
            assert torch.equal(batch.repr[:, 0, 0, 0].long(), ids), extra
            seen += ids.tolist()
        assert sorted(seen) == list(range(32)), extra
        plain = next(iter(build_loader(DataConfig(**base, **extra), infinite=False)))
        assert plain.repr is None  # not asked for: not read
    assert (man.parent / "latents-cache.repr.npy").is_file()


def test_a_feature_grid_of_another_shape_is_refused_naming_the_member(tmp_path):
    man = write_latent_shards(tmp_path / "s", [4], indexed((4, 4, 4), 5), 5, (4, 4, 4),
                              features=lambda i: np.zeros((2, 2, 3), np.float32))
    m = json.loads(man.read_text())
    m["repr"]["dims"] = 5
    man.write_text(json.dumps(m))
    with pytest.raises(ShardError, match="repr.npy"):
        list(build_loader(DataConfig(shards=str(man.parent), batch_size=4, in_memory=False), infinite=False,
                          features=True))


@pytest.fixture
def feature_shards(tmp_path):
    return write_train_shards(tmp_path / "fs", n=64, features=(4, 16))


def test_repa_off_ignores_the_features(feature_shards, tmp_path):
    """repa.weight=0 trains bit for bit as on the same shards without features (nothing read,
    no projector, no extra draw), and saves no projector."""
    plain = write_train_shards(tmp_path / "plain", n=64)
    runs = []
    for data, name in ((plain, "a"), (feature_shards, "b")):
        train(tiny_cfg(data, tmp_path / name, "run.total_patches=400", "run.ckpt_every_patches=0"))
        runs.append(checkpoint.find_latest(tmp_path / name))
    a, b = (safetensors.torch.load_file(str(c / checkpoint.MODEL_FILE)) for c in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (runs[1] / checkpoint.PROJECTOR_FILE).exists()


def test_repa_trains_saves_its_projector_and_resumes_exactly(feature_shards, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_cfg(feature_shards, straight, *REPA, "run.total_patches=800", "run.ckpt_every_patches=0"))
    split = tmp_path / "split"
    train(tiny_cfg(feature_shards, split, *REPA, "run.total_patches=400", "run.ckpt_every_patches=0"))
    train(tiny_cfg(feature_shards, split, *REPA, "run.total_patches=800", "run.ckpt_every_patches=0"), "auto")
    for name in (checkpoint.MODEL_FILE, checkpoint.PROJECTOR_FILE, checkpoint.EMA_FILE):
        a, b = (safetensors.torch.load_file(str(checkpoint.find_latest(r) / name)) for r in (straight, split))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ck = checkpoint.find_latest(straight)
    weights = safetensors.torch.load_file(str(ck / checkpoint.EMA_FILE))
    assert not any("projector" in k for k in weights)  # sampling and export read these: no projector
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    aligned = [r["align_loss"] for r in records if "align_loss" in r]
    assert aligned and all(-1.0 <= v <= 1.0 for v in aligned) and aligned[-1] < aligned[0]
    net, _, _ = checkpoint.load_inference_model(straight)  # the sampler's model: the DiT alone
    assert isinstance(net, DiT)


def test_repa_flops_are_on_the_compute_axis(feature_shards, tmp_path):
    cfgs = [tiny_cfg(feature_shards, tmp_path / n, *o) for n, o in (("off", []), ("on", REPA))]
    flops = [prepare_run(c, None)[0].flops_per_patch for c in cfgs]
    for side in flops[0]:
        tokens = (side // 2) ** 2
        want = 3 * align.forward_flops(cfgs[1].model, cfgs[1].repa, 64, tokens, 16)
        assert flops[1][side] - flops[0][side] == pytest.approx(want)


@pytest.mark.parametrize("overrides,match", [
    ([], "encode_latents.py --repr"),
    (["model.preset=adm-tiny"], "is a unet"),
    (["repa.block=3"], "repa.block=3"),
])
def test_what_cannot_align_is_refused_in_one_line(tmp_path, feature_shards, overrides, match):
    data = write_train_shards(tmp_path / "plain", n=32) if not overrides else feature_shards
    with pytest.raises(TrainingError, match=match) as err:
        prepare_run(tiny_cfg(data, tmp_path / "run", *REPA, *overrides), None)
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_with_repa_switched_is_refused(feature_shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(feature_shards, run, "run.total_patches=200", "run.ckpt_every_patches=0"))
    with pytest.raises(checkpoint.CheckpointError, match="without representation alignment"):
        prepare_run(tiny_cfg(feature_shards, run, *REPA, "run.total_patches=400"), "auto")


def test_repa_crops_the_targets_where_the_latent_was_cropped(feature_shards, tmp_path, monkeypatch):
    """The trainer hands patch_targets the offsets the latent was cut at (one crop per sample)."""
    import latent_patch.train as train_mod

    seen = []
    real = align.patch_targets
    monkeypatch.setattr(train_mod, "random_crops_at",
                        lambda *a, **k: seen.append(("crop", (out := random_crops_at(*a, **k))[2].clone())) or out)
    monkeypatch.setattr(align, "patch_targets", lambda t, off, s, p: seen.append(("targets", off.clone())) or
                        real(t, off, s, p))
    trainer, _ = prepare_run(tiny_cfg(feature_shards, tmp_path / "run", *REPA), None)
    for _ in range(3):
        train_mod.train_step(trainer, train_mod.plan_step(trainer))
    pairs = list(zip(seen[::2], seen[1::2]))
    assert pairs and all(a[0] == "crop" and b[0] == "targets" and torch.equal(a[1], b[1]) for a, b in pairs)


def test_build_model_unchanged_by_repa_config():
    """The sampler's network does not know about alignment: the same weights' shapes as before."""
    net = build_model(ModelConfig(preset="DiT-T/2", latent_size=8, num_classes=10))
    assert not any("projector" in k for k in net.state_dict())


@pytest.mark.slow
def test_torchrun_two_processes_align_and_resume_exactly(feature_shards, tmp_path):
    """2 gloo processes with the projector inside the DDP module: the run finishes with its
    projector saved, and a resume from the middle checkpoint reproduces the losses exactly."""
    from tests.test_train import torchrun
    from tests.trainkit import metrics

    out = tmp_path / "run"
    torchrun(feature_shards, out, *REPA)
    done = checkpoint.list_complete(out)
    assert len(done) == 2 and all((p / checkpoint.PROJECTOR_FILE).is_file() for _, p in done)
    mid_step, mid = done[0]
    torchrun(feature_shards, tmp_path / "resumed", *REPA, "--resume", str(mid))
    a, b = metrics(out), metrics(tmp_path / "resumed")
    assert sorted(b) == [s for s in sorted(a) if s > mid_step]
    assert all(a[s]["loss"] == b[s]["loss"] and a[s]["align_loss"] == b[s]["align_loss"] for s in b)
