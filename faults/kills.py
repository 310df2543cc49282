"""SIGKILL-and-resume: each stage (encode, train, sample) killed mid-work and re-run with the same
command must end with exactly the output of an uninterrupted run; and the summary the benchmark
prints.

Kills wait for an event, not a timer: the job's output on disk must have reached a seeded number
of complete units (shards, checkpoints, sample parts) strictly between where the run started and
the last unit, so every kill lands with work kept and work left; where it landed is recorded as
the fraction of the output kept on disk (``KillRecord.position``)."""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu_dit.yaml"
RES = 32  # pixels; the tiny VAE downsamples 4x, giving the 4 x 8 x 8 latents the tiny configs want


# ============================================================================ verdicts
from .common import (  # noqa: F401
    THREADS, ChainResult, KillRecord, Outcome, Proc, key_diff, last_per_step, manifest_keys, metrics_records, noted_threads, npz_arrays, script_cmd, sha256_file, tar_samples, threads_note,
)
from .inputs import (  # noqa: F401
    train_argv,
)


class Stage:
    """One job under the kill harness, bound to a fresh output folder and its reference.

    Subclasses say how to start the job, when its work has begun, how much of its output is
    complete on disk (in units and as a fraction), what must hold right after a kill, what the
    next run must do about it, and how the finished output compares with the uninterrupted
    reference."""

    name = "stage"
    anchor = re.compile(r"$^")  # a line the job prints when its real work begins
    resume_re = re.compile(r"$^")  # the line a re-run prints about what it kept or resumed from
    units = 1  # complete units (shards, checkpoints, parts) a finished job leaves on disk
    ready: threading.Event | None = None  # set when the reference exists (it may still be running)

    def wait_for_reference(self, timeout: float = 900.0) -> None:
        """Block until the uninterrupted reference is complete: a chain may start before it, so
        the reference and the kills overlap in time (the quick suite's budget is tight)."""
        if self.ready is not None and not self.ready.wait(timeout):
            raise RuntimeError(f"{self.name}: the reference run never completed")

    def command(self) -> list[str]:
        raise NotImplementedError

    def started(self, proc: Proc) -> bool:
        return any(self.anchor.search(line) for line in list(proc.lines))

    def kept(self) -> int:
        """Complete units on disk right now (what a kill waits for)."""
        return 0

    def position(self) -> float:
        """Fraction of the job's output kept on disk: what a new run starts from (for training:
        the latest complete checkpoint's patches)."""
        return self.kept() / self.units

    def progress(self) -> float:
        """Fraction of the job the live run has done (for training: patches logged so far)."""
        return self.position()

    def resumed(self, proc: Proc) -> str:
        """The run's own words on what it kept or resumed from ("" when it said nothing)."""
        found = [m for line in list(proc.lines) if (m := self.resume_re.search(line))]
        return "; ".join(m.group(0) for m in found)

    def after_kill(self) -> tuple[list[str], Any]:
        return [], None

    def after_next(self, snapshot: Any, proc: Proc) -> list[str]:
        return []

    def final(self) -> tuple[int, int, list[str]]:
        raise NotImplementedError

    def report(self) -> dict:
        """Stage-specific figures for the summary, read after :meth:`final`."""
        return {}

    def reference(self) -> Path | None:
        """The uninterrupted run's output that :meth:`final` compares with (None: none)."""
        return None

    def thread_problems(self, runs: set[int | None]) -> list[str]:
        """The premise of comparing bits: the reference was made at the torch thread count noted
        beside it (``note_threads``) and every run of the chain (``runs``: their counts) at that
        same count. Another count may round differently, a pixel one level off that no resume
        caused; so a reference of another or an unknown count is a problem, not a pass by luck."""
        ref = self.reference()
        if ref is None:
            return []
        made_at = noted_threads(ref)
        if made_at is None:
            return [f"{ref.name}: the torch thread count it was made at is not noted in "
                    f"{threads_note(ref).name}, so its bits are not comparable"]
        if runs != {made_at}:
            counts = ", ".join("torch's default" if t is None else str(t) for t in sorted(runs, key=str))
            return [f"the reference {ref.name} was made at {made_at} torch thread(s), the runs compared "
                    f"with it at {counts}: bits may differ for that alone"]
        return []


