"""latent_patch.checkpoint: atomic folders with DONE last, latest = newest write, pruning, damage errors."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from latent_patch import checkpoint as ckpt
from latent_patch import config

ROOT = Path(__file__).resolve().parents[1]


def fake_checkpoint(run: Path, step: int, payload: bytes = b"x", keep_last: int = 0) -> Path:
    """A complete checkpoint folder written through the real begin/finish path."""
    tmp = ckpt.begin(run, step)
    ckpt.save_weights(tmp / ckpt.MODEL_FILE, {"w": torch.full((4,), float(step))}, {"step": str(step)})
    ckpt.save_state(tmp / ckpt.STATE_FILE, {"step": step, "blob": payload})
    return ckpt.finish(tmp, keep_last)


def test_finish_renames_and_lists_sizes(tmp_path):
    final = fake_checkpoint(tmp_path, 7)
    assert final == tmp_path / "checkpoints" / "step-000000007"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    sizes = ckpt.verify(final)
    assert set(sizes) == {ckpt.MODEL_FILE, ckpt.STATE_FILE}
    assert sizes[ckpt.STATE_FILE] == (final / ckpt.STATE_FILE).stat().st_size
    assert ckpt.load_state(final / ckpt.STATE_FILE)["step"] == 7


def test_latest_is_the_newest_write_not_mtime_or_size(tmp_path):
    nine = fake_checkpoint(tmp_path, 9, b"much bigger" * 1000)
    ten = fake_checkpoint(tmp_path, 10, b"small")  # written later, smaller, then given an old mtime
    for p in (ten, ten / ckpt.DONE):
        os.utime(p, (time.time() - 1000, time.time() - 1000))
    assert ckpt.find_latest(tmp_path) == ten
    # half-written later ones: a folder without DONE, a writer's temp folder, a stray name
    (tmp_path / "checkpoints" / "step-000000011").mkdir()
    (tmp_path / "checkpoints" / "step-000000011" / ckpt.MODEL_FILE).write_bytes(b"partial")
    ckpt.begin(tmp_path, 12)
    (tmp_path / "checkpoints" / "step-latest").mkdir()
    assert ckpt.find_latest(tmp_path) == ten
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [9, 10]
    assert ckpt.resolve_resume("auto", tmp_path) == ten
    assert nine.exists() and [ckpt.write_seq(nine), ckpt.write_seq(ten)] == [1, 2]


def _old_format(folder: Path) -> Path:
    """Rewrite a checkpoint's DONE as code before write sequence numbers wrote it (sizes only)."""
    done = ckpt.fsutil.read_json(folder / ckpt.DONE)
    ckpt.fsutil.atomic_write_json(folder / ckpt.DONE, {"files": done["files"]})
    return folder


def _copy_run(src: Path, dst: Path, newest_marker: int) -> None:
    """``cp -r`` of a run folder (mtimes reset), after which the marker of step ``newest_marker``
    has the newest mtime (copy order, a later rsync, a touch): mtimes say nothing about the run."""
    shutil.copytree(src, dst, copy_function=shutil.copy)
    future = time.time() + 1000
    os.utime(dst / "checkpoints" / ckpt.ckpt_name(newest_marker) / ckpt.DONE, (future, future))


def test_latest_after_a_resume_from_an_earlier_step_is_the_runs_newest_write(tmp_path):
    """Issue 13: resumed from step 1000 while the abandoned branch's 5000 exists, the run wrote
    1500 and 2000: --resume auto and sample.py (a run folder -> its latest) take 2000, also after
    the run folder was copied."""
    run = tmp_path / "run"
    for step in (1000, 5000):
        fake_checkpoint(run, step)
    for step in (1500, 2000):
        fake_checkpoint(run, step, b"branch")
    newest = run / "checkpoints" / ckpt.ckpt_name(2000)
    assert ckpt.find_latest(run) == newest
    assert ckpt.resolve_resume("auto", run) == newest == ckpt.resolve_checkpoint(run)
    assert [s for s, _ in ckpt.list_complete(run)] == [1000, 1500, 2000, 5000]  # still by step
    _copy_run(run, tmp_path / "copy", newest_marker=5000)
    assert ckpt.find_latest(tmp_path / "copy").name == ckpt.ckpt_name(2000)


