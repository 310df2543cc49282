"""Resuming on a node of many ranks (issue 13): each rank loads only what it needs (no EMA where
none is read), from memory-mapped files whose pages the node's ranks share, with no second copy
in any process; a resume stays exact. And ``--resume auto`` after ``--resume PATH`` of an earlier
checkpoint continues the run's own newest checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from latent_patch import checkpoint as ckpt
from latent_patch import config
from latent_patch.config import TrainConfig
from latent_patch.models import build_model
from latent_patch.seeds import derive_seed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu_dit.yaml"


def make_run(out: Path, *overrides: str, ema: bool = True, seed: int = 0) -> SimpleNamespace:
    """What ``checkpoint.save_run`` / ``resume`` touch of a trainer (``checkpoint.RunState``), for
    one CPU process: the tiny DiT (wider with overrides), its EMA, AdamW, generators."""
    cfg = config.load(TrainConfig, TINY, [f"run.out_dir={out}", "run.keep_last=0", *overrides])
    torch.manual_seed(seed)
    net = build_model(cfg.model)
    acc = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, scaler=None)
    return SimpleNamespace(
        cfg=cfg, accelerator=acc, net=net, ema=copy.deepcopy(net).requires_grad_(False) if ema else None,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), loader=None, manifest=None,
        schedule_gen=torch.Generator().manual_seed(derive_seed(seed, 0, "schedule")),
        gen=torch.Generator().manual_seed(derive_seed(seed, 0, "step")), progress=ckpt.Progress(), rank=0, world_size=1)


def fake_step(run: SimpleNamespace) -> None:
    """An optimizer step with gradients drawn from the run's generator, and an EMA update."""
    for p in run.net.parameters():
        p.grad = torch.randn(p.shape, generator=run.gen)
    run.optimizer.step()
    run.progress.step += 1
    run.progress.patches += 16
    if run.ema is not None:
        torch._foreach_lerp_(list(run.ema.parameters()), list(run.net.parameters()), 0.1)


def trained_checkpoint(out: Path, *overrides: str, steps: int = 2) -> tuple[SimpleNamespace, Path]:
    run = make_run(out, *overrides)
    for _ in range(steps):
        fake_step(run)
    return run, ckpt.save_run(run)


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds ``t``'s data (from /proc/self/maps), or None (anonymous memory)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5].strip() if len(fields) > 5 and fields[5].startswith("/") else None
    return None


# --------------------------------------------------------------------------- exactness

def test_resume_restores_every_tensor_and_continues_identically(tmp_path):
    a, saved = trained_checkpoint(tmp_path / "a")
    state_bytes = (saved / ckpt.STATE_FILE).read_bytes()
    b = make_run(tmp_path / "b", seed=1)  # other initial weights: everything must come from the file
    ckpt.resume(b, saved)
    assert tensors_equal(a.net.state_dict(), b.net.state_dict())
    assert tensors_equal(a.ema.state_dict(), b.ema.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(optimizer_tensors(a.optimizer), optimizer_tensors(b.optimizer)))
    assert b.progress == a.progress and torch.equal(b.gen.get_state(), a.gen.get_state())
    for run in (a, b):  # b's AdamW state is a private mapping of state.pt: a step writes a copy, never the file
        fake_step(run)
    assert tensors_equal(a.net.state_dict(), b.net.state_dict())
    assert (saved / ckpt.STATE_FILE).read_bytes() == state_bytes
    again = ckpt.save_run(b)  # a mapped tensor is saved as itself, not with the file it maps
    assert abs((again / ckpt.STATE_FILE).stat().st_size - len(state_bytes)) < 4096


def test_inference_model_loads_tensor_by_tensor(tmp_path, monkeypatch):
    """sample.py's loader copies from the mapped file into the network; no whole-file dict."""
    a, saved = trained_checkpoint(tmp_path / "a")
    monkeypatch.setattr(ckpt, "load_weights", lambda *args, **kw: pytest.fail("whole-file load"))
    net, _, _ = ckpt.load_inference_model(tmp_path / "a")
    assert tensors_equal(net.state_dict(), a.ema.state_dict())
    net, _, _ = ckpt.load_inference_model(saved, use_ema=False)
    assert tensors_equal(net.state_dict(), a.net.state_dict())


# --------------------------------------------------------------------------- what each rank reads

def test_a_rank_without_an_ema_never_opens_the_ema_file(tmp_path, monkeypatch):
    a, saved = trained_checkpoint(tmp_path / "a")
    ema_file = saved / ckpt.EMA_FILE
    ema_file.write_bytes(b"\xff" * ema_file.stat().st_size)  # unreadable, yet of the size DONE lists
    opened = []
    real_open = ckpt.safe_open
    monkeypatch.setattr(ckpt, "safe_open", lambda path, *args, **kw: opened.append(Path(path).name)
                        or real_open(path, *args, **kw))
    monkeypatch.setattr(ckpt, "load_file", lambda *args, **kw: pytest.fail("whole-file load"))
    b = make_run(tmp_path / "b", ema=False, seed=1)
    ckpt.resume(b, saved)
    assert opened == [ckpt.MODEL_FILE] and tensors_equal(a.net.state_dict(), b.net.state_dict())
    with pytest.raises(ckpt.CheckpointError, match=r"ema\.safetensors: cannot read weights"):
        ckpt.resume(make_run(tmp_path / "c", seed=1), saved)  # a rank that holds an EMA reads it