class EncodeStage(Stage):
    """encode_latents.py into ``out``; reference: an uninterrupted encoding ``ref`` of ``src``."""

    anchor = re.compile(r"^worker \d+/\d+:")
    resume_re = re.compile(r"\d+ already done")

    def __init__(self, src: Path, out: Path, ref: Path, vae: Path, nproc: int = 1,
                 shard_size: int = 8):
        self.src, self.out, self.ref, self.vae, self.nproc = src, out, ref, vae, nproc
        self.shard_size = shard_size
        self.name = f"encode_{nproc}proc"
        self.ref_manifest = json.loads((ref / "manifest.json").read_text())
        self.units = len(self.ref_manifest["shards"])

    def command(self) -> list[str]:
        return script_cmd("encode_latents.py", "--source", self.src, "--out", self.out, "--vae",
                          self.vae, "--resolution", RES, "--shard-size", self.shard_size,
                          "--batch-size", 4, "--threads", THREADS, "--workers", 0, "--device", "cpu",
                          "--no-progress", nproc=self.nproc)

    def reference(self) -> Path:
        return self.ref

    def kept(self) -> int:
        """Final-named shards with their sidecar (the tar is renamed last: both mean complete)."""
        return sum(1 for p in self.out.glob("shard-*.tar") if p.with_suffix(".json").is_file())

    def after_kill(self) -> tuple[list[str], dict[str, tuple[int, str]]]:
        """Every final-named shard must be whole: sidecar present, sha256 and count as recorded."""
        problems, snap = [], {}
        for p in sorted(self.out.glob("shard-*.tar")):
            side = p.with_suffix(".json")
            if not side.is_file():
                problems.append(f"{p.name}: final-named shard without its sidecar")
                continue
            meta = json.loads(side.read_text())
            digest = sha256_file(p)
            if digest != meta["sha256"]:
                problems.append(f"{p.name}: sha256 differs from its sidecar (half-written)")
            elif len(tar_samples(p)) != meta["num_samples"]:
                problems.append(f"{p.name}: sample count differs from its sidecar")
            snap[p.name] = (p.stat().st_ino, digest)
        if (self.out / "manifest.json").is_file():
            problems += manifest_keys(self.out)[1]
        return problems, snap

    def after_next(self, snapshot: dict[str, tuple[int, str]], proc: Proc) -> list[str]:
        """Shards complete at the kill must be kept as they were (not redone, not replaced)."""
        problems = []
        for name, (ino, digest) in snapshot.items():
            p = self.out / name
            if not p.is_file() or p.stat().st_ino != ino or sha256_file(p) != digest:
                problems.append(f"{name}: complete before the kill but rewritten or lost after it")
        return problems

    def final(self) -> tuple[int, int, list[str]]:
        ref_keys, _ = manifest_keys(self.ref)
        keys, problems = manifest_keys(self.out)
        lost, dup, extra = key_diff(ref_keys, keys)
        if extra:
            problems.append(f"{extra} keys that the reference does not have")
        man = json.loads((self.out / "manifest.json").read_text())
        if man["skipped"] != self.ref_manifest["skipped"]:
            problems.append("the skipped list differs from the reference's")
        leftovers = [p.name for p in self.out.glob(".*.tmp")]
        if leftovers:
            problems.append(f"temporary files left behind: {leftovers[:3]}")
        return lost, dup, problems

    def report(self) -> dict:
        return {"byte_identical": self.byte_identical()}

    def byte_identical(self) -> bool:
        """Whether every shard equals the reference's byte for byte (reported, not required)."""
        mine = json.loads((self.out / "manifest.json").read_text())["shards"]
        return [s["sha256"] for s in mine] == [s["sha256"] for s in self.ref_manifest["shards"]]


