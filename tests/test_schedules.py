"""The EMA half-life and the lr warm-up, checked numerically on short real runs of the tiny config.

The expected values are computed here from the config values alone, by the formulas the docs
state (config.py's EMAConfig / OptimConfig, README): EDM-style EMA whose per-step decay is
``0.5 ** (patches this step / half-life)`` with the half-life capped at ``rampup_ratio x patches
seen`` (after the step), and a linear lr warm-up over ``optim.warmup_patches`` patches seen
(before the step), then constant.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainkit import tiny_cfg

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("rampup", [0.5, None], ids=["rampup", "no-rampup"])
def test_ema_follows_the_half_life_in_patches(shards, tmp_path, rampup):  # noqa: F811
    import latent_patch.train as train_mod

    half_life = 100.0
    cfg = tiny_cfg(shards, tmp_path / "run", f"ema.half_life_patches={half_life}",
                   f"ema.rampup_ratio={'null' if rampup is None else rampup}", "run.total_patches=100000")
    trainer, _ = train_mod.prepare_run(cfg, None)
    assert torch.equal(torch.cat([p.flatten() for p in trainer.ema.parameters()]),
                       torch.cat([p.flatten() for p in trainer.net.parameters()]))  # EMA starts at the init
    capped_steps, product, capped_patches = 0, 1.0, 0
    for _ in range(12):
        before = _params(trainer.ema)
        plan = train_mod.plan_step(trainer)
        train_mod.train_step(trainer, plan)
        seen = trainer.progress.patches  # after this step
        h = half_life if rampup is None else min(half_life, rampup * seen)
        beta = 0.5 ** (plan.patches / h)
        for e0, e1, w in zip(before, trainer.ema.parameters(), trainer.net.parameters()):
            torch.testing.assert_close(e1, beta * e0 + (1 - beta) * w.detach(), rtol=1e-5, atol=1e-7)
        if h == half_life:
            capped_steps += 1
            product *= beta
            capped_patches += plan.patches
    assert capped_steps >= 4  # the cap (or the constant half-life) was reached within the run
    # what a half-life means: once it is constant, a past weight's share halves every H patches
    assert product == pytest.approx(0.5 ** (capped_patches / half_life), rel=1e-9)
    # the EMA really lags the weights (a beta of 0 or 1 would fail one of these)
    lag = sum(float((e - w).detach().abs().sum()) for e, w in zip(trainer.ema.parameters(), trainer.net.parameters()))
    assert lag > 0


def test_logged_lr_is_the_linear_warm_up_in_patches(shards, tmp_path):  # noqa: F811
    from latent_patch.train import train

    lr, warmup = 1e-3, 200
    cfg = tiny_cfg(shards, tmp_path / "run", f"optim.lr={lr}", f"optim.warmup_patches={warmup}",
                   "run.total_patches=400", "run.log_every_patches=1", "run.ckpt_every_patches=0")
    assert (cfg.optim.lr, cfg.optim.warmup_patches) == (lr, warmup)
    train(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))  # one record per step
    before = 0
    in_warmup = after = 0
    for r in recs:
        expected = lr * min(1.0, before / warmup)  # the step's lr comes from the patches seen before it
        assert r["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), (r["step"], before)
        in_warmup += before < warmup
        after += before >= warmup
        before = r["patches"]
    assert in_warmup >= 4 and after >= 2  # both the ramp and the plateau were logged
