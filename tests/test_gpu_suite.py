"""The GPU benchmark suite (benchmarks/gpu_suite.py) at its CPU sizes: every stage prints its JSON
line with measured, positive figures, the last line is one JSON object, and one failing stage is
reported without stopping the others. The rented GPU has minutes, not hours: a suite that breaks
there must have broken here first."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
STAGES = ["peak", "train_T2_eager", "sample", "encode", "pipeline", "cuda_tests", "train_T2_compiled", "train_T2_repa",
          "encode_repr", "train_T2_2025", "sample_compiled"]


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            out.append(json.loads(line))
    return out


def positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, (int, float)) and value > 0, f"{record['stage']}: {key} = {value!r}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One ``--quick`` run (every stage at tiny sizes, the compiled one skipped): about 30 s."""
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, str(SUITE), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=170)
    return proc, out


def test_quick_run_prints_one_measured_line_per_stage(quick_run) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json_lines(proc.stdout)
    stages = [r for r in records if "stage" in r]
    assert [r["stage"] for r in stages] == STAGES
    by = {r["stage"]: r for r in stages}
    assert not any("error" in r for r in stages), [r.get("error") for r in stages]
    positive(by["peak"], "tflops")
    positive(by["train_T2_eager"], "latents_s", "patches_s", "full.step_s", "patch.step_s", "tflops",
             "share_of_peak", "patch.share_of_peak")
    assert by["train_T2_eager"]["patch"]["batch"] == 2 * by["train_T2_eager"]["full"]["batch"]
    sample = by["sample"]
    positive(sample, "images_s", "hours_50k", "forward_only_images_s", "tflops", "share_of_peak")
    assert sample["nfe_per_batch"] == 2 * sample["steps"] - 1  # Heun
    assert sample["forward_batch"] == 2 * sample["batch"]  # guidance: one pass of 2B
    positive(by["encode"], "pipeline_img_s", "vae_img_s", "ratio", "tflops", "share_of_peak")
    pipe = by["pipeline"]
    positive(pipe, "encode_s", "train_s", "train_resume_s", "sample_s", "resumed_from_step")
    assert pipe["resume_continued"] and pipe["final_step"] > pipe["resumed_from_step"] > 0
    repa = by["train_T2_repa"]  # issue 28: the step with REPA against the same step without
    positive(repa, "full.step_s_with", "full.step_s_without", "patch.step_s_with", "patch.step_s_without",
             "projector_flops_share", "patch.projector_flops_share", "tflops")
    for kind in ("full", "patch"):
        k = repa[kind]
        assert k["repa_overhead"] == pytest.approx(k["step_s_with"] / k["step_s_without"] - 1, abs=1e-3)
        assert k["projector_flops_share"] < 0.5
        assert repa["with"][kind]["train_flops_per_patch"] > repa["without"][kind]["train_flops_per_patch"]
    assert repa["repa_overhead"] == max(repa["full"]["repa_overhead"], repa["patch"]["repa_overhead"])
    assert repa["repa"]["weight"] == 0.5 and repa["repa"]["features"] == [4, 4, 32, "float16"]
    assert "repa" not in repa["without"] and repa["target"] == 0.05 and repa["meets_target"] is None  # CPU
    enc = by["encode_repr"]  # the representation encoder beside the VAE, then the job with --repr
    positive(enc, "repr_img_s", "vae_img_s", "ratio", "repr_gflops_per_image", "job.img_s", "job.repr_seconds",
             "job.plain_job_img_s", "job.ratio_to_plain_job")
    assert enc["ratio"] == pytest.approx(enc["repr_img_s"] / enc["vae_img_s"], rel=1e-2)
    assert enc["grid"] == [8, 8] and enc["dim"] == 64 and enc["job"]["images"] == by["encode"]["images"]
    check_block_stage(by["train_T2_2025"])
    assert "skipped" in by["train_T2_compiled"] and "skipped" in by["sample_compiled"]  # --quick
    for word in ("sampl", "encod", "train"):
        assert word in proc.stdout.lower()


def check_block_stage(r: dict) -> None:
    """Issue 29's stage: both blocks timed on the same steps, each one's FLOP rate and their ratio,
    and the two networks really different (read off the built nets, not the preset names)."""
    positive(r, "block_flop_rate_ratio", "train_gflop_s.2022", "train_gflop_s.2025", "patches_s.2022",
             "patches_s.2025", "full.block_flop_rate_ratio", "patch.block_flop_rate_ratio", "tflops")
    old, new = r["blocks"]["2022"], r["blocks"]["2025"]
    assert r["block_flop_rate_ratio"] == pytest.approx(new["train_gflop_s"] / old["train_gflop_s"], rel=1e-2)
    assert old["preset"] == "DiT-T/2" and new["preset"] == "DiT-T/2-2025"
    assert old["block"] == {"pos": "sincos", "mlp": "gelu", "norm": "layer", "qk_norm_modules": 0}
    assert new["block"] == {"pos": "rope", "mlp": "swiglu", "norm": "rms", "qk_norm_modules": 2 * 2}  # q, k x depth 2
    assert r["params_m"]["2025"] != r["params_m"]["2022"]
    assert r["block_2025"] == {"pos": "rope", "mlp": "swiglu", "norm": "rms", "qk_norm": True}
    for kind, side in (("full", 8), ("patch", 4)):
        assert r[kind]["side"] == side and old[kind]["batch"] == new[kind]["batch"] == r[kind]["batch"]
        assert len(old[kind]["step_s_blocks"]) == len(new[kind]["step_s_blocks"]) == r["timed_steps_per_kind"]
        # the FLOPs are 3 x forward_flops of each block's own config: the blocks differ there too
        assert old[kind]["train_flops_per_patch"] != new[kind]["train_flops_per_patch"]
    assert r["patch"]["batch"] == 2 * r["full"]["batch"]
    assert r["target"] == 0.95 and r["meets_target"] is None  # CPU