class TrainStage(Stage):
    """train_latent.py --resume auto into ``run``; reference: the same run uninterrupted."""

    name = "train"
    anchor = re.compile(r"training to [\d,]+ patches")
    resume_re = re.compile(r"resumed from \S+ \(step (\d+)\) at ([\d,]+) patches")

    def __init__(self, shards: Path, run: Path, ref_run: Path, num_classes: int, total: int,
                 ckpt_every: int, ready: threading.Event | None = None):
        self.shards, self.run, self.ref_run, self.ready = shards, run, ref_run, ready
        self.num_classes, self.total, self.ckpt_every = num_classes, total, ckpt_every
        self.units = math.ceil(total / ckpt_every)  # one per ckpt_every patches crossed, the last at the end
        self.max_loss_dev = 0.0  # largest |loss - reference loss| seen after any resume
        self._ref: list[dict] | None = None

    def _ref_records(self) -> list[dict]:
        if self._ref is None:
            self.wait_for_reference()
            self._ref = [r for r in metrics_records(self.ref_run) if "step" in r]
        return self._ref

    @property
    def ref_losses(self) -> dict[int, float]:
        return last_per_step(self._ref_records())

    def command(self) -> list[str]:
        return script_cmd("train_latent.py", *train_argv(self.shards, self.run, self.num_classes,
                                                         total=self.total, ckpt_every=self.ckpt_every))

    def reference(self) -> Path:
        return self.ref_run

    def kept(self) -> int:
        from latent_patch import checkpoint

        return len(checkpoint.list_complete(self.run))

    def position(self) -> float:
        """The latest complete checkpoint's patches (its weights' metadata) over the total."""
        from safetensors import safe_open

        from latent_patch import checkpoint

        latest = checkpoint.find_latest(self.run)
        if latest is None:
            return 0.0
        with safe_open(str(latest / checkpoint.MODEL_FILE), framework="np") as f:
            return min(1.0, int(f.metadata()["patches"]) / self.total)

    def progress(self) -> float:
        recs = [r for r in metrics_records(self.run) if "patches" in r]
        return min(1.0, recs[-1]["patches"] / self.total) if recs else 0.0

    def resumed(self, proc: Proc) -> str:
        found = [m for line in list(proc.lines) if (m := self.resume_re.search(line))]
        return f"step {found[0].group(1)} at {found[0].group(2)} patches" if found else ""

    def after_kill(self) -> tuple[list[str], tuple[int, int]]:
        """Every visible step-* folder must be a complete, loadable checkpoint."""
        from latent_patch import checkpoint

        problems = []
        root = self.run / "checkpoints"
        for p in sorted(root.iterdir()) if root.is_dir() else []:
            if p.name.startswith("."):
                continue  # a writer's temporary folder: invisible to resume by design
            problems += _checkpoint_problems(checkpoint, p)
        latest = checkpoint.find_latest(self.run)
        step = int(latest.name.split("-")[1]) if latest else 0
        # the next run keeps the records up to the checkpoint's step and drops the rest
        kept = sum(1 for r in metrics_records(self.run) if r.get("step", math.inf) <= step)
        return problems, (step, kept)

    def after_next(self, snapshot: tuple[int, int], proc: Proc) -> list[str]:
        """The next run must continue at the checkpoint's step + 1 with the reference's losses."""
        step, lines = snapshot
        records = metrics_records(self.run)
        new = [r for r in records[lines:] if "step" in r]
        problems = []
        steps = [int(r["step"]) for r in records if "step" in r]
        if steps != sorted(set(steps)):
            problems.append(f"metrics.jsonl logs some steps twice or out of order after the kill at step {step}")
        if step == 0:
            problems.append("the kill landed before the first checkpoint: the next run started "
                            "from scratch (nothing was resumed)")
        if new and int(new[0]["step"]) != step + 1:
            problems.append(f"after a kill with the latest checkpoint at step {step}, the next "
                            f"run logged step {new[0]['step']} first (expected {step + 1})")
        for r in new:
            want = self.ref_losses.get(int(r["step"]))
            if want is not None:
                self.max_loss_dev = max(self.max_loss_dev, abs(float(r["loss"]) - want))
            if want is None or not math.isclose(float(r["loss"]), want, rel_tol=1e-6, abs_tol=1e-7):
                problems.append(f"step {r['step']}: loss {r['loss']} vs uninterrupted {want}")
                break
        if step and proc.lines and not any(f"step-{step:09d}" in ln and "resumed from" in ln
                                           for ln in proc.lines) and new:
            problems.append(f"the next run did not say it resumed from step-{step:09d}")
        return problems

    def report(self) -> dict:
        return {"max_loss_dev": self.max_loss_dev}

    def final(self) -> tuple[int, int, list[str]]:
        from latent_patch import checkpoint

        self.wait_for_reference()
        problems = []
        got = last_per_step(metrics_records(self.run))
        missing = [s for s in self.ref_losses if s not in got]
        if missing:
            problems.append(f"{len(missing)} steps never logged (first {missing[0]})")
        bad = [s for s in got if s in self.ref_losses and not math.isclose(
            got[s], self.ref_losses[s], rel_tol=1e-6, abs_tol=1e-7)]
        if bad:
            problems.append(f"{len(bad)} final losses differ from the reference (first step {bad[0]})")
        mine = checkpoint.list_complete(self.run)
        theirs = checkpoint.list_complete(self.ref_run)
        if [s for s, _ in mine] != [s for s, _ in theirs]:
            problems.append(f"complete checkpoints {[s for s, _ in mine]} vs reference {[s for s, _ in theirs]}")
        else:
            problems += [p for (_, a), (_, b) in zip(mine, theirs) for p in _same_weights(a, b)]
        return 0, 0, problems


