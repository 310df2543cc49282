"""Patch schedule, coordinate grids and batched random crops."""

import math
import random

import pytest
import torch

from latent_patch import config
from latent_patch.config import PatchConfig
from latent_patch.patches import PatchSchedule, coord_grid, crop, random_crops, random_offsets


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_coord_grid_values_and_layout():
    g = coord_grid(5)
    assert g.shape == (2, 5, 5) and g.dtype == torch.float32
    expected = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert torch.equal(g[0], expected[None, :].expand(5, 5))  # x varies along columns
    assert torch.equal(g[1], expected[:, None].expand(5, 5))  # y varies along rows
    assert g[:, 0, 0].tolist() == [-1.0, -1.0] and g[:, -1, -1].tolist() == [1.0, 1.0]
    assert g[:, 0, -1].tolist() == [1.0, -1.0]  # top-right: x = +1, y = -1


def test_coord_grid_formula_and_edge_cases():
    R = 32
    idx = torch.arange(R, dtype=torch.float64)
    formula = ((idx / (R - 1) - 0.5) * 2).float()
    g = coord_grid(R, dtype=torch.float64)
    assert g.dtype == torch.float64
    torch.testing.assert_close(coord_grid(R)[0, 7], formula)
    torch.testing.assert_close(coord_grid(R)[1, :, 7], formula)
    assert torch.equal(coord_grid(1), torch.zeros(2, 1, 1))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size", [1, 8, 16, 31])
def test_random_crops_match_slices_at_their_offsets(size):
    B, C, R = 6, 3, 32
    x = torch.randn(B, C, R, R)
    patches, coords = random_crops(x, size, _generator(3))
    offsets = random_offsets(B, R, size, _generator(3))  # same stream -> same offsets
    grid = coord_grid(R)
    assert patches.shape == (B, C, size, size) and coords.shape == (B, 2, size, size)
    for b, (oy, ox) in enumerate(offsets.tolist()):
        assert torch.equal(patches[b], x[b, :, oy : oy + size, ox : ox + size])
        assert torch.equal(coords[b], grid[:, oy : oy + size, ox : ox + size])


def test_crop_at_given_offsets_and_coordinates():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    patches, coords = crop(x, torch.tensor([[0, 4], [4, 0]]), 4)
    assert torch.equal(patches[0, 0], x[0, 0, 0:4, 4:8])
    assert torch.equal(patches[1, 0], x[1, 0, 4:8, 0:4])
    assert coords[0, 0, 0, 0].item() == pytest.approx((4 / 7 - 0.5) * 2)  # x of column 4
    assert coords[0, 1, 0, 0].item() == -1.0  # y of row 0


def test_offsets_uniform_and_independent():
    R, s, n = 32, 16, 17_000
    off = random_offsets(n, R, s, _generator(0))
    assert off.min().item() == 0 and off.max().item() == R - s
    counts = torch.bincount(off.flatten(), minlength=R - s + 1).float()
    expected = 2 * n / (R - s + 1)
    assert (counts - expected).abs().max().item() < 5 * math.sqrt(expected)
    corr = torch.corrcoef(off.T.float())[0, 1].item()  # row and column offsets independent
    assert abs(corr) < 0.05


def test_full_size_returns_input_and_full_grid():
    x = torch.randn(3, 4, 16, 16)
    patches, coords = random_crops(x, 16)
    assert patches is x
    assert coords.shape == (3, 2, 16, 16) and torch.equal(coords[2], coord_grid(16))


def test_random_crops_rejects_bad_sizes():
    with pytest.raises(ValueError, match="17"):
        random_crops(torch.zeros(1, 1, 16, 16), 17)


def test_default_schedule_is_the_authors_latent_schedule():
    sched = PatchSchedule(PatchConfig(), R=32)
    assert sched.sizes == [16, 32] and sched.probs == [0.5, 0.5] and sched.multipliers == [2, 1]


def _frequencies(sched: PatchSchedule, rng, n: int, progress: float = 1.0) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _ in range(n):
        size, mult = sched.sample(rng, progress)
        assert mult == sched.multipliers[sched.sizes.index(size)]
        counts[size] = counts.get(size, 0) + 1
    return counts


@pytest.mark.parametrize("rng", [random.Random(0), torch.Generator().manual_seed(0)], ids=["random", "torch"])
def test_schedule_frequencies_within_binomial_tolerance(rng):
    cfg = PatchConfig(sizes=[0.25, 0.5, 1.0], probs=[0.2, 0.3, 0.5])  # the pixel-space schedule at 64
    sched = PatchSchedule(cfg, R=64)
    assert sched.sizes == [16, 32, 64] and sched.multipliers == [4, 2, 1]
    n = 4000
    counts = _frequencies(sched, rng, n)
    for size, p in zip(sched.sizes, sched.probs):
        assert abs(counts.get(size, 0) - n * p) < 4 * math.sqrt(n * p * (1 - p))