def test_pruning_a_copied_run_keeps_its_own_newest_writes(tmp_path):
    """keep_last counts the run's writes (DONE's sequence number), not DONE's mtime: a run resumed
    from 1000 past an abandoned 5000, then copied with cp -r, keeps 1500 and the new 2000."""
    src = tmp_path / "src"
    for step in (1000, 5000):
        fake_checkpoint(src, step)
    fake_checkpoint(src, 1500, b"branch")
    run = tmp_path / "run"
    _copy_run(src, run, newest_marker=5000)
    new = fake_checkpoint(run, 2000, b"branch", keep_last=2)
    assert [s for s, _ in ckpt.list_complete(run)] == [1500, 2000]
    assert ckpt.find_latest(run) == new and ckpt.write_seq(new) == 4


def test_markers_without_a_sequence_number_count_as_older_than_numbered_ones(tmp_path):
    """Checkpoints of code before sequence numbers order by step (as that code did), below every
    numbered one: the first write of new code after them is the latest."""
    for step in (3, 7):
        _old_format(fake_checkpoint(tmp_path, step))
    assert ckpt.find_latest(tmp_path).name == ckpt.ckpt_name(7)
    five = fake_checkpoint(tmp_path, 5, keep_last=2)
    assert ckpt.find_latest(tmp_path) == five and ckpt.write_seq(five) == 1
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [5, 7]  # 3 pruned: the lowest old step


def test_keep_last_prunes_lowest_steps(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 5, keep_last=2)
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [4, 5]


def test_same_step_is_replaced_atomically(tmp_path):
    fake_checkpoint(tmp_path, 3, b"old")
    final = fake_checkpoint(tmp_path, 3, b"new")
    assert ckpt.load_state(final / ckpt.STATE_FILE)["blob"] == b"new"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000003"]


def test_remove_stale_clears_writer_leftovers(tmp_path):
    fake_checkpoint(tmp_path, 1)
    ckpt.begin(tmp_path, 2)
    assert [p.name for p in ckpt.remove_stale(tmp_path)] == [".tmp-step-000000002"]
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [1]


