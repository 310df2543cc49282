"""Every benchmark's ``--quick`` in one command, and each target met or not: ``make bench-quick``.

Run it before every change lands: an 18x loader regression once stayed in for four days because
no benchmark ran after it. Each benchmark runs as its own subprocess (one after the other: they
time the CPU, so side by side they would disturb each other) with a per-benchmark timeout and a
total budget; its last stdout line is its JSON object. A benchmark that crashes, times out or
prints no JSON gets a FAILED line naming it, its targets are NOT MET, and the rest still run.

    python benchmarks/quick.py                 # all (about 5 min on 2 cores)
    python benchmarks/quick.py --only loader   # a subset (benchmark names or target prefixes)
    python benchmarks/quick.py --list          # the targets and where each comes from

Output: one line per target (``target loader.ratio >= 0.85: NOT MET (0.054)  [bench_loader.py]``),
a summary line, and last one JSON object (targets, figures, met flags, seconds per benchmark).
Exit status 1 if any target is not met or any benchmark failed. Each benchmark's own output goes
to ``bench_out/quick/<name>.log``.

The targets live in TARGETS below, and only there. A target marked ``proxy`` is what the quick
mode can check, not the real target: the note says what it stands in for.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bench:
    """One benchmark command: ``python SCRIPT ARGS`` from the project root. ``{tmp}`` in an
    argument is a fresh temporary folder (so a rerun never reuses an earlier run's output)."""

    script: str  # relative to the project root, or absolute
    args: tuple[str, ...] = ("--quick",)
    timeout_s: float = 120.0  # each claims < 60 s on 2 cores; twice that for a loaded machine
    label: str = ""  # a second run of one script (other arguments) needs a name of its own

    @property
    def name(self) -> str:
        return self.label or Path(self.script).name


@dataclass(frozen=True)
class Target:
    """``figure OP threshold`` on one benchmark's JSON line.

    figure: a dotted path into the JSON (``dit_full.ratio``), ``len(PATH)`` (length of a list or
    dict) or ``count(KEY)`` (how many objects anywhere in the JSON hold KEY). threshold: a number,
    or ``@FIGURE`` for another figure of the same JSON (``resumed_ok == @kills``)."""

    name: str
    bench: str  # a Bench's name (its script's file name)
    figure: str
    op: str  # one of OPS
    threshold: float | str
    unit: str
    source: str  # where the target comes from
    proxy: str = ""  # non-empty: a quick-mode proxy; says what it stands in for


OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}

BENCHES: tuple[Bench, ...] = (
    Bench("benchmarks/bench_loader.py"),
    Bench("benchmarks/bench_encode.py"),
    Bench("benchmarks/bench_encode.py", ("--quick", "--repr", "demo"), label="bench_encode_repr"),
    Bench("benchmarks/bench_train.py"),
    Bench("benchmarks/bench_train.py", ("--quick", "--block", "2025"), label="bench_train_block"),
    Bench("benchmarks/bench_sample.py"),
    Bench("benchmarks/bench_faults.py"),
    Bench("benchmarks/bench_cpu_layout.py"),
    # --out {tmp}: else a finished quick run is only re-reported. These two start many models and
    # processes: bench_quality took 52 s at load average 1-4 but over 120 s at 7, hence more time
    Bench("benchmarks/bench_quality.py", ("--quick", "--out", "{tmp}"), timeout_s=150.0),
    Bench("benchmarks/gpu_suite.py", ("--quick", "--out", "{tmp}"), timeout_s=150.0),
)

