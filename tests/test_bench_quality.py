"""The quality-vs-compute summary (issue 12): where an arm reaches the full run's final FD, and
the wall-clock conversion, computed from hand-made points whose answers are known."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def points(fds: list[float], budget: float = 6e15, secs: list[float] | None = None) -> list[dict]:
    """Six evaluation points at equal budget fractions; ``secs``: cumulative wall seconds."""
    secs = secs or [10.0 * (k + 1) for k in range(len(fds))]
    return [{"k": k + 1, "train_flops": budget * (k + 1) / len(fds), "budget_flops": budget, "fd": fd,
             "acc": 0.5, "train_s": s} for k, (fd, s) in enumerate(zip(fds, secs))]


def test_compute_to_reach_is_interpolated_between_points_and_null_if_never():
    bq = _bench()
    full = points([9.0, 6.0, 4.0, 3.0, 2.5, 2.0])
    fast = points([8.0, 4.0, 2.0, 1.5, 1.4, 1.3])  # 2.0 at point 3 exactly: 3/6 of the budget
    between = points([8.0, 5.0, 3.0, 1.0, 1.0, 1.0])  # 3.0 -> 1.0 between 3/6 and 4/6: 2.0 at 3.5/6
    never = points([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    assert bq.reach_fraction(fast, 2.0) == pytest.approx(0.5)
    assert bq.reach_fraction(between, 2.0) == pytest.approx(3.5 / 6)
    assert bq.reach_fraction(never, 2.0) is None
    assert bq.reach_fraction(full, full[-1]["fd"]) == pytest.approx(1.0)
    out = bq.summarize({"unet_full": {0: full, 1: full}, "unet_patch": {0: fast, 1: between},
                        "unet_progressive": {0: never, 1: never}}, evals=6)
    reach = out["unet_patch"]["compute_to_full_final_fd"]
    assert reach["mean"] == pytest.approx((0.5 + 3.5 / 6) / 2) and reach["spread"] == pytest.approx(3.5 / 6 - 0.5)
    assert out["unet_progressive"]["compute_to_full_final_fd"] == {"per_seed": [None, None]}
    assert out["unet_patch"]["final_fd"]["mean"] == pytest.approx(1.15)


def test_seconds_per_pflop_is_not_set_by_one_stretched_segment():
    """A run paused (or crowded out) for an hour in one of its six segments: the median segment
    gives the machine's rate; the whole run's mean would give 360x it."""
    bq = _bench()
    steady = points([5.0] * 6)  # 10 s per 1e15 FLOPs
    paused = points([5.0] * 6, secs=[10, 3610, 3620, 3630, 3640, 3650])
    assert bq.seconds_per_pflop(steady) == pytest.approx(10.0)
    assert bq.seconds_per_pflop(paused) == pytest.approx(10.0)
    assert bq.summarize({"dit_full": {0: steady, 1: paused}}, evals=6)["dit_full"]["train_s_per_pflop"]["spread"] \
        == pytest.approx(0.0)


def test_readme_table_says_better_or_worse_only_beyond_the_seeds_range():
    bq = _bench()
    full = points([9.0, 6.0, 4.0, 3.0, 2.5, 2.0])
    full_1 = points([9.0, 6.0, 4.0, 3.0, 2.5, 2.2])  # full: final FD 2.0-2.2
    clear = points([8.0, 4.0, 2.0, 1.5, 1.4, 1.3])  # 1.3-1.9 < 2.0: lower
    overlap = points([8.0, 4.0, 2.0, 2.1, 2.1, 2.1])  # 1.9-2.1 overlaps 2.0-2.2
    table = bq.markdown_table(bq.summarize({
        "dit_full": {0: full, 1: full_1}, "dit_patch": {0: clear, 1: points([8.0, 4.0, 2.0, 1.9, 1.9, 1.9])},
        "dit_route": {0: overlap, 1: points([8.0, 4.0, 2.0, 1.9, 1.9, 1.9])},
        "dit_patch_route": {0: points([9.0] * 6), 1: clear}, "dit2025_full": {0: clear, 1: clear}}, evals=6), 10_000)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "| lower FD |" in rows["dit_patch"] and "| within spread |" in rows["dit_route"]
    assert "| (reference) |" in rows["dit_full"] and "| lower FD |" in rows["dit2025_full"]  # against dit_full
    assert "never in 1 of 2 seeds (others: 0.48)" in rows["dit_patch_route"]  # 2.2 between 4.0 and 2.0
    assert "1.60 (0.60)" in rows["dit_patch"]  # final FD mean (range over seeds)


def test_a_rerun_counts_as_finished_only_when_every_asked_arm_and_seed_holds_all_its_points(tmp_path):
    """A finished sweep's rerun reports without making shards; a partial one must train on."""
    import argparse
    import json

    bq = _bench()
    args = argparse.Namespace(arms="unet_full,unet_patch", seeds="0,1", evals=6)

    def write(arm: str, seed: int, n: int) -> None:
        f = tmp_path / arm / f"seed-{seed}" / "points.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(points([3.0] * n)))

    for arm in ("unet_full", "unet_patch"):
        write(arm, 0, 6)
    write("unet_full", 1, 6)
    assert not bq.finished(args, tmp_path)  # unet_patch seed 1 missing
    write("unet_patch", 1, 5)
    assert not bq.finished(args, tmp_path)  # one point short
    write("unet_patch", 1, 6)
    assert bq.finished(args, tmp_path)
    assert not bq.finished(argparse.Namespace(arms="", seeds="0", evals=6), tmp_path)