def test_resolve_paths_and_errors(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None  # fresh run
    assert ckpt.resolve_resume(None, tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no such"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    final = fake_checkpoint(tmp_path, 4)
    assert ckpt.resolve_checkpoint(tmp_path) == final and ckpt.resolve_checkpoint(final) == final
    (final / ckpt.DONE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_checkpoint(final)


def test_truncated_or_missing_file_is_named(tmp_path):
    final = fake_checkpoint(tmp_path, 2)
    data = (final / ckpt.MODEL_FILE).read_bytes()
    (final / ckpt.MODEL_FILE).write_bytes(data[:-8])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: truncated"):
        ckpt.verify(final)
    (final / ckpt.MODEL_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: missing"):
        ckpt.verify(final)


def test_damaged_files_of_right_size_are_named(tmp_path):
    final = fake_checkpoint(tmp_path, 2)
    for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE):
        size = (final / name).stat().st_size
        (final / name).write_bytes(b"\xff" * size)
    ckpt.verify(final)  # sizes still match
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: cannot read weights"):
        ckpt.load_weights(final)
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: cannot read training state"):
        ckpt.load_state(final / ckpt.STATE_FILE)


class NotData:
    """An arbitrary object: torch.load(weights_only=True) must refuse to build it."""


def test_state_is_loaded_weights_only(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"evil": NotData()}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: cannot read training state"):
        ckpt.load_state(path)


def _train_config(*overrides: str):
    from latent_patch.config import TrainConfig

    return config.load(TrainConfig, ROOT / "configs" / "tiny_cpu_dit.yaml", list(overrides))


def _write_model_checkpoint(run: Path, step: int, cfg) -> tuple[dict, dict]:
    from latent_patch.models import build_model

    torch.manual_seed(step)
    net, ema = build_model(cfg.model), build_model(cfg.model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)  # tell EMA and raw weights apart
    tmp = ckpt.begin(run, step)
    ckpt.save_weights(tmp / ckpt.MODEL_FILE, net.state_dict(), {})
    ckpt.save_weights(tmp / ckpt.EMA_FILE, ema.state_dict(), {})
    config.save(cfg, tmp / ckpt.CONFIG_FILE)
    (tmp / ckpt.MANIFEST_FILE).write_text('{"class_names": ["a", "b"]}')
    ckpt.finish(tmp)
    return net.state_dict(), ema.state_dict()


def test_load_inference_model_from_run_or_checkpoint(tmp_path):
    cfg = _train_config()
    _write_model_checkpoint(tmp_path, 1, cfg)
    raw, ema = _write_model_checkpoint(tmp_path, 2, cfg)
    net, loaded_cfg, manifest = ckpt.load_inference_model(tmp_path)  # run folder -> latest (step 2), EMA
    assert loaded_cfg.model == cfg.model and manifest == {"class_names": ["a", "b"]}
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())
    net_raw, _, _ = ckpt.load_inference_model(tmp_path / "checkpoints" / "step-000000002", use_ema=False)
    assert all(torch.equal(v, raw[k]) for k, v in net_raw.state_dict().items())


def test_weights_of_another_model_are_refused(tmp_path):
    cfg = _train_config()
    _write_model_checkpoint(tmp_path, 1, cfg)
    final = tmp_path / "checkpoints" / "step-000000001"
    config.save(_train_config("model.hidden=32"), final / ckpt.CONFIG_FILE)  # config says another width
    sizes = ckpt.fsutil.read_json(final / ckpt.DONE)["files"]
    sizes[ckpt.CONFIG_FILE] = (final / ckpt.CONFIG_FILE).stat().st_size
    ckpt.fsutil.atomic_write_json(final / ckpt.DONE, {"files": sizes})
    with pytest.raises(ckpt.CheckpointError, match=r"ema\.safetensors: weights do not fit this model"):
        ckpt.load_inference_model(final)


def test_kill_between_the_two_renames_of_a_replacement_is_recovered(tmp_path):
    """Replacing step-X moves the old copy to .old-step-X, then publishes .tmp-step-X: a kill in
    between leaves no step-X. recover() publishes the complete new copy, or restores the old one."""
    fake_checkpoint(tmp_path, 1)
    final = fake_checkpoint(tmp_path, 2, b"old")
    root = tmp_path / "checkpoints"
    tmp = ckpt.begin(tmp_path, 2)
    ckpt.save_state(tmp / ckpt.STATE_FILE, {"blob": b"new"})
    ckpt.fsutil.atomic_write_json(tmp / ckpt.DONE, {"files": {ckpt.STATE_FILE: (tmp / ckpt.STATE_FILE).stat().st_size},
                                                   "seq": 3})  # as finish() writes it
    final.rename(root / ".old-step-000000002")  # SIGKILL here
    assert ckpt.find_latest(tmp_path).name == "step-000000001"
    assert ckpt.recover(tmp_path) == ["published step-000000002, whose replacement a kill interrupted"]
    assert ckpt.load_state(ckpt.find_latest(tmp_path) / ckpt.STATE_FILE)["blob"] == b"new"
    # the new copy incomplete (killed before its DONE): the old one comes back
    ckpt.remove_stale(tmp_path)
    final = ckpt.find_latest(tmp_path)
    (ckpt.begin(tmp_path, 2) / ckpt.STATE_FILE).write_bytes(b"partial")
    final.rename(root / ".old-step-000000002")
    assert ckpt.recover(tmp_path) == ["restored step-000000002, whose replacement a kill interrupted"]
    assert ckpt.load_state(ckpt.find_latest(tmp_path) / ckpt.STATE_FILE)["blob"] == b"new"


def test_a_lone_complete_temp_folder_is_not_promoted(tmp_path):
    fake_checkpoint(tmp_path, 1)
    tmp = ckpt.begin(tmp_path, 2)
    ckpt.fsutil.atomic_write_json(tmp / ckpt.DONE, {"files": {}})
    assert ckpt.recover(tmp_path) == [] and ckpt.find_latest(tmp_path).name == "step-000000001"


def test_pruning_keeps_the_newest_writes_after_a_resume_from_an_earlier_step(tmp_path):
    """Issue 13: resumed from step 2 of a run that reached 4, the new checkpoints (3', then 4'
    replacing 4) are kept and the abandoned branch goes, instead of each new one being deleted."""
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    new = fake_checkpoint(tmp_path, 3, b"branch", keep_last=2)  # same step: replaced, written last
    assert new.exists() and ckpt.load_state(new / ckpt.STATE_FILE)["blob"] == b"branch"
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [3, 4]  # 3' (newest) and 4 (next newest)
    fake_checkpoint(tmp_path, 2, b"older step, newest write", keep_last=1)
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [2]  # the checkpoint just written survives


# --------------------------------------------------------------------------- checkpoints saved before FLOP counting

def _without_flops(run: Path) -> tuple[Path, float]:
    """The run's latest checkpoint made as code before FLOP counting saved it: no "flops" in its
    state (and DONE's size of state.pt updated). Returns it and the FLOPs it had counted."""
    final = ckpt.find_latest(run)
    state = dict(ckpt.load_state(final / ckpt.STATE_FILE))
    flops = state.pop("flops")
    ckpt.save_state(final / "state.new", state)  # not over the mapped file (load_state maps it)
    os.replace(final / "state.new", final / ckpt.STATE_FILE)
    done = ckpt.fsutil.read_json(final / ckpt.DONE)
    done["files"][ckpt.STATE_FILE] = (final / ckpt.STATE_FILE).stat().st_size
    ckpt.fsutil.atomic_write_json(final / ckpt.DONE, done)
    return final, flops


@pytest.mark.usefixtures("fresh_accelerate")
def test_a_checkpoint_saved_before_flop_counting_resumes_with_its_flops_or_is_refused(shards, tmp_path, capsys):
    """Issue 27: such a checkpoint resumed at 0 FLOPs: run.total_flops / stop_flops overshot and the
    progressive ramp went back. One patch side: its FLOPs follow from its patches, exactly; several:
    a FLOP budget is refused in one line naming the checkpoint, and without one the run resumes."""
    from latent_patch import train as train_mod
    from latent_patch.models import forward_flops
    from tests.trainkit import TINY, tiny_cfg
    from train_latent import main

    common = ["run.total_patches=64", "run.ckpt_every_patches=64", "run.progress=false"]
    one_side = ["patch.sizes=[0.5]", "patch.probs=[1.0]"]
    train_mod.train(tiny_cfg(shards, tmp_path / "one", *common, *one_side))
    old, flops = _without_flops(tmp_path / "one")
    assert flops > 0
    budget = f"run.total_flops={10 * flops}"
    trainer, _ = train_mod.prepare_run(tiny_cfg(shards, tmp_path / "one", *common, *one_side, budget), str(old))
    trainer.accelerator.end_training()
    assert trainer.progress.patches == 64 and trainer.progress.flops == pytest.approx(flops, rel=1e-12)

    train_mod.train(tiny_cfg(shards, tmp_path / "two", *common))  # sides 4 and 8
    old, _ = _without_flops(tmp_path / "two")
    for flag in (budget, "run.stop_flops=1e9"):
        capsys.readouterr()
        rc = main(["--config", str(TINY), f"data.shards={shards}", f"run.out_dir={tmp_path / 'two'}",
                   "run.tensorboard=false", "--resume", str(old), "run.total_patches=128", flag])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and err[-1].startswith(f"train_latent.py: error: {old} was saved before FLOP counting and "
                                              "its run drew patch sides [4, 8] in unrecorded numbers")
        assert err[-1].endswith("resume it with a patch budget (run.total_patches) and run.total_flops=0 "
                                "run.stop_flops=0")
    resumed_at = ckpt.load_state(old / ckpt.STATE_FILE)["patches"]
    done = train_mod.train(tiny_cfg(shards, tmp_path / "two", *common, "run.total_patches=128"), str(old))
    assert "the FLOP figures count from this resume" in (tmp_path / "two" / "log.txt").read_text()
    cost = {s: 3 * forward_flops(trainer.cfg.model, s) for s in (4, 8)}
    new = done.patches - resumed_at  # only this resume's patches are counted
    assert new > 0 and cost[4] * new <= done.flops <= cost[8] * new
