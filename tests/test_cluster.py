"""Cluster-scale behaviour simulated on one CPU (issue 13): one patch side per step on every rank,
global batches that split over any process count, SLURM's srun variables."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from latent_patch import config, dist
from latent_patch.checkpoint import Progress
from latent_patch.config import PatchConfig, TrainConfig
from latent_patch.monitor import TrainingError, Window, flush_losses
from latent_patch.patches import PatchSchedule
from latent_patch.seeds import derive_seed
from latent_patch.train import plan_step, split_batch


def _rank_view(rank: int, world: int, seed: int = 0) -> SimpleNamespace:
    """What plan_step reads of a trainer, as rank ``rank`` of ``world`` builds it."""
    cfg = config.load(TrainConfig, None, ["data.batch_size=8", "optim.batch_size_global=64", "run.total_patches=10000"])
    return SimpleNamespace(
        cfg=cfg, progress=Progress(), schedule=PatchSchedule(PatchConfig(), 32), accum=1, R=32, rank=rank,
        world_size=world, flops_per_patch={16: 1.0, 32: 4.0},
        schedule_gen=torch.Generator().manual_seed(derive_seed(seed, 0, "schedule")))


def test_every_rank_draws_the_same_patch_side_each_step():
    ranks = [_rank_view(r, 8) for r in range(8)]
    sides = []
    for _ in range(400):
        plans = [plan_step(t) for t in ranks]
        assert len({p.size for p in plans}) == 1
        assert len({(p.patches, p.flops) for p in plans}) == 1  # every rank counts the same progress
        sides.append(plans[0].size)
    assert 0.42 < sides.count(16) / len(sides) < 0.58  # the schedule's mix over steps is unchanged
    p = plan_step(_rank_view(0, 8))
    assert p.patches == 8 * 8 * p.mult and p.flops == p.patches * {16: 1.0, 32: 4.0}[p.size]


class _TwoRanks:
    """Rank 0's accelerator in a 2-process group whose rank 1 ran ``other_sides``: gather and reduce
    answer as torch.distributed would, so flush_losses sees both ranks' steps."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, other_sides: list[int]):
        self.other = torch.tensor(other_sides)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, self.other.to(t.dtype)])

    def reduce(self, t: torch.Tensor, reduction: str) -> torch.Tensor:
        return t


def _window(sides: list[int]) -> Window:
    w = Window(first_step=11)
    for s in sides:
        w.add(SimpleNamespace(size=s, patches=8, full_equiv=8.0), torch.tensor(0.5))
    return w


def test_the_logged_mix_counts_every_ranks_sides_and_ranks_that_differ_stop_the_run():
    # the logged size mix is gathered from the ranks, not copied from this rank's own draw
    w = _window([16, 32, 16])
    flush_losses(_TwoRanks([16, 32, 16]), w, 24)
    assert w.sizes == {16: 4, 32: 2}
    # a rank that drew another side (step 12 of the window starting at step 11) stops the run
    with pytest.raises(TrainingError, match=r"different patch sides at step 12: \[32, 16\]"):
        flush_losses(_TwoRanks([16, 16, 16]), _window([16, 32, 16]), 24)


@pytest.mark.parametrize("world, expect", [(1, (32, 8)), (8, (32, 1)), (16, (16, 1)), (64, (4, 1)), (256, (1, 1))])
def test_global_batch_splits_over_any_gpu_count(world, expect):
    cfg = config.load(TrainConfig, None, ["optim.batch_size_global=256", "data.batch_size=32"])
    assert split_batch(cfg, world) == expect


def test_global_batch_that_cannot_split_is_refused():
    cfg = config.load(TrainConfig, None, ["optim.batch_size_global=256", "data.batch_size=32"])
    with pytest.raises(TrainingError, match=r"batch_size_global=256 does not split over 3 processes"):
        split_batch(cfg, 3)
    odd = config.load(TrainConfig, None, ["optim.batch_size_global=20", "data.batch_size=8"])
    assert split_batch(odd, 2) == (5, 2)  # 10 per process: the largest micro-batch <= 8 that divides it


def test_srun_variables_give_rank_and_rendezvous(monkeypatch):
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[003-004,010]",
               SLURM_JOB_ID="123456")
    monkeypatch.setattr(os, "environ", env)  # adopt_slurm_env writes: keep it out of the other tests
    assert dist.dist_info() == dist.DistInfo(5, 16, 1)
    dist.adopt_slurm_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "16", "1")
    assert env["MASTER_ADDR"] == "gpu003" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    env.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="0")  # torchrun's variables win
    assert dist.dist_info() == dist.DistInfo(1, 2, 0)
    assert dist.first_host("node17") == "node17" and dist.first_host("a1,a2") == "a1"