def _checkpoint_problems(checkpoint: Any, folder: Path) -> list[str]:
    """A visible checkpoint folder must verify and load (weights via safetensors, state via
    weights_only): anything else is a half-written checkpoint that resume could trip on."""
    try:
        checkpoint.verify(folder)
        checkpoint.load_weights(folder, checkpoint.MODEL_FILE)
        checkpoint.load_weights(folder, checkpoint.EMA_FILE)
        checkpoint.load_state(folder / checkpoint.STATE_FILE)
    except Exception as err:
        return [f"{folder.name}: visible but not a complete checkpoint ({err})"]
    return []


def _same_weights(a: Path, b: Path) -> list[str]:
    from safetensors.numpy import load_file

    problems = []
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or any(not np.array_equal(x[k], y[k]) for k in x):
            problems.append(f"{a.name}/{name} differs from the uninterrupted run's")
    return problems


class SampleStage(Stage):
    """sample.py into ``out``; reference: the same command uninterrupted into ``ref``."""

    name = "sample"
    resume_re = re.compile(r"\d+ already there")

    def __init__(self, ckpt: Path, out: Path, ref: Path, num_samples: int, batch: int, steps: int,
                 save: str = "npz", ready: threading.Event | None = None):
        self.ckpt, self.out, self.ref, self.ready = ckpt, out, ref, ready
        self.n, self.batch, self.steps, self.save = num_samples, batch, steps, save
        self.units = math.ceil(num_samples / batch)  # one part per batch (one process)

    def argv(self, out: Path) -> list[str]:
        return ["--checkpoint", str(self.ckpt), "--out", str(out), "--num-samples", str(self.n),
                "--batch-size", str(self.batch), "--steps", str(self.steps), "--no-progress",
                "--save", self.save, "--grid", "0"]

    def command(self) -> list[str]:
        return script_cmd("sample.py", *self.argv(self.out))

    def reference(self) -> Path:
        return self.ref

    def started(self, proc: Proc) -> bool:
        """sampling.json is (re)written just before the sampling loop starts."""
        p = self.out / "sampling.json"
        return p.is_file() and p.stat().st_mtime >= proc.wall0 - 1.0

    def kept(self) -> int:
        return len(self._parts())

    def position(self) -> float:
        return len({i for a, b in self._parts() for i in range(a, min(b, self.n))}) / self.n

    def _parts(self) -> list[tuple[int, int]]:
        """(start, end) of every finished-named part (a writer's temporary never matches)."""
        found = []
        for p in (self.out / "parts").glob("idx-*.npz"):
            m = re.match(r"idx-(\d+)-(\d+)\.npz$", p.name)
            if m and int(m.group(1)) < self.n:
                found.append((int(m.group(1)), int(m.group(2))))
        return found

    def after_kill(self) -> tuple[list[str], dict[str, int]]:
        """Every finished-named part must load (no pickle) with exactly the indices of its name."""
        problems, snap = [], {}
        for p in sorted((self.out / "parts").glob("idx-*.npz")):
            m = re.match(r"idx-(\d+)-(\d+)\.npz$", p.name)
            if not m:
                continue
            try:
                arrs = npz_arrays(p)
                want = np.arange(int(m.group(1)), int(m.group(2)))
                if not np.array_equal(arrs["indices"], want) or len(arrs["images"]) != len(want):
                    problems.append(f"{p.name}: indices or image count do not match its name")
            except Exception as err:
                problems.append(f"{p.name}: unreadable part ({type(err).__name__}: {err})")
            snap[p.name] = p.stat().st_ino
        if (self.out / "samples.npz").is_file() and len(npz_arrays(self.out / "samples.npz")["arr_0"]) != self.n:
            problems.append("samples.npz exists but does not hold every sample")
        return problems, snap

    def after_next(self, snapshot: dict[str, int], proc: Proc) -> list[str]:
        """Parts finished before the kill are kept, not regenerated or replaced."""
        return [f"{name}: finished before the kill, replaced after it" for name, ino in snapshot.items()
                if not (self.out / "parts" / name).is_file() or (self.out / "parts" / name).stat().st_ino != ino]

    def final(self) -> tuple[int, int, list[str]]:
        self.wait_for_reference()
        ref = npz_arrays(self.ref / "samples.npz")
        got = npz_arrays(self.out / "samples.npz")
        n_ref, n_got = len(ref["arr_0"]), len(got["arr_0"])
        lost, dup = max(0, n_ref - n_got), max(0, n_got - n_ref)
        problems = []
        if n_ref == n_got:
            diff = int(np.sum(np.any(ref["arr_0"] != got["arr_0"], axis=(1, 2, 3))))
            if diff or not np.array_equal(ref["labels"], got["labels"]):
                problems.append(f"{diff} of {n_ref} images (or the labels) differ from the reference")
        if "png" in self.save:
            problems += _png_problems(self.out, got["arr_0"])
        return lost, dup, problems