def test_the_full_reference_of_a_named_family_is_part_of_what_is_asked(tmp_path):
    """``--arms dit_patch`` is measured against dit_full: a rerun is not finished, and a report
    does not fail, while that reference is missing or partial."""
    import argparse
    import json

    bq = _bench()
    args = argparse.Namespace(arms="dit_patch", seeds="0", evals=6)
    assert bq.asked(args) == (["dit_patch", "dit_full"], [0])
    for arm, n in (("dit_patch", 6), ("dit_full", 3)):
        f = tmp_path / arm / "seed-0" / "points.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(points([3.0] * n)))
    assert not bq.finished(args, tmp_path)
    with pytest.raises(SystemExit, match="bogus"):
        bq.asked(argparse.Namespace(arms="dit_patch,bogus", seeds="0", evals=6))


def test_quick_runs_seed_0_unless_seeds_are_named_so_side_by_side_quick_runs_keep_apart():
    bq = _bench()
    assert bq.parse_args([]).seeds == "0,1"
    assert bq.parse_args(["--quick"]).seeds == "0"
    quick = bq.parse_args(["--quick", "--seeds", "1"])
    assert quick.seeds == "1" and quick.evals == 2 and quick.train_fraction == 0.05
    assert bq.asked(quick)[1] == [1]


def _write_points(res_dir: Path, arm: str, seed: int, n: int) -> list[dict]:
    import json

    pts = points([3.0 + seed] * n)
    f = res_dir / arm / f"seed-{seed}" / "points.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(pts))
    return pts


def test_workers_sharing_a_sweep_train_each_arm_seed_once_and_await_the_ones_another_holds(tmp_path):
    """Two workers on the same list: the arm-seed another (live) worker holds is put off, not
    trained twice; this worker trains the rest in order, then waits for it and reports its points."""
    from latent_patch import filelock

    bq = _bench()
    out, res = tmp_path / "out", tmp_path / "res"
    _write_points(res, "dit_full", 0, 6)  # finished earlier: neither trained nor locked
    other = filelock.FileLock(bq.arm_lock(out, "dit_patch", 0))
    assert other.acquire()  # the other worker, training dit_patch seed 0
    trained: list[tuple[str, int]] = []

    def run(arm: str, seed: int) -> list[dict]:
        trained.append((arm, seed))
        assert filelock.lock_owner(bq.arm_lock(out, arm, seed)).get("token")  # held while it trains
        if (arm, seed) == ("dit_patch", 1):  # meanwhile the other worker finishes its run
            _write_points(res, "dit_patch", 0, 6)
            other.release()
        return _write_points(res, arm, seed, 6)

    got = bq.train_all(["dit_patch", "dit_full"], [0, 1], out, res, 6, run)
    assert trained == [("dit_patch", 1), ("dit_full", 1)]  # seed-major, dit_patch 0 put off and never retrained
    assert got["dit_patch"][0] == points([3.0] * 6) and got["dit_full"][1] == points([4.0] * 6)
    assert not any(out.rglob("train.lock"))  # every lock released