A16 = "../shared/acceptance"  # the issue tracker's acceptance checks (not shipped; named for the record)
TARGETS: tuple[Target, ...] = (
    Target("loader.ratio", "bench_loader.py", "ratio", ">=", 0.85, "",
           f"issue 16 (was 0.5 before): streaming loader / raw tar read; {A16}/02-bench-loader"),
    Target("loader.memory_samples_s", "bench_loader.py", "memory_samples_s", ">=", 200_000, "samples/s",
           f"BENCHMARKS.md (Loading shards): in-memory gather at ImageNet-256 latent size; {A16}/02-bench-loader"),
    Target("encode.ratio", "bench_encode.py", "ratio", ">=", 0.9, "",
           f"BENCHMARKS.md (Encoding): pipeline / bound of its parts; {A16}/02-bench-encode"),
    Target("encode.repr_ratio", "bench_encode_repr", "ratio", ">=", 0.85, "",
           "issue 28: the pipeline / bound with the demo encoder's grids stored (--repr demo); "
           f"{A16}/02-bench-encode's ratio with --repr"),
    Target("train.ratio", "bench_train.py", "ratio", ">=", 1.9, "",
           f"BENCHMARKS.md (Training): patch/full samples/s, 1.9 quick / 2.0 full; {A16}/03-bench-train",
           proxy="quick DiT (hidden 192, depth 4); the full-size target is 2.0"),
    Target("train.block_flop_rate_ratio", "bench_train_block", "block_flop_rate_ratio", ">=", 0.9, "",
           "issue 29: the 2025 DiT block trains at >= 0.9 of today's block's FLOP rate on the CPU "
           "(0.95 on a GPU)", proxy="quick DiT (hidden 192, depth 4), 12 interleaved steps each"),
    Target("sample.ratio", "bench_sample.py", "ratio", ">=", 0.85, "",
           f"BENCHMARKS.md (Sampling): end to end / model-forward bound; {A16}/04-bench-sample"),
    Target("faults.samples_lost", "bench_faults.py", "samples_lost", "==", 0, "",
           f"issue 6 / BENCHMARKS.md (Faults); {A16}/06-bench-faults"),
    Target("faults.samples_duplicated", "bench_faults.py", "samples_duplicated", "==", 0, "",
           f"issue 6 / BENCHMARKS.md (Faults); {A16}/06-bench-faults"),
    Target("faults.resumed_ok", "bench_faults.py", "resumed_ok", "==", "@kills", "",
           f"issue 6: every killed run resumes; {A16}/06-bench-faults"),
    Target("faults.kills", "bench_faults.py", "kills", ">=", 3, "",
           f"bench_faults.py QUICK plan: 1 kill per stage (encode, train, sample); {A16}/06-bench-faults wants >= 1"),
    Target("faults.bad_inputs_handled", "bench_faults.py", "bad_inputs_handled", "==", "@bad_inputs", "",
           f"issue 6: every bad input answered; {A16}/06-bench-faults"),
    Target("faults.bad_inputs", "bench_faults.py", "bad_inputs", ">=", 39, "kinds",
           f"BENCHMARKS.md (Faults): 39 kinds of bad input; {A16}/06-bench-faults wants >= 12"),
    Target("cpu_layout.unet_full.ratio", "bench_cpu_layout.py", "unet_full.ratio", ">=", 1.0, "",
           "BENCHMARKS.md (Sharing 2 cores): 2 x 1 thread must not train slower than 1 x 2 threads "
           "(tools/quality_sweep.sh runs side by side because of it)",
           proxy="3 s windows instead of 30 s"),
    Target("cpu_layout.dit_full.ratio", "bench_cpu_layout.py", "dit_full.ratio", ">=", 1.0, "",
           "BENCHMARKS.md (Sharing 2 cores), as above", proxy="3 s windows instead of 30 s"),
    Target("quality.arms_on_compute_axis", "bench_quality.py", "count(compute_to_full_final_fd)", ">=", 6, "arms",
           f"issue 9: every arm reported on the compute axis; {A16}/09-quality-quick",
           proxy="smoke run: FD figures at quick size are meaningless, only that every arm runs"),
    Target("gpu_suite.failed_stages", "gpu_suite.py", "len(failed)", "==", 0, "stages",
           f"issue 8: every stage runs (gpu_suite.py docstring); {A16}/08-gpu-dry",
           proxy="CPU dry run at tiny sizes, compiled stages skipped: no speed figure; "
                 "the GPU targets (BENCHMARKS.md) need a GPU"),
)


# --------------------------------------------------------------------------- figures and targets

def lookup(data: object, path: str) -> object:
    """``a.b.c`` in nested dicts; KeyError naming the missing part."""
    value = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"no '{path}' in the JSON")
        value = value[part]
    return value


