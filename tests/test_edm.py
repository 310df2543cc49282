"""EDM preconditioning, loss, classifier-free guidance and the Heun / Euler samplers."""

import math

import pytest
import torch
import torch.nn as nn

from latent_patch import config
from latent_patch.config import EDMConfig, SamplerConfig
from latent_patch.edm import (
    AUTHORS_IMAGENET256,
    Precond,
    edm_loss,
    edm_scalings,
    guided_denoiser,
    loss_weight,
    sample,
    sigma_steps,
)
from latent_patch.patches import coord_grid


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class Recorder(nn.Module):
    """A network that remembers its inputs and returns a fixed 1x1 conv of them (non-zero output)."""

    def __init__(self, in_channels: int = 6, out_channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x, c_noise, class_labels):
        self.seen = {"x": x, "c_noise": c_noise, "labels": class_labels}
        return self.conv(x)


def test_scalings_numbers():
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor([0.5, 2.0]), 0.5)
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 0.25 / 4.25]))
    torch.testing.assert_close(c_out, torch.tensor([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)]))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)]))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(0.5) / 4, math.log(2.0) / 4]))
    sigma = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(loss_weight(sigma, 0.5), 1 / edm_scalings(sigma, 0.5)[1] ** 2)
    assert loss_weight(torch.tensor(0.5), 0.5).item() == pytest.approx(8.0)


def test_precond_feeds_scaled_input_then_coordinates():
    net, B = Recorder(), 3
    x, sigma = torch.randn(B, 4, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    coords = torch.randn(B, 2, 8, 8)
    labels = torch.tensor([0, 1, 2])
    D = Precond(net, 0.5)(x, sigma, coords, labels)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_scalings(sigma, 0.5))
    torch.testing.assert_close(net.seen["x"][:, :4], c_in * x)
    assert torch.equal(net.seen["x"][:, 4:], coords)  # coordinates unscaled, after c_in
    torch.testing.assert_close(net.seen["c_noise"], sigma.log() / 4)
    assert torch.equal(net.seen["labels"], labels)
    torch.testing.assert_close(D, c_skip * x + c_out * net.conv(net.seen["x"]))


def test_precond_small_sigma_is_identity_and_unbatched_coords_broadcast():
    x = torch.randn(2, 4, 8, 8)
    D = Precond(Recorder(), 0.5)(x, 1e-5, coord_grid(8), torch.tensor([0, 1]))
    torch.testing.assert_close(D, x, atol=1e-4, rtol=0)


def test_precond_runs_net_in_its_dtype_returns_float32():
    net = Recorder().to(torch.bfloat16)
    D = Precond(net)(torch.randn(2, 4, 4, 4), torch.tensor([1.0, 2.0]), coord_grid(4), torch.tensor([0, 1]))
    assert net.seen["x"].dtype == torch.bfloat16 and D.dtype == torch.float32


