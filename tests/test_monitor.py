"""The training console and its records, on a fake clock: the progress bar (budget, rates, ETA),
and the per-interval metrics.jsonl records whose rates cover their whole window (issue 14)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from latent_patch import monitor
from latent_patch.checkpoint import Progress
from latent_patch.train import StepPlan


class Clock:
    """time.perf_counter for the monitor: advanced by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(monitor.time, "perf_counter", c)
    return c


def run_cfg(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"total_patches": 10_000, "total_flops": 0.0, "stop_flops": 0.0, **kw})


def plan(patches: int, full: float, flops: float = 0.0) -> StepPlan:
    return StepPlan(size=8, mult=4, patches=patches, full_equiv=full, flops=flops)


def test_bar_counts_the_patch_budget_from_where_a_resume_starts_and_excludes_pauses(clock):
    bar = monitor.TrainBar(run_cfg(), Progress(patches=4_000), enabled=True)
    assert (bar.bar.total, bar.bar.n) == (10_000, 4_000) and not bar.by_flops
    for _ in range(10):
        clock.now += 2.0
        bar.update(plan(64, 16.0))
    assert "loss at the first log point" in bar.bar.postfix  # no loss logged yet: not "loss nan"
    bar.paused += 5.0  # a checkpoint
    clock.now += 5.0
    assert bar.train_seconds() == pytest.approx(20.0)
    assert bar.patches == 640 and bar.full_equiv == 160.0 and bar.bar.n == 4_640
    bar.loss = 0.5
    bar.update(plan(64, 16.0))
    assert "full/s" in bar.bar.postfix and "loss 0.5000" in bar.bar.postfix
    assert f"{176 / 20:.0f} full/s" in bar.bar.postfix  # full-image equivalents over the whole run, pauses excluded
    # ETA: tqdm's remaining time is (total - n) / rate with the rate of this invocation (n - initial)
    fmt = bar.bar.format_dict
    fmt["elapsed"], fmt["rate"] = 22.0, None
    line = bar.bar.format_meter(**fmt)
    remaining = (10_000 - 4_704) / (704 / 22.0)
    assert f"<{bar.bar.format_interval(remaining)}" in line, line
    bar.update(plan(9_000, 1.0))  # the last step overshoots the budget: the bar grows with it
    assert bar.bar.total == bar.bar.n == 13_704
    bar.close()


def test_bar_counts_flops_when_a_flop_budget_binds(clock):
    bar = monitor.TrainBar(run_cfg(total_flops=5e12, stop_flops=3e12), Progress(flops=1e12), enabled=True)
    assert bar.by_flops and (bar.bar.total, bar.bar.n) == (3.0, 1.0)  # the nearer end, in TFLOP
    bar.update(plan(64, 16.0, flops=0.5e12))
    assert bar.bar.n == pytest.approx(1.5) and bar.patches == 64
    bar.close()


def fake_trainer(tmp_path, progress: Progress) -> SimpleNamespace:
    logged: list = []
    acc = SimpleNamespace(is_main_process=True, device=torch.device("cpu"), log=lambda d, step: logged.append(d))
    cfg = SimpleNamespace(run=SimpleNamespace(out_dir=str(tmp_path), tensorboard=True))
    opt = SimpleNamespace(param_groups=[{"lr": 1e-3}])
    return SimpleNamespace(progress=progress, accelerator=acc, cfg=cfg, optimizer=opt, logged=logged)


def test_each_record_rates_its_whole_window_and_the_short_tail_rates_the_run(clock, tmp_path):
    p = Progress()
    trainer = fake_trainer(tmp_path, p)
    bar = monitor.TrainBar(run_cfg(), p, enabled=False)
    records = []
    for window_steps, seconds_per_step, pause in ((10, 1.0, 4.0), (10, 3.0, 0.0), (1, 0.1, 0.0)):
        w = monitor.Window(first_step=p.step + 1, start=clock.now)
        for i in range(window_steps):
            clock.now += seconds_per_step
            step = plan(64, 32.0)
            p.step, p.patches, p.full_equiv = p.step + 1, p.patches + 64, p.full_equiv + 32.0
            w.add(step, torch.tensor(0.25 * (i + 1)))
            w.sizes = {8: len(w.sides)}
            bar.update(step)
        w.paused += pause  # a checkpoint inside the window: not training time
        bar.paused += pause
        clock.now += pause
        tail = window_steps == 1  # the run's last, shorter interval
        hist = torch.stack(w.losses)
        records.append(monitor.log_window(trainer, w, hist, bar if tail else None))
    first, second, last = records
    assert first["patches_per_s"] == pytest.approx(640 / 10.0) and first["rate_over"] == "window"
    assert second["patches_per_s"] == pytest.approx(640 / 30.0) and second["full_equiv_per_s"] == pytest.approx(320 / 30)
    # one 0.1 s step alone would claim 640 patches/s: the tail reports the whole run's average instead
    assert last["rate_over"] == "run" and last["patches_per_s"] == pytest.approx(21 * 64 / 40.1)
    assert first["loss"] == pytest.approx(0.25 * 5.5) and first["size_mix"] == {"8": 1.0}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 21] and lines == [
        {**r, "time": lines[i]["time"]} for i, r in enumerate(records)]
    assert [d["train/patches_per_s"] for d in trainer.logged] == [r["patches_per_s"] for r in records]