def test_an_arm_seed_whose_worker_died_is_taken_over_and_trained(tmp_path):
    """A lock left by a killed worker (its pid gone on this host) is taken over on the first pass:
    a rerun sweep finishes the half-done arm-seed before starting the next."""
    import json
    import socket
    import subprocess
    import sys

    bq = _bench()
    out, res = tmp_path / "out", tmp_path / "res"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    bq.arm_lock(out, "dit_full", 0).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                                           "token": "killed"}))
    trained: list[tuple[str, int]] = []

    def run(arm: str, seed: int) -> list[dict]:
        trained.append((arm, seed))
        return _write_points(res, arm, seed, 6)

    got = bq.train_all(["dit_full"], [0, 1], out, res, 6, run)
    assert trained == [("dit_full", 0), ("dit_full", 1)]  # in order: taken over at once, not put off
    assert len(got["dit_full"][0]) == 6 and not any(out.rglob("train.lock"))


def test_a_checkpoint_written_for_a_later_segment_is_refused_not_filed_under_the_wrong_fraction(tmp_path,
                                                                                              monkeypatch):
    """Segment 3 may resume from the checkpoint written for segment 3 itself (a run killed during
    that point's evaluation), not from one written for segment 5 (its points lost)."""
    from types import SimpleNamespace

    bq = _bench()
    written_for = {"stop_flops": 0.0}
    monkeypatch.setattr(bq.checkpoint, "find_latest", lambda run_dir: run_dir / "checkpoints" / "step-9")
    monkeypatch.setattr(bq.checkpoint, "load_config", lambda ckpt: SimpleNamespace(run=SimpleNamespace(**written_for)))
    target = 12e15 * 3 / 7  # not round: the config holds it to 6 digits
    for ok in (1e15, float(f"{target:.6g}")):
        written_for["stop_flops"] = ok
        bq.check_resume(tmp_path / "run", target, 3, 7)
    written_for["stop_flops"] = float(f"{12e15 * 5 / 7:.6g}")
    with pytest.raises(SystemExit, match="past evaluation point 3 of 7"):
        bq.check_resume(tmp_path / "run", target, 3, 7)
    monkeypatch.setattr(bq.checkpoint, "find_latest", lambda run_dir: None)
    bq.check_resume(tmp_path / "run", target, 3, 7)  # nothing to resume from


def test_aligning_arms_train_on_shards_with_their_grids(tmp_path):
    """Issue 28: every aligning arm is a REPA arm of the DiT family, trains on the shards that
    hold its grids (full or PCA-cut), and the encoder's one-time cost is read from them."""
    import json

    bq = _bench()
    for arm, dims in bq.FEATURES.items():
        family, overrides = bq.ARMS[arm]
        assert family == "dit" and "repa.weight=0.5" in overrides
        assert bq.shards_folder(tmp_path, dims).name == ("shards-repr" if dims == 0 else f"shards-repr-k{dims}")
    assert set(bq.ENCODERS) <= set(bq.FEATURES) and set(bq.ENCODERS.values()) <= set(bq.ENCODER_RECIPES)
    assert not any(x.startswith("repa.") for a, (_, o) in bq.ARMS.items() if a not in bq.FEATURES for x in o)
    assert bq.shards_folder(tmp_path, None).name == "shards" and "dit_patch_repa" in bq.QUICK_ARMS
    assert bq.arm_shards("dit_patch", tmp_path, tmp_path / "shards", None) == tmp_path / "shards"
    man = tmp_path / "shards-repr-k64" / "manifest.json"
    man.parent.mkdir()
    man.write_text(json.dumps({"repr": {"spec": "demo", "grid": [8, 8], "dims": 64, "flops_per_image": 5,
                                        "flops": 50, "seconds": 1.5}}))
    assert bq.encoder_cost(tmp_path)["shards-repr-k64"]["flops"] == 50