def test_edm_loss_matches_the_formula_with_its_draws():
    precond = Precond(Recorder(), 0.5)
    y, coords, labels = torch.randn(5, 4, 8, 8), torch.randn(5, 2, 8, 8), torch.arange(5)
    loss = edm_loss(precond, y, coords, labels, torch.Generator().manual_seed(7), num_classes=10, label_dropout=0.0)
    g = torch.Generator().manual_seed(7)  # replay the draws: sigma, then noise
    sigma = (torch.randn(5, generator=g) * 1.2 - 1.2).exp()
    n = torch.randn(y.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    D = precond(y + n, sigma, coords, labels)
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (D - y).square().mean(dim=(1, 2, 3))
    assert loss.shape == (5,)
    torch.testing.assert_close(loss, expected)


def test_edm_loss_sigma_distribution_and_label_dropout():
    net, n = Recorder(6, 4), 20_000
    precond = Precond(net)
    y, coords, labels = torch.zeros(n, 4, 1, 1), torch.zeros(n, 2, 1, 1), torch.full((n,), 3)
    edm_loss(precond, y, coords, labels, torch.Generator().manual_seed(0), num_classes=10, label_dropout=0.1)
    log_sigma = 4 * net.seen["c_noise"]
    assert abs(log_sigma.mean().item() + 1.2) < 0.05 and abs(log_sigma.std().item() - 1.2) < 0.05
    seen = net.seen["labels"]
    assert set(seen.unique().tolist()) == {3, 10}
    assert abs((seen == 10).float().mean().item() - 0.1) < 0.01
    edm_loss(precond, y[:50], coords[:50], labels[:50], num_classes=10, label_dropout=1.0)
    assert (net.seen["labels"] == 10).all()


class FakePrecond:
    """Analytic stand-in for Precond: D depends on the label on every channel; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, sigma, coords, labels):
        self.calls.append(x.shape[0])
        assert coords.shape[-2:] == x.shape[-2:]
        per_channel = torch.arange(1, x.shape[1] + 1, dtype=torch.float32).view(1, -1, 1, 1)
        return 0.5 * x + labels.float().view(-1, 1, 1, 1) * per_channel + sigma.float().view(-1, 1, 1, 1)


def _cfg_case():
    x, sigma = torch.randn(3, 4, 4, 4), torch.tensor([1.0, 1.0, 1.0])
    labels, null = torch.tensor([2, 5, 7]), 10
    return x, sigma, labels, null, coord_grid(4)


def test_cfg_scale_one_is_the_conditional_model_in_one_pass():
    x, sigma, labels, null, coords = _cfg_case()
    fake = FakePrecond()
    D = guided_denoiser(fake, coords, null, 1.0)(x, sigma, labels)
    assert fake.calls == [3]
    assert torch.equal(D, FakePrecond()(x, sigma, coords, labels))


def test_cfg_scale_zero_is_the_unconditional_model():
    x, sigma, labels, null, coords = _cfg_case()
    fake = FakePrecond()
    D = guided_denoiser(fake, coords, null, 0.0)(x, sigma, labels)
    assert fake.calls == [3]
    assert torch.equal(D, FakePrecond()(x, sigma, coords, torch.full_like(labels, null)))


def test_cfg_combines_all_channels_in_one_batched_pass():
    x, sigma, labels, null, coords = _cfg_case()
    fake, w = FakePrecond(), 1.5
    D = guided_denoiser(fake, coords, null, w)(x, sigma, labels)
    assert fake.calls == [6]  # cond + uncond in one forward
    cond = FakePrecond()(x, sigma, coords, labels)
    uncond = FakePrecond()(x, sigma, coords, torch.full_like(labels, null))
    torch.testing.assert_close(D, uncond + w * (cond - uncond))
    assert (D[:, 3] != cond[:, 3]).all()  # the 4th channel is guided too


def test_cfg_interval_gates_guidance():
    x, _, labels, null, coords = _cfg_case()
    fake = FakePrecond()
    guided = guided_denoiser(fake, coords, null, 2.0, cfg_interval=[0.5, 5.0])
    outside = torch.full((3,), 10.0)
    assert torch.equal(guided(x, outside, labels), FakePrecond()(x, outside, coords, labels))
    assert fake.calls == [3]
    mixed = torch.tensor([0.1, 1.0, 10.0])
    D = guided(x, mixed, labels)
    cond = FakePrecond()(x, mixed, coords, labels)
    uncond = FakePrecond()(x, mixed, coords, torch.full_like(labels, null))
    torch.testing.assert_close(D[[0, 2]], cond[[0, 2]])
    torch.testing.assert_close(D[1], (uncond + 2.0 * (cond - uncond))[1])
    with pytest.raises(ValueError, match="null"):
        guided_denoiser(fake, coords, None, 2.0)


def test_sigma_steps_karras_schedule():
    cfg = SamplerConfig(steps=18)
    t = sigma_steps(cfg)
    assert t.dtype == torch.float64 and t.shape == (19,)
    assert t[0].item() == pytest.approx(80.0) and t[-2].item() == pytest.approx(0.002) and t[-1].item() == 0.0
    assert (t[:-1] > t[1:]).all()
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigma_steps(SamplerConfig(steps=3))[1].item() == pytest.approx(mid)
    assert sigma_steps(SamplerConfig(steps=1)).tolist() == [80.0, 0.0]


MU, S = 0.7, 0.3  # data ~ N(MU, S^2) per element, whose ideal denoiser is known in closed form


def gaussian_denoiser(x, sigma, coords, labels):
    s2 = sigma.view(-1, 1, 1, 1) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def test_heun_follows_the_exact_ode_for_gaussian_data():
    noise = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = MU + (80 * noise.double() - MU) * S / math.sqrt(S**2 + 80**2)  # PF-ODE solution at sigma = 0
    labels = torch.zeros(64, dtype=torch.long)

    def error(steps: int, method: str) -> float:
        x0 = sample(gaussian_denoiser, noise, labels, SamplerConfig(steps=steps, method=method))
        return (x0.double() - exact).abs().max().item()

    assert error(100, "heun") < 5e-3
    assert 3.0 < error(18, "heun") / error(36, "heun") < 6.0  # second order: halving h quarters the error
    assert 1.5 < error(18, "euler") / error(36, "euler") < 2.5  # first order
    assert error(36, "heun") < error(36, "euler") / 5


def test_single_point_data_lands_exactly_and_cfg_applies():
    def point(x, sigma, coords, labels):  # cond -> 1.0, null -> -2.0 on every channel
        return torch.where(labels == 10, -2.0, 1.0).view(-1, 1, 1, 1).expand(x.shape).float()

    noise, labels = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4])
    x0 = sample(point, noise, labels, SamplerConfig(steps=5))
    torch.testing.assert_close(x0, torch.ones_like(x0), atol=1e-6, rtol=0)
    x0 = sample(point, noise, labels, SamplerConfig(steps=5, cfg_scale=2.0), null_class=10)
    torch.testing.assert_close(x0, torch.full_like(x0, 4.0), atol=1e-5, rtol=0)  # -2 + 2 (1 + 2)


def test_sampler_binds_the_full_coordinate_grid():
    seen = []

    def check(x, sigma, coords, labels):
        seen.append(coords)
        return torch.zeros_like(x)

    sample(check, torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), SamplerConfig(steps=2))
    assert torch.equal(seen[0], coord_grid(8))


def test_stochastic_sampler_gaussian_statistics_and_per_sample_reproducibility():
    cfg = SamplerConfig(steps=128, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.0)
    noise = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2000, dtype=torch.long)
    x0 = sample(gaussian_denoiser, noise, labels, cfg, generator=torch.Generator().manual_seed(2))
    assert abs(x0.mean().item() - MU) < 0.015 and abs(x0.std().item() - S) < 0.015

    def per_sample(seeds):  # EDM2-style: one RNG stream per sample index
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return lambda x: torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])

    noise, labels = torch.randn(4, 4, 4, 4), torch.zeros(4, dtype=torch.long)
    whole = sample(gaussian_denoiser, noise, labels, cfg, generator=per_sample([10, 11, 12, 13]))
    half = sample(gaussian_denoiser, noise[2:], labels[2:], cfg, generator=per_sample([12, 13]))
    torch.testing.assert_close(whole[2:], half)
    other = sample(gaussian_denoiser, noise, labels, cfg, generator=per_sample([20, 21, 22, 23]))
    assert not torch.allclose(whole, other)


def test_configs_load_and_authors_sampler():
    assert config.load(EDMConfig) == EDMConfig()
    cfg = config.load(SamplerConfig, overrides=["cfg_interval=[0.3, 5.0]", "method=euler"])
    assert cfg.cfg_interval == [0.3, 5.0] and cfg.method == "euler" and cfg.S_max == math.inf
    assert (AUTHORS_IMAGENET256.steps, AUTHORS_IMAGENET256.S_churn, AUTHORS_IMAGENET256.cfg_scale) == (256, 40.0, 1.3)