def figure(data: dict, spec: str) -> object:
    """A figure by its spec: PATH, len(PATH) or count(KEY) (see Target)."""
    m = re.fullmatch(r"(len|count)\((.+)\)", spec)
    if not m:
        return lookup(data, spec)
    fn, arg = m.groups()
    if fn == "len":
        value = lookup(data, arg)
        if not isinstance(value, (list, dict, str)):
            raise KeyError(f"'{arg}' has no length: {value!r}")
        return len(value)
    found, stack = 0, [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found += arg in node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def number(value: object) -> float | None:
    """The value as a finite number, else None (bools count as 0/1)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def fmt(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def requirement(t: Target) -> str:
    thr = t.threshold[1:] if isinstance(t.threshold, str) else fmt(t.threshold)
    text = f"{t.name} {t.op} {thr}" + (f" {t.unit}" if t.unit else "")
    return text + (" (quick-mode proxy)" if t.proxy else "")


def judge(t: Target, data: dict | None, why_none: str) -> dict:
    """One target against a benchmark's JSON (None: the benchmark gave none, ``why_none`` says why)."""
    row = {"target": t.name, "bench": t.bench, "figure": t.figure, "op": t.op, "threshold": t.threshold,
           "unit": t.unit, "proxy": t.proxy or None, "value": None, "met": False, "why": None}
    if data is None:
        row["why"] = why_none
        return row
    try:
        value = number(figure(data, t.figure))
        thr = number(figure(data, t.threshold[1:])) if isinstance(t.threshold, str) else float(t.threshold)
    except KeyError as e:
        row["why"] = str(e.args[0])
        return row
    if value is None or thr is None:
        row["why"] = f"'{t.figure}' or its threshold is not a number"
        return row
    row["value"] = figure(data, t.figure)
    if isinstance(t.threshold, str):
        row["threshold_value"] = thr
    row["met"] = bool(OPS[t.op](value, thr))
    return row


def target_line(t: Target, row: dict) -> str:
    if row["value"] is None:
        shown = f"no figure: {row['why']}"
    else:
        shown = fmt(row["value"]) + (f" {t.unit}" if t.unit else "")
        if "threshold_value" in row:
            shown += f"; {t.threshold[1:]} {fmt(row['threshold_value'])}"
    return f"target {requirement(t)}: {'met' if row['met'] else 'NOT MET'} ({shown})  [{t.bench}]"


# --------------------------------------------------------------------------- running one benchmark

def last_json(stdout: str) -> dict | None:
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        data = json.loads(lines[-1])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def run_bench(bench: Bench, root: Path, timeout_s: float, log_dir: Path) -> dict:
    """Run one benchmark; {"seconds", "rc", "json", "error"} (error None when it went well)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / (Path(bench.name).stem + ".log")
    with tempfile.TemporaryDirectory(prefix="bench_quick_") as tmp:
        script = Path(bench.script)
        cmd = [sys.executable, str(script if script.is_absolute() else root / script),
               *(a.replace("{tmp}", tmp) for a in bench.args)]
        t0 = time.perf_counter()
        # own session: on a timeout the benchmark's whole process group goes, not just its first process
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            with_group(proc, signal.SIGKILL)
            out, err = proc.communicate()
        seconds = time.perf_counter() - t0
    log_path.write_text(f"$ {' '.join(cmd)}\n{out}\n--- stderr ---\n{err}")
    data = last_json(out)
    error = None
    if timed_out:
        error = f"timed out after {timeout_s:.0f} s"
    elif proc.returncode != 0:
        tail = next((line.strip() for line in reversed(err.splitlines()) if line.strip()), "")
        error = f"exit status {proc.returncode}" + (f": {tail[:160]}" if tail else "")
    elif data is None:
        error = "last stdout line is not a JSON object"
    return {"seconds": round(seconds, 1), "rc": None if timed_out else proc.returncode, "json": data,
            "error": error, "log": str(log_path)}


def with_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        proc.kill()


# --------------------------------------------------------------------------- the whole run

def run(targets: tuple[Target, ...] = TARGETS, benches: tuple[Bench, ...] = BENCHES, *, root: Path = ROOT,
        budget_s: float = 400.0, log_dir: Path | None = None, say: Callable[[str], None] | None = None) -> int:
    """Run ``benches`` (those with a target), print a line per target, a summary and the JSON
    line; return the exit status (0: every target met and no benchmark failed)."""
    say = say or (lambda line: print(line, flush=True))
    log_dir = log_dir or root / "bench_out" / "quick"
    by_name = {b.name: b for b in benches}
    unknown = sorted({t.bench for t in targets} - set(by_name))
    if unknown:
        raise ValueError(f"targets name benchmarks not in the set: {', '.join(unknown)}")
    todo = [b for b in benches if any(t.bench == b.name for t in targets)]
    t0 = time.perf_counter()
    rows, runs = [], {}
    for i, bench in enumerate(todo, 1):
        left = budget_s - (time.perf_counter() - t0)
        if left < 5:
            r = {"seconds": 0.0, "rc": None, "json": None, "error": f"not run: the {budget_s:.0f} s budget was spent"}
        else:
            say(f"[{i}/{len(todo)}] {bench.name} {' '.join(bench.args)} ...")
            r = run_bench(bench, root, min(bench.timeout_s, left), log_dir)
        runs[bench.name] = r
        head = f"benchmark {bench.name}: {r['seconds']:.1f} s"
        say(head if not r["error"] else f"{head}, FAILED ({r['error']})" + (f"; log {r['log']}" if "log" in r else ""))
        why = f"{bench.name} {r['error']}" if r["error"] else ""
        for t in targets:
            if t.bench == bench.name:
                row = judge(t, r["json"], why or f"{bench.name} printed no JSON")
                rows.append(row)
                say(target_line(t, row))
    wall = time.perf_counter() - t0
    missed = [r for r in rows if not r["met"]]
    failed = [name for name, r in runs.items() if r["error"]]
    times = ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in runs.items())
    summary = (f"bench-quick: {len(rows) - len(missed)} of {len(rows)} targets met"
               + (f"; NOT MET: {', '.join(r['target'] for r in missed)}" if missed else "")
               + (f"; benchmarks FAILED: {', '.join(failed)}" if failed else "")
               + f"; {wall:.0f} s ({times})")
    say(summary)
    say(json.dumps({"tool": "bench-quick", "ok": not missed and not failed, "met": len(rows) - len(missed),
                    "targets": len(rows), "not_met": [r["target"] for r in missed], "failed": failed,
                    "wall_s": round(wall, 1), "budget_s": budget_s,
                    "benchmarks": {n: {"seconds": r["seconds"], "rc": r["rc"], "error": r["error"]}
                                   for n, r in runs.items()},
                    "results": rows}, default=str))
    return 0 if not missed and not failed else 1


def select(only: str | None) -> tuple[Target, ...]:
    """--only: comma list; a word picks targets whose name or benchmark starts with it."""
    if not only:
        return TARGETS
    words = [w.strip() for w in only.split(",") if w.strip()]
    picked = tuple(t for t in TARGETS if any(t.name.startswith(w) or t.bench.startswith(w) for w in words))
    if not picked:
        raise SystemExit(f"--only {only}: no target matches")
    return picked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma list of benchmark names or target prefixes, e.g. loader,train")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="total seconds; a benchmark gets what is left if less than its own timeout")
    p.add_argument("--log-dir", default=None, help="each benchmark's output (default bench_out/quick)")
    p.add_argument("--list", action="store_true", help="print the targets and their sources, run nothing")
    args = p.parse_args(argv)
    targets = select(args.only)
    if args.list:
        for t in targets:
            print(f"{requirement(t)}  [{t.bench}: {t.figure}]\n    source: {t.source}"
                  + (f"\n    proxy: {t.proxy}" if t.proxy else ""))
        return 0
    return run(targets, budget_s=args.budget_s, log_dir=Path(args.log_dir) if args.log_dir else None)


if __name__ == "__main__":
    sys.exit(main())