def _png_problems(out: Path, arr: np.ndarray) -> list[str]:
    from PIL import Image

    pngs = sorted((out / "images").glob("*.png"))
    if len(pngs) != len(arr):
        return [f"{len(pngs)} PNGs for {len(arr)} samples"]
    bad = [p.name for i, p in enumerate(pngs) if not np.array_equal(np.asarray(Image.open(p)), arr[i])]
    return [f"{len(bad)} PNGs differ from samples.npz (first {bad[0]})"] if bad else []


@dataclass
class Timing:
    """Seconds from process start to the job's first work line, and of the whole job's work
    after it: "any" kills draw their delay from these (refreshed from what each run shows)."""

    startup_s: float
    work_s: float


def kill_chain(stage: Stage, seed: int, kills: int, timing: Timing, timeout: float = 300.0,
               log: Callable[[str], None] = lambda s: None, p_any: float = 0.25) -> ChainResult:
    """SIGKILL ``stage``'s command ``kills`` times, re-running the same command after each kill,
    then let it finish and compare with the reference, which must have been made at the torch
    thread count the chain's runs ran at (:meth:`Stage.thread_problems`).

    Each kill waits for an event on disk ("event"): a seeded number of complete units, drawn
    between one more than the run started with and the last but one, then a seeded share of
    half the time one unit took (so the kill also lands inside the writing of the next unit;
    none after the last but one). Every such kill has output kept and output left: a kill whose
    kept fraction is not strictly between 0 and 1 is reported as a problem. Once something is
    kept, a share ``p_any`` of the kills is instead timed from process start ("any": the
    start-up and set-up of a resumed run are hit too). A run that finishes before its kill ends
    the chain, uncounted. So does an "event" kill that the job outran (on a loaded machine the
    last unit can be written between the event and the signal): it is not a kill mid-work, so it
    is not counted, but everything checked after a kill is still checked after it."""
    t_start, rng = time.monotonic(), random.Random(seed)
    records: list[KillRecord] = []
    outrun: list[KillRecord] = []  # kills the job outran: not counted, their checks still reported
    pending: tuple[KillRecord, Any] | None = None
    threads: set[int | None] = set()  # the torch thread counts the chain's runs ran at
    for attempt in range(1, 3 * kills + 2):
        start = stage.kept()
        want = len(records) < kills and start + 1 < stage.units  # a unit to wait for before the last
        mode = ("any" if start > 0 and rng.random() < p_any else "event") if want else "none"
        target = rng.randint(start + 1, stage.units - 1) if want else 0
        share = rng.random()
        proc = Proc(stage.command())
        threads.add(proc.threads)
        delay = _kill_after(proc, stage, mode, start, target, share, timing, timeout) if want else None
        rc = None if delay is not None else proc.finish(timeout)
        if pending:
            pending[0].problems += _guarded(lambda: stage.after_next(pending[1], proc), "resume check")
            pending[0].resumed = stage.resumed(proc)
            pending = None
        if delay is not None:
            rec = KillRecord(stage.name, seed, attempt, mode, round(delay, 3), round(stage.progress(), 3),
                             round(stage.position(), 4), target if mode == "event" else start)
            try:
                rec.problems, snap = stage.after_kill()
            except Exception as err:  # an unreadable state is a finding, not a harness crash
                rec.problems, snap = [f"post-kill check failed: {type(err).__name__}: {err}"], None
            if mode == "event" and rec.position >= 1:  # outrun: kept for its checks, not counted
                log(f"  {stage.name} seed {seed} attempt {attempt}: the job wrote its last unit before "
                    f"the kill landed (not counted)")
                outrun.append(rec)
                pending = (rec, snap)  # the resume check after it still runs
                continue
            if rec.position <= 0:
                rec.problems.append(f"the kill did not land mid-work: {100 * rec.position:.0f}% of the "
                                    f"output kept on disk")
            records.append(rec)
            pending = (rec, snap)
            when = (f"{delay:.2f} s after {target} of {stage.units} units were complete" if mode == "event"
                    else f"{delay:.2f} s after process start")
            log(f"  {stage.name} seed {seed} attempt {attempt}: SIGKILL {when}, "
                f"{100 * rec.position:.0f}% kept on disk"
                f"{'; PROBLEMS: ' + '; '.join(rec.problems) if rec.problems else ''}")
            continue
        if rc != 0:
            return _chain(stage, seed, records, 0, 0, [f"run {attempt} failed (rc {rc}): {proc.text[-800:]}"], t_start)
        break
    try:
        lost, dup, problems = stage.final()
    except Exception as err:
        lost, dup, problems = 0, 0, [f"final comparison failed: {type(err).__name__}: {err}"]
    problems = [p for rec in outrun for p in rec.problems] + problems + stage.thread_problems(threads)
    result = _chain(stage, seed, records, lost, dup, problems, t_start)
    result.extra = stage.report() if not problems else {}
    return result