def test_a_recipe_encoders_arms_align_to_its_own_grids_and_refuse_without_it(tmp_path):
    """The e30 arms: the demo encoder's recipe trained longer, made once by the printed command,
    checked against its recipe, its grids in their own shards; never in the default arm list."""
    import argparse
    import json

    bq = _bench()
    args = argparse.Namespace(out=str(tmp_path), train_fraction=1.0)
    folder = tmp_path / "demo-repr-e30"
    with pytest.raises(SystemExit, match=r"train_demo_repr.py --out .*demo-repr-e30 --epochs 30"):
        bq.arm_shards("dit_patch_route_repa_e30", tmp_path / "fraction-1", tmp_path / "shards", args)
    folder.mkdir()
    (folder / "training.json").write_text(json.dumps({"args": {"epochs": 6}}))
    with pytest.raises(SystemExit, match=r"made with \{'epochs': 6\}"):
        bq.encoder_folder("e30", args)
    (folder / "training.json").write_text(json.dumps({"args": {"epochs": 30, "seed": 0}}))
    assert bq.encoder_folder("e30", args) == folder
    assert bq.shards_folder(tmp_path, 0, str(folder)).name == "shards-repr-e30"
    assert bq.shards_folder(tmp_path, 64, str(folder)).name == "shards-repr-e30-k64"
    assert bq.shards_folder(tmp_path, 0, "demo").name == "shards-repr"
    made = tmp_path / "fraction-1" / "shards-repr-e30" / "manifest.json"
    made.parent.mkdir(parents=True)
    made.write_text("{}")  # already encoded: used as it is
    assert bq.arm_shards("dit_repa_e30", tmp_path / "fraction-1", tmp_path / "shards", args) == made.parent
    default_arms = bq.parse_args([]).arms.split(",")
    assert "dit_repa" in default_arms and not set(bq.ENCODERS) & set(default_arms)


def test_a_report_on_some_arms_keeps_the_other_arms_in_summary_json(tmp_path):
    """The REPA sweep reports into the folder of the issue-12 sweep: its rows join, none vanish."""
    bq = _bench()
    path = tmp_path / "summary.json"
    full, fast = points([9.0, 6.0, 4.0, 3.0, 2.5, 2.0]), points([8.0, 4.0, 2.0, 1.5, 1.4, 1.3])
    path.write_text(json.dumps({"summary": {"dit_full": {"n": 1}, "dit_patch": {"n": 2}},
                                              "results": {"dit_full": {"0": full}, "dit_patch": {"0": fast}},
                                              "args": {"arms": "dit_full,dit_patch"}}))
    bq.merge_summary(path, {"dit_full": {"n": 3}, "dit_repa": {"n": 4}},
                     {"dit_full": {0: full}, "dit_repa": {0: fast}}, {"arms": "dit_repa"})
    saved = json.loads(path.read_text())
    assert saved["summary"] == {"dit_full": {"n": 3}, "dit_patch": {"n": 2}, "dit_repa": {"n": 4}}
    assert set(saved["results"]) == {"dit_full", "dit_patch", "dit_repa"}
    assert saved["args_by_arm"] == {"dit_full": {"arms": "dit_repa"}, "dit_patch": {"arms": "dit_full,dit_patch"},
                                    "dit_repa": {"arms": "dit_repa"}}


def test_the_2025_block_arms_get_the_dit_full_arms_budget(tmp_path):
    """Issue 29: the new block's arms are DiT-family arms measured against today's dit_full, on
    its budget, even where their own model costs less per latent (no coordinate channels)."""
    import argparse

    from latent_patch.models import forward_flops

    bq = _bench()
    args = argparse.Namespace(config=str(ROOT / "configs" / "demo.yaml"), family_overrides={}, overrides=[],
                              budget_scale=1.0)
    arms = [a for a in bq.ARMS if a.startswith("dit2025")]
    assert {"dit2025_full", "dit2025_patch", "dit2025_patch_route"} <= set(arms)
    full = bq.arm_budget("dit_full", 0, tmp_path, tmp_path, args)
    for arm in arms:
        assert bq.ARMS[arm][0] == "dit" and bq.arm_budget(arm, 0, tmp_path, tmp_path, args) == full
    own = bq.budget_flops("dit", bq.arm_config("dit2025_patch_nocoord", 0, tmp_path, tmp_path, args), 1.0)
    assert own < full  # its own model embeds fewer channels: the arm's budget is not its own cost
    cfg = bq.arm_config("dit2025_patch", 0, tmp_path, tmp_path, args)
    assert (cfg.model.pos, cfg.model.mlp, cfg.model.norm, cfg.model.qk_norm) == ("rope", "swiglu", "rms", True)
    assert forward_flops(cfg.model) == forward_flops(bq.arm_config("dit_full", 0, tmp_path, tmp_path, args).model)
