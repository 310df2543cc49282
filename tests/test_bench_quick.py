"""benchmarks/quick.py (`make bench-quick`) on fake benchmarks: tiny scripts written here that print
a JSON line meeting or missing a target, crash, print no JSON, or hang. No real benchmark runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_quick", ROOT / "benchmarks" / "quick.py")
quick = importlib.util.module_from_spec(_spec)
sys.modules["bench_quick"] = quick  # dataclasses look their module up
_spec.loader.exec_module(quick)
Bench, Target = quick.Bench, quick.Target


def script(tmp_path: Path, name: str, body: str) -> quick.Bench:
    path = tmp_path / name
    path.write_text(body)
    return Bench(str(path), args=("--quick",), timeout_s=20)


def run(tmp_path: Path, targets, benches, **kw) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = quick.run(tuple(targets), tuple(benches), root=tmp_path, log_dir=tmp_path / "logs", say=lines.append, **kw)
    return rc, lines


def target_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("target ")]


def t(name: str, bench: str, figure: str, op: str, threshold, unit: str = "", proxy: str = "") -> quick.Target:
    return Target(name, bench, figure, op, threshold, unit, "test", proxy)


GOOD = "import json, sys\nassert sys.argv[1:] == ['--quick']\nprint('progress')\nprint(json.dumps({d}))\n"


def test_met_and_not_met_lines_and_exit_status(tmp_path: Path) -> None:
    fast = script(tmp_path, "bench_fast.py", GOOD.format(d='{"ratio": 0.91, "mem": 250000, "kills": 3, "ok": 3}'))
    slow = script(tmp_path, "bench_slow.py", GOOD.format(d='{"ratio": 0.054, "nested": {"x": 2.5}}'))
    targets = [t("fast.ratio", "bench_fast.py", "ratio", ">=", 0.85),
               t("fast.mem", "bench_fast.py", "mem", ">=", 200_000, "samples/s"),
               t("fast.ok", "bench_fast.py", "ok", "==", "@kills"),
               t("slow.ratio", "bench_slow.py", "ratio", ">=", 0.85),
               t("slow.x", "bench_slow.py", "nested.x", "<=", 3, proxy="smaller run")]
    rc, lines = run(tmp_path, targets, [fast, slow])
    assert rc == 1  # one target missed
    assert target_lines(lines) == [
        "target fast.ratio >= 0.85: met (0.91)  [bench_fast.py]",
        "target fast.mem >= 200,000 samples/s: met (250,000 samples/s)  [bench_fast.py]",
        "target fast.ok == kills: met (3; kills 3)  [bench_fast.py]",
        "target slow.ratio >= 0.85: NOT MET (0.054)  [bench_slow.py]",
        "target slow.x <= 3 (quick-mode proxy): met (2.5)  [bench_slow.py]",
    ]
    assert "4 of 5 targets met; NOT MET: slow.ratio;" in lines[-2]
    last = json.loads(lines[-1])  # the runner's own last line is one JSON object
    assert last["ok"] is False and last["not_met"] == ["slow.ratio"] and last["failed"] == []
    assert [r["met"] for r in last["results"]] == [True, True, True, False, True]
    assert last["results"][3]["value"] == 0.054
    assert set(last["benchmarks"]) == {"bench_fast.py", "bench_slow.py"}
    assert all(b["seconds"] >= 0 and b["rc"] == 0 for b in last["benchmarks"].values())
    assert "progress" in (tmp_path / "logs" / "bench_fast.log").read_text()


def test_all_met_exits_zero(tmp_path: Path) -> None:
    d = '{"ratio": 0.85, "failed": [], "arms": {"a": {"k": 1}, "b": {"k": None}}}'
    ok = script(tmp_path, "bench_ok.py", GOOD.format(d=d))
    targets = [t("ok.ratio", "bench_ok.py", "ratio", ">=", 0.85),  # the boundary counts as met
               t("ok.failed", "bench_ok.py", "len(failed)", "==", 0),
               t("ok.arms", "bench_ok.py", "count(k)", ">=", 2)]
    rc, lines = run(tmp_path, targets, [ok])
    assert rc == 0, lines
    assert all(": met (" in line for line in target_lines(lines))
    assert json.loads(lines[-1])["ok"] is True


def test_crash_no_json_and_timeout_fail_by_name_and_the_rest_still_run(tmp_path: Path) -> None:
    crash = script(tmp_path, "bench_crash.py", "print('{\"ratio\": 1}', flush=True)\nraise RuntimeError('boom')\n")
    mute = script(tmp_path, "bench_mute.py", "print('done, but no JSON')\n")
    hang = Bench(script(tmp_path, "bench_hang.py", "import time\ntime.sleep(60)\n").script, timeout_s=1.5)
    good = script(tmp_path, "bench_good.py", GOOD.format(d='{"ratio": 2.0}'))
    targets = [t("crash.ratio", "bench_crash.py", "ratio", ">=", 0.5),
               t("mute.ratio", "bench_mute.py", "ratio", ">=", 0.5),
               t("hang.ratio", "bench_hang.py", "ratio", ">=", 0.5),
               t("good.ratio", "bench_good.py", "ratio", ">=", 1.9),
               t("good.missing", "bench_good.py", "nope", ">=", 1)]
    rc, lines = run(tmp_path, targets, [crash, mute, hang, good])
    assert rc == 1
    text = "\n".join(lines)
    assert "benchmark bench_crash.py:" in text and "FAILED (exit status 1: RuntimeError: boom)" in text
    assert "benchmark bench_mute.py:" in text and "FAILED (last stdout line is not a JSON object)" in text
    assert "FAILED (timed out after 2 s)" in text
    got = target_lines(lines)
    # the crash printed JSON before dying: its figure is shown, but the benchmark counts as failed
    assert got[0] == "target crash.ratio >= 0.5: met (1)  [bench_crash.py]"
    assert got[1] == ("target mute.ratio >= 0.5: NOT MET (no figure: bench_mute.py last stdout line is not a "
                      "JSON object)  [bench_mute.py]")
    assert got[2].startswith("target hang.ratio >= 0.5: NOT MET (no figure: bench_hang.py timed out")
    assert got[3] == "target good.ratio >= 1.9: met (2)  [bench_good.py]"  # ran after the failures
    assert got[4] == "target good.missing >= 1: NOT MET (no figure: no 'nope' in the JSON)  [bench_good.py]"
    last = json.loads(lines[-1])
    assert last["failed"] == ["bench_crash.py", "bench_mute.py", "bench_hang.py"]
    assert last["benchmarks"]["bench_hang.py"]["rc"] is None and last["benchmarks"]["bench_hang.py"]["seconds"] < 10


def test_spent_budget_skips_the_rest(tmp_path: Path) -> None:
    a = script(tmp_path, "bench_a.py", "import json, time\ntime.sleep(1.5)\nprint(json.dumps({'v': 1}))\n")
    b = script(tmp_path, "bench_b.py", GOOD.format(d='{"v": 1}'))
    rc, lines = run(tmp_path, [t("a.v", "bench_a.py", "v", "==", 1), t("b.v", "bench_b.py", "v", "==", 1)],
                    [a, b], budget_s=6.2)  # a runs; less than 5 s is left for b
    assert rc == 1
    assert "target a.v == 1: met (1)  [bench_a.py]" in lines
    assert any("bench_b.py: 0.0 s, FAILED (not run: the 6 s budget was spent)" in line for line in lines)


def test_a_target_naming_an_unknown_benchmark_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bench_nope.py"):
        run(tmp_path, [t("x", "bench_nope.py", "v", "==", 1)], [])


def test_the_shipped_table_is_consistent() -> None:
    """Every target names a benchmark of the set, a known comparison and a source; every benchmark
    of benchmarks/ with --quick is in the set."""
    names = {b.name for b in quick.BENCHES}
    for target in quick.TARGETS:
        assert target.bench in names and target.op in quick.OPS and target.source, target
    assert {Path(b.script).name for b in quick.BENCHES} == {p.name for p in (ROOT / "benchmarks").glob("*.py")
                                                         if p.name != "quick.py" and "--quick" in p.read_text()}
    assert len({t.name for t in quick.TARGETS}) == len(quick.TARGETS)