def kill_stage(make_stage: Callable[[int], Stage], seed: int, kills: int, timing: Timing,
               p_any: float = 0.25, deadline: float = math.inf,
               log: Callable[[str], None] = lambda s: None) -> list[ChainResult]:
    """Kill chains on fresh outputs (``make_stage(chain index)``) until ``kills`` kills landed: a
    chain ends early when a run finishes before its kill, or once the job is complete on disk.
    Chain ``c`` uses seed ``seed + c`` (recorded in its result); no new chain after ``deadline``."""
    chains: list[ChainResult] = []
    for c in range(3 * kills):
        done = sum(len(ch.kills) for ch in chains)
        if done >= kills or (chains and time.monotonic() > deadline):
            break
        res = kill_chain(make_stage(c), seed + c, min(5, kills - done), timing, log=log, p_any=p_any)
        log(f"{res.stage} chain seed {res.seed}: {len(res.kills)} kills, lost {res.lost}, duplicated "
            f"{res.duplicated}, {res.seconds:.0f} s{'; PROBLEMS: ' + '; '.join(res.problems) if res.problems else ''}")
        chains.append(res)
    return chains


def _guarded(check: Callable[[], list[str]], what: str) -> list[str]:
    """Run a check; an exception inside it becomes a reported problem."""
    try:
        return check()
    except Exception as err:
        return [f"{what} failed: {type(err).__name__}: {err}"]