@pytest.mark.parametrize("rank,fid_every,holds", [(0, 0, True), (1, 0, False), (1, 1000, True)])
def test_only_ranks_that_read_the_ema_hold_one(tmp_path, rank, fid_every, holds):
    """Rank 0 saves and previews the EMA; with FID on, every rank samples its share from its own
    (identical) EMA; otherwise other ranks hold none, so they neither load nor update one."""
    from latent_patch.train import build_trainer

    cfg = config.load(TrainConfig, TINY, [f"run.out_dir={tmp_path}", f"eval.fid_every_patches={fid_every}",
                                          "eval.fid_ref=unused.npz"])
    acc = SimpleNamespace(process_index=rank, num_processes=2, is_main_process=rank == 0,
                          device=torch.device("cpu"), prepare=lambda *objs: objs)
    trainer = build_trainer(cfg, acc, iter(()), None, (4, 8), {"scaling_factor": 0.5})
    assert (trainer.ema is not None) == holds


# --------------------------------------------------------------------------- memory

MEASURE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from test_checkpoint_cluster import make_run, mapped_file, optimizer_tensors
from latent_patch import checkpoint as ckpt

def rss():
    f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return {k: int(f[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}

torch.set_num_threads(1)
saved = Path(sys.argv[2])
run = make_run(Path(sys.argv[3]), *sys.argv[4:], seed=1)
before = rss()
ckpt.resume(run, saved)
sum(float(t.sum()) for t in optimizer_tensors(run.optimizer))  # read every page
after = rss()
files = {mapped_file(t) for t in optimizer_tensors(run.optimizer) if t.dim()}
print(json.dumps({"anon_mib": after["RssAnon"] - before["RssAnon"], "file_mib": after["RssFile"] - before["RssFile"],
                  "optimizer_in": sorted(str(f) for f in files)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_resume_in_a_fresh_process_holds_no_private_copy_of_the_checkpoint(tmp_path):
    """A fresh process resumes a 130 MiB checkpoint (model, EMA, AdamW state): its private memory
    grows by far less than the file sizes (before issue 13: by all of state.pt, each rank); the
    pages it reads are file-backed, the page cache's one copy per node."""
    wide = ["model.hidden=384", "model.heads=6", "model.depth=3"]
    _, saved = trained_checkpoint(tmp_path / "a", *wide, steps=1)
    sizes = {name: (saved / name).stat().st_size / 2**20 for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.STATE_FILE)}
    assert sizes[ckpt.STATE_FILE] > 60, sizes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(Path(__file__).parent), str(saved), str(tmp_path / "b"),
                           *wide], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["optimizer_in"] == [str(saved / ckpt.STATE_FILE)], got  # AdamW's state: views of the file
    assert got["anon_mib"] < 0.1 * sum(sizes.values()), (got, sizes)
    assert got["file_mib"] > 0.9 * sizes[ckpt.STATE_FILE], (got, sizes)


# --------------------------------------------------------------------------- --resume auto after --resume PATH

def test_resume_auto_after_resuming_an_earlier_checkpoint_continues_the_new_branch(tmp_path):
    """Steps 2, 4, 6 written (keep_last=2 keeps 4 and 6); --resume PATH of step 4 writes 5, which
    pruning keeps (and 4 goes); --resume auto then takes 5, not the abandoned 6, and continues to
    a new 6 that replaces the abandoned one."""
    run = make_run(tmp_path, "run.keep_last=2")
    for _ in range(3):
        fake_step(run)
        fake_step(run)
        ckpt.save_run(run)
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [4, 6]
    branch = make_run(tmp_path, "run.keep_last=2", seed=1)
    ckpt.resume(branch, ckpt.resolve_resume(str(tmp_path / "checkpoints" / ckpt.ckpt_name(4)), tmp_path))
    fake_step(branch)
    five = ckpt.save_run(branch)
    assert five.name == ckpt.ckpt_name(5) and [s for s, _ in ckpt.list_complete(tmp_path)] == [5, 6]
    assert ckpt.resolve_resume("auto", tmp_path) == five == ckpt.resolve_checkpoint(tmp_path)
    later = make_run(tmp_path, "run.keep_last=2", seed=2)
    ckpt.resume(later, ckpt.resolve_resume("auto", tmp_path))
    assert later.progress.step == 5 and tensors_equal(later.net.state_dict(), branch.net.state_dict())
    fake_step(later)
    ckpt.save_run(later)
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [5, 6]
    assert ckpt.find_latest(tmp_path).name == ckpt.ckpt_name(6)
    assert tensors_equal(ckpt.load_weights(ckpt.find_latest(tmp_path)), later.net.state_dict())  # the new 6