def test_absolute_sizes_and_explicit_multipliers():
    sched = PatchSchedule(PatchConfig(sizes=[32, 8], probs=[0.4, 0.6], batch_multiplier=[1, 3]), R=32)
    assert sched.sizes == [8, 32] and sched.probs == [0.6, 0.4] and sched.multipliers == [3, 1]


def test_progressive_starts_small_and_ramps_to_target():
    cfg = PatchConfig(sizes=[0.25, 0.5, 1.0], probs=[0.2, 0.3, 0.5], progressive=True, progressive_fraction=0.5)
    sched = PatchSchedule(cfg, R=32)
    assert sched.probs_at(0.0) == pytest.approx([0.4, 0.6, 0.0])
    assert sched.probs_at(0.25) == pytest.approx([0.3, 0.45, 0.25])
    assert sched.probs_at(0.5) == pytest.approx([0.2, 0.3, 0.5])
    assert sched.probs_at(0.9) == pytest.approx([0.2, 0.3, 0.5])
    assert 32 not in _frequencies(sched, random.Random(1), 500, progress=0.0)
    assert sched.probs_at(0.0) != PatchSchedule(PatchConfig(sizes=cfg.sizes, probs=cfg.probs), 32).probs_at(0.0)


@pytest.mark.parametrize(
    "cfg, R, multiple_of, match",
    [
        (PatchConfig(sizes=[24, 32]), 32, 1, "24"),  # R / 24 is fractional under 'auto'
        (PatchConfig(sizes=[16, 40]), 32, 1, "40"),  # does not fit
        (PatchConfig(sizes=[0.3, 1.0]), 32, 1, "0.3"),  # 9.6 cells
        (PatchConfig(sizes=[6, 32], batch_multiplier=[4, 1]), 32, 4, "6"),  # not a multiple of patchify
        (PatchConfig(sizes=[16, 32], probs=[1.0]), 32, 1, "probs"),
        (PatchConfig(sizes=[16, 32], probs=[0.7, 0.7]), 32, 1, "sum to 1"),
    ],
)
def test_schedule_errors_name_the_value(cfg, R, multiple_of, match):
    with pytest.raises(ValueError, match=match):
        PatchSchedule(cfg, R, multiple_of=multiple_of)


def test_patch_config_through_the_config_loader():
    cfg = config.load(PatchConfig, overrides=["sizes=[8, 16, 1]", "probs=[0.25, 0.25, 0.5]"])
    sched = PatchSchedule(cfg, R=32)
    assert sched.sizes == [8, 16, 32] and sched.multipliers == [4, 2, 1]


def test_dit_patch_tokens_are_the_full_latents_tokens_at_every_drawable_offset():
    """Issue 12: for every offset the trainer can draw for a DiT, each token of a patch groups the
    same cells and has the same position embedding as the token at that place in the full latent."""
    from latent_patch.config import ModelConfig
    from latent_patch.models import build_model, offset_multiple

    torch.manual_seed(0)
    R, s = 16, 8
    net = build_model(ModelConfig(preset="DiT-T/2", latent_size=R, num_classes=10))
    p = offset_multiple(net)
    assert p == net.patch_size == 2
    g = torch.Generator().manual_seed(1)
    drawn = {tuple(o) for o in random_offsets(4000, R, s, g, step=p).tolist()}
    assert drawn == {(r, c) for r in range(0, R - s + 1, p) for c in range(0, R - s + 1, p)}  # all of them, only them
    x = torch.cat([torch.randn(1, 4, R, R), coord_grid(R)[None]], dim=1)
    full_tokens = net.x_embedder(x)  # (1, D, R/p, R/p): cells grouped on the full grid
    full_pos = net.pos_embed(x[:, -2:]).view(1, R // p, R // p, -1)
    for r, c in sorted(drawn):
        patch, coords = crop(x[:, :4], torch.tensor([[r, c]]), s)
        px = torch.cat([patch, coords], dim=1)
        window = (slice(r // p, (r + s) // p), slice(c // p, (c + s) // p))
        torch.testing.assert_close(net.x_embedder(px), full_tokens[:, :, window[0], window[1]])
        torch.testing.assert_close(net.pos_embed(coords).view(1, s // p, s // p, -1), full_pos[:, window[0], window[1]])
    odd, odd_coords = crop(x[:, :4], torch.tensor([[1, 1]]), s)  # off the token grid: a different grouping
    assert not torch.allclose(net.pos_embed(odd_coords).view(1, s // p, s // p, -1), full_pos[:, :s // p, :s // p])


def test_unet_offsets_stay_any_cell():
    g = torch.Generator().manual_seed(0)
    drawn = {tuple(o) for o in random_offsets(2000, 8, 4, g).tolist()}
    assert drawn == {(r, c) for r in range(5) for c in range(5)}