def _kill_after(proc: Proc, stage: Stage, mode: str, start: int, target: int, share: float,
                timing: Timing, timeout: float) -> float | None:
    """Kill ``proc``'s tree at the moment ``mode`` says; returns the delay (s after the event, or
    after process start for "any"), or None when the run ended (or hung) first."""
    if mode == "any":
        delay = share * (timing.startup_s + 0.5 * timing.work_s * (1.0 - stage.position()))
        proc.wait_until(lambda: time.monotonic() - proc.t0 >= delay, delay + 1)
        return delay if proc.kill() else None
    seen: dict[str, float] = {}

    def due() -> bool:
        if "work" not in seen and stage.started(proc):
            seen["work"] = time.monotonic()
        return stage.kept() >= target

    if not proc.wait_until(due, timeout, poll=0.01):
        proc.kill()
        return None
    t_event = time.monotonic()
    t_work = seen.get("work", proc.t0)
    timing.startup_s = 0.5 * timing.startup_s + 0.5 * (t_work - proc.t0)
    unit_s = (t_event - t_work) / (target - start)
    timing.work_s = 0.5 * timing.work_s + 0.5 * unit_s * stage.units
    delay = share * 0.5 * unit_s if target < stage.units - 1 else 0.0
    proc.wait_until(lambda: time.monotonic() - t_event >= delay, delay + 1)
    return delay if proc.kill() else None


def _chain(stage: Stage, seed: int, records: list[KillRecord], lost: int, dup: int,
           problems: list[str], t_start: float) -> ChainResult:
    for rec in records:
        rec.ok = not rec.problems and not problems and lost == 0 and dup == 0
    return ChainResult(stage.name, seed, records, lost, dup, problems, round(time.monotonic() - t_start, 1))


# ============================================================================ summary

def summarize(outcomes: list[Outcome], chains: list[ChainResult], seconds: float, mode: str) -> dict:
    """The benchmark's figures, every one counted from the checks above. Per stage,
    ``positions`` is each kill's fraction of the output kept on disk when it landed (for
    training: the latest checkpoint's patches over the total), ``resumed`` what the next run
    said it kept or resumed from, and ``moments`` each kill as
    ``seed/attempt:mode#units+delay@position`` (mode "event": ``delay`` s after ``units``
    complete units were on disk; "any": ``delay`` s after process start)."""
    kills = [k for c in chains for k in c.kills]
    stages: dict[str, dict] = {}
    for c in chains:
        s = stages.setdefault(c.stage, {"kills": 0, "resumed_ok": 0, "seeds": [], "after_kept_units": 0,
                                        "partial_output": 0, "positions": [], "resumed": [], "lost": 0,
                                        "duplicated": 0, "moments": []})
        s["kills"] += len(c.kills)
        s["resumed_ok"] += sum(k.ok for k in c.kills)
        s["after_kept_units"] += sum(k.mode == "event" for k in c.kills)  # the rest: timed from start
        s["partial_output"] += sum(0.0 < k.position < 1.0 for k in c.kills)  # kept some, some left
        s["positions"] += [k.position for k in c.kills]
        s["resumed"] += [k.resumed for k in c.kills]
        s["seeds"].append(c.seed)
        s["lost"] += c.lost
        s["duplicated"] += c.duplicated
        s["moments"] += [f"{k.seed}/{k.attempt}:{k.mode}#{k.after_units}+{k.delay_s:.2f}s@{100 * k.position:.0f}%"
                         for k in c.kills]
        for key, value in c.extra.items():  # e.g. byte_identical (all chains), max_loss_dev (max)
            s[key] = (s.get(key, True) and value) if isinstance(value, bool) else max(s.get(key, value), value)
    return {
        "kills": len(kills), "resumed_ok": sum(k.ok for k in kills),
        "min_kill_position": min((k.position for k in kills), default=None),
        "samples_lost": sum(c.lost for c in chains), "samples_duplicated": sum(c.duplicated for c in chains),
        "bad_inputs": len(outcomes), "bad_inputs_handled": sum(o.handled for o in outcomes),
        "unhandled": [o.kind for o in outcomes if not o.handled],
        "answered_by_traceback": [o.kind for o in outcomes if o.traceback], "stages": stages,
        "mode": mode, "torch_threads": THREADS, "seconds": round(seconds, 1),
    }