def test_quick_run_ends_with_a_summary(quick_run) -> None:
    proc, out = quick_run
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["ok"] is True and last["failed"] == [] and list(last["stages"]) == STAGES
    assert last["skipped"] == ["train_T2_compiled", "sample_compiled"]
    table = proc.stdout.split("stage pipeline: running")[-1]
    assert "REPA" in table and "target <= 5%: GPU only" in table and "ratio to VAE" in table
    assert "target >= 0.95: GPU only" in table
    saved = json.loads((out / "summary.json").read_text())
    assert saved["stages"].keys() == last["stages"].keys()
    assert "stage pipeline: running" in (out / "gpu_suite.log").read_text()


def load_suite():
    """The suite as a module (benchmarks/ is no package); registered first, as dataclasses need."""
    name = "gpu_suite_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SUITE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_a_failing_stage_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys) -> None:
    suite = load_suite()

    def boom(_suite):
        raise RuntimeError("deliberate failure")

    stages = [suite.Stage("broken", boom), suite.Stage("after", lambda _s: {"value": 1.0})]
    monkeypatch.setattr(suite, "all_stages", lambda sizes: stages)
    assert suite.main(["--dry", "--out", str(tmp_path)]) == 1
    records = json_lines(capsys.readouterr().out)
    assert records[0]["stage"] == "broken" and "deliberate failure" in records[0]["error"]
    assert records[1] == {"stage": "after", "value": 1.0, "wall_s": records[1]["wall_s"]}
    assert records[-1]["failed"] == ["broken"] and records[-1]["ok"] is False


def test_only_refuses_an_unknown_stage() -> None:
    suite = load_suite()
    with pytest.raises(SystemExit, match="no such stage"):
        suite.main(["--dry", "--only", "trian"])
    picked = [s.name for s in suite.select(suite.all_stages(suite.GPU), "train_XL2,sample")]
    assert picked == ["peak", "train_XL2_eager", "sample", "train_XL2_repa", "train_XL2_2025", "sample_compiled",
                      "train_XL2_compiled"]


def test_the_repa_stages_are_optional_and_measure_repas_recipe_on_a_gpu() -> None:
    """On a GPU: DiT-XL/2 with REPA's recipe on DINOv2-B/14's grid (16x16x768 at 224 px), and the
    stages skipped, not cut, when the 420 s budget runs short, before the compiled optional ones."""
    suite = load_suite()
    g = suite.GPU
    stages = {s.name: s for s in suite.all_stages(g)}
    assert g.repa_model == "DiT-XL/2" and g.batch == 128 and g.precision == "bf16"
    assert set(g.repa) == {"repa.weight=0.5", "repa.block=8", "repa.proj_hidden=2048"}
    assert (*g.repr_grid, g.repr_dims) == (16, 16, 768) and g.repr_args == {"img_size": 224}
    assert g.repr_arch == "vit_base_patch14_dinov2"
    assert stages["train_XL2_repa"].optional and stages["encode_repr"].optional
    names = list(stages)
    assert names.index("encode_repr") < names.index("sample_compiled") < names.index("train_XL2_compiled")
    cfg = suite.train_config(g, g.repa_model, False, g.repa)  # the project's loader takes the overrides
    assert (cfg.repa.weight, cfg.repa.block, cfg.repa.proj_hidden) == (0.5, 8, 2048)


def test_the_2025_block_stage_is_optional_and_compares_dit_xl2s_blocks_on_a_gpu() -> None:
    """On a GPU: DiT-XL/2 against DiT-XL/2-2025 (models.BLOCK_2025) at the train stages' sizes,
    skipped, not cut, when the budget runs short, after REPA's and before the compiled ones."""
    from latent_patch.models import BLOCK_2025, resolve

    suite = load_suite()
    g = suite.GPU
    stages = {s.name: s for s in suite.all_stages(g)}
    assert suite.block_presets(g) == {"2022": "DiT-XL/2", "2025": "DiT-XL/2-2025"}
    assert stages["train_XL2_2025"].optional and stages["train_XL2_2025"].estimate_s == g.block_estimate_s
    names = list(stages)
    assert names.index("encode_repr") < names.index("train_XL2_2025") < names.index("sample_compiled")
    cfgs = {n: suite.train_config(g, p, False) for n, p in suite.block_presets(g).items()}
    cfgs = {n: suite.train_config(g, p, False, batch=g.block_batch) for n, p in suite.block_presets(g).items()}
    # half the train stages' 128: two XL trainers' states beside one step's activations (59.5 GiB at 128)
    assert all(c.data.batch_size == 64 and c.run.mixed_precision == "bf16" for c in cfgs.values())
    params = {n: resolve(c.model)[1] for n, c in cfgs.items()}  # the preset's builder arguments
    assert {k: params["2025"][k] for k in BLOCK_2025} == BLOCK_2025
    assert all(params["2022"].get(k) in (None, False) for k in BLOCK_2025)
    assert {k: v for k, v in params["2025"].items() if k not in BLOCK_2025} == params["2022"]
