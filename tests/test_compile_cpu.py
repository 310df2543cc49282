"""run.compile=true with the real inductor backend on the CPU (gcc builds the kernels): a few steps of
the tiny config give the eager run's losses and weights within float tolerance.

Inductor fuses and reorders float ops, so equality is to a tolerance, not bitwise. The first
compile (forward and backward of one patch side, the only side here) took ~135 s on the shared
2-core test machine with a cold inductor cache (~5 s once inductor's on-disk cache holds the
kernels): marked slow.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainkit import tiny_cfg

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate")]

STEPS = 4


def _run(shards, out, compile_: bool) -> tuple[list[float], list[int], torch.nn.Module, object]:  # noqa: F811
    import latent_patch.train as train_mod

    cfg = tiny_cfg(shards, out, f"run.compile={'true' if compile_ else 'false'}", "run.compile_backend=inductor",
                   "patch.sizes=[0.5]", "patch.probs=[1.0]")  # one patch side: one graph to build
    trainer, _ = train_mod.prepare_run(cfg, None)
    losses, sizes = [], []
    for _ in range(STEPS):
        plan = train_mod.plan_step(trainer)
        losses.append(float(train_mod.train_step(trainer, plan)))
        sizes.append(plan.size)
    return losses, sizes, trainer.net, trainer.precond.net


def test_inductor_compiled_training_matches_eager(shards, tmp_path):  # noqa: F811
    import torch._dynamo
    from torch._dynamo.utils import counters

    from accelerate.state import AcceleratorState, GradientState

    torch._dynamo.reset()
    counters.clear()
    try:
        eager_losses, eager_sizes, eager_net, eager_fwd = _run(shards, tmp_path / "eager", False)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        losses, sizes, net, fwd = _run(shards, tmp_path / "compiled", True)
        assert not isinstance(eager_fwd, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(fwd, torch._dynamo.eval_frame.OptimizedModule)  # run.compile=true compiled it ...
        assert counters["inductor"]  # ... and inductor built its graphs
        assert sizes == eager_sizes == [4] * STEPS
        assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
        for (name, p), q in zip(net.named_parameters(), eager_net.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)
    finally:
        torch._dynamo.reset()
