"""The diffusers pipeline (``LatentPatchPipeline``): export of a run, diffusers' folder layout,
loading in a fresh process, and the same images as ``sample.py`` for the same noise.

The run is demo-sized (``configs/demo.yaml``'s U-Net, the shipped demo VAE, per-channel latent
normalisation) with random weights, written as train.py writes a checkpoint; no network needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latent_patch import checkpoint as ck  # noqa: E402
from latent_patch import config as config_mod  # noqa: E402
from latent_patch.codec import model_norm  # noqa: E402
from latent_patch.config import SamplerConfig, TrainConfig  # noqa: E402
from latent_patch.models import build_model  # noqa: E402

from latent_patch import pipeline  # noqa: E402
LatentPatchPipeline = pipeline.LatentPatchPipeline
LatentPatchDenoiser = pipeline.LatentPatchDenoiser

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
# sample.py's settings for the comparison (a short sampler: the path matters, not the quality)
STEPS, CFG, SEED, N = 5, 1.5, 3, 4


def _perturbed(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The network's weights plus seeded noise: every layer (the zero-initialised ones too) matters."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, one_thread_per_module) -> Path:
    """A complete checkpoint of the demo's model (EMA and raw weights differ), manifest naming the demo VAE."""
    import yaml

    cfg = config_mod.load(TrainConfig, ROOT / "configs" / "demo.yaml")
    assert cfg.data.latent_norm == "channel"  # the path under test undoes a per-channel normalisation
    torch.manual_seed(0)
    net = build_model(cfg.model)
    run = tmp_path_factory.mktemp("demo_run")
    tmp = ck.begin(run, 307)
    ck.save_weights(tmp / ck.MODEL_FILE, _perturbed(net, 1), {})
    ck.save_weights(tmp / ck.EMA_FILE, _perturbed(net, 2), {})
    ck.write_text(tmp / ck.CONFIG_FILE, yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False))
    manifest = {"class_names": CLASS_NAMES, "latent_shape": [4, 16, 16],
                "vae": {"id": "demo", "scaling_factor": 0.40756, "shift_factor": 0.0, "latent_channels": 4,
                        "downsample": 4},
                "latent_stats": {"mean": [-0.99, -0.41, 0.006, -0.012], "std": [0.38, 0.57, 1.65, 0.38]}}
    ck.write_text(tmp / ck.MANIFEST_FILE, json.dumps(manifest))
    ck.finish(tmp)
    return run


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory) -> Path:
    """``python sample.py export`` of the demo run (through sample.py's dispatch, in this process)."""
    import sample as sample_cli

    out = tmp_path_factory.mktemp("export") / "pipe"
    sample_cli.main(["export", "--checkpoint", str(demo_run), "--out", str(out)])
    return out


def _load(path: Path) -> LatentPatchPipeline:
    pipe = LatentPatchPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- the acceptance path

# Run in a fresh process: loads the folder without the checkpoint code, both through the class and
# through diffusers' generic loader (custom_pipeline: the folder's pipeline.py), and generates
# sample.py's samples 0..N-1 (labels i % 10, each image's noise from sample i's own generator).
FRESH_PROCESS = textwrap.dedent("""
    import sys
    import latent_patch  # first: the OpenMP policy is set before torch loads (as sample.py does)
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    from latent_patch import LatentPatchPipeline
    from latent_patch.edm import index_labels

    folder, out, steps, cfg, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    idx = list(range(n))
    labels = index_labels(idx, 10).tolist()
    gens = lambda: LatentPatchPipeline.sample_generators(idx, seed=seed)
    kw = dict(num_inference_steps=steps, guidance_scale=cfg)
    pipe = LatentPatchPipeline.from_pretrained(folder)
    res = {"class_np": pipe(class_labels=labels, generator=gens(), output_type="np", **kw).images,
           "class_pil": np.stack([np.asarray(im) for im in pipe(class_labels=labels, generator=gens(), **kw).images])}
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    assert type(pipe) is LatentPatchPipeline, type(pipe)
    names = [pipe.config.class_names[i] for i in labels]  # labels by name: the same classes
    res["generic_np"] = pipe(class_labels=names, generator=gens(), output_type="np", **kw).images
    np.savez(out, labels=np.asarray(labels), threads=torch.get_num_threads(), **res)
""")


def test_export_loads_in_a_fresh_process_and_equals_sample_py(demo_run, exported, tmp_path):
    """The exported pipeline, loaded in a fresh process, makes sample.py's images for the same noise.

    Compared: the uint8 pixels of sample.py's samples.npz (samples 0..N-1 of --seed SEED, one batch)
    against the pipeline's for the same labels and per-sample generators, bit for bit: both run the
    same float32 CPU ops on the same batch at one torch thread count (faults.THREADS: sample.py
    pinned in this process, the fresh process by its environment; edm.sample, then codec's
    decoder), so no tolerance is needed ("np" is uint8 / 255; PIL is the uint8 itself).
    """
    import faults as F
    import sample as sample_cli

    out = tmp_path / "samples"
    made = F.call_cli(sample_cli.main, [
        "--checkpoint", str(demo_run), "--out", str(out), "--num-samples", str(N), "--batch-size", str(N),
        "--steps", str(STEPS), "--cfg-scale", str(CFG), "--seed", str(SEED), "--save", "npz", "--grid", "0",
        "--amp", "none", "--compile", "false", "--no-progress"])
    assert made.rc == 0, made.text[-3000:]
    with np.load(out / "samples.npz") as f:
        ref, ref_labels = f["arr_0"], f["labels"]

    res_file = tmp_path / "pipeline.npz"
    env = dict(F.child_env(), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(exported), str(res_file), str(STEPS), str(CFG),
                           str(SEED), str(N)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(res_file) as f:
        res = {k: f[k] for k in f.files}

    assert int(res.pop("threads")) == made.threads == F.THREADS  # the premise: one thread count
    assert ref.shape == (N, 64, 64, 3) and ref.std() > 5  # real images, not a constant
    assert res["labels"].tolist() == ref_labels.tolist()
    for key in ("class_np", "generic_np"):
        images = res[key]
        assert images.dtype == np.float32 and images.shape == ref.shape and 0 <= images.min() and images.max() <= 1
        assert np.array_equal((images * 255).round().astype(np.uint8), ref), key
    assert np.array_equal(res["class_pil"], ref)


# --------------------------------------------------------------------------- layout and contents

def test_export_is_diffusers_layout_with_ema_weights_and_norm(demo_run, exported):
    from safetensors.torch import load_file

    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "LatentPatchPipeline"
    assert index["denoiser"] == ["latent_patch.pipeline", "LatentPatchDenoiser"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["class_names"] == CLASS_NAMES and index["sampler"] == {"cfg_scale": 3.0}  # configs/demo.yaml recommends it
    for part in ("denoiser", "vae"):
        assert (exported / part / "config.json").is_file()
        assert (exported / part / "diffusion_pytorch_model.safetensors").is_file()
    assert "LatentPatchPipeline" in (exported / "pipeline.py").read_text()

    ckpt = ck.resolve_checkpoint(demo_run)
    den = json.loads((exported / "denoiser" / "config.json").read_text())
    cfg, manifest = ck.load_config(ckpt), ck.read_manifest(ckpt)
    norm = model_norm(cfg, manifest)
    assert den["latent_norm_mean"] == list(norm.mean) and den["latent_norm_gain"] == list(norm.gain)
    assert den["scaling_factor"] == 0.40756 and den["sigma_data"] == cfg.edm.sigma_data
    assert den["model"]["preset"] == cfg.model.preset and den["model"]["channels"] == cfg.model.channels

    saved = load_file(str(exported / "denoiser" / "diffusion_pytorch_model.safetensors"))
    ema = ck.load_weights(ckpt, ck.EMA_FILE)
    assert set(saved) == {"precond.net." + k for k in ema}
    assert all(torch.equal(saved["precond.net." + k], v) for k, v in ema.items())  # the EMA weights, exactly


def test_export_replaces_an_earlier_export_and_refuses_other_folders(demo_run, tmp_path, capsys):
    from latent_patch.pipeline import main_export

    out = tmp_path / "pipe"
    main_export(["--checkpoint", str(demo_run), "--out", str(out), "--weights", "model"])
    main_export(["--checkpoint", str(demo_run), "--out", str(out)])
    assert (out / "model_index.json").is_file() and not list(tmp_path.glob(".*pipe*"))
    line = capsys.readouterr().out.strip().splitlines()[-1]  # one summary line: what, where, size, rate
    assert re.fullmatch(rf"export done: LatentPatchPipeline \(ema weights of {re.escape(str(demo_run))}\S*\) in "
                        rf"{re.escape(str(out))}, [\d.]+ MiB; [\d.]+ s \([\d.]+ MiB/s\)", line), line
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an exported pipeline"):
        main_export(["--checkpoint", str(demo_run), "--out", str(other)])
    assert (other / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- the call

def test_labels_outputs_and_generators(exported):
    pipe = _load(exported)
    assert pipe.label_tensor(["Trouser", 3, "Bag"]).tolist() == [1, 3, 8]
    assert pipe.get_label_ids("Ankle boot") == [9] and pipe.labels["Sandal"] == 5
    with pytest.raises(ValueError, match="unknown class name"):
        pipe.label_tensor(["Dragon"])
    with pytest.raises(ValueError, match="0..9"):
        pipe.label_tensor([10])
    with pytest.raises(ValueError, match="one per image"):
        pipe(class_labels=[0, 1], generator=[torch.Generator()], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], output_type="jpeg")

    def run(**kw):
        return pipe(class_labels=[2, "Coat"], num_inference_steps=2, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(5), **kw).images

    lat, pt, np_img = run(output_type="latent"), run(output_type="pt"), run(output_type="np")
    assert lat.shape == (2, 4, 16, 16) and pt.shape == (2, 3, 64, 64) and np_img.shape == (2, 64, 64, 3)
    assert torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(np_img))  # one generator: reproducible
    pil = run()
    assert len(pil) == 2 and pil[0].size == (64, 64)
    assert np.array_equal(np.asarray(pil[1]), (np_img[1] * 255).round().astype(np.uint8))
    tup = pipe(class_labels=0, num_inference_steps=1, output_type="np", return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == (1, 64, 64, 3)


def test_sampler_recommendation_is_stored_and_the_call_overrides_it(exported, tmp_path):
    assert pipeline.recommended_sampler(TrainConfig()) == {}  # no sampler section yet: the defaults
    rec = pipeline.recommended_sampler(SimpleNamespace(sampler=SamplerConfig(steps=32, cfg_scale=2.5)))
    assert rec == {"steps": 32, "cfg_scale": 2.5}

    pipe = _load(exported)
    pipe = LatentPatchPipeline(denoiser=pipe.denoiser, vae=pipe.vae, class_names=pipe.config.class_names, sampler=rec)
    pipe.save_pretrained(tmp_path / "p")
    again = _load(tmp_path / "p")
    assert again.config.sampler == rec and again.config.class_names == CLASS_NAMES
    assert again.sampler_config() == SamplerConfig(steps=32, cfg_scale=2.5)
    assert again.sampler_config(num_inference_steps=7, guidance_scale=1.0) == SamplerConfig(steps=7, cfg_scale=1.0)
    with pytest.raises(config_mod.ConfigError, match="not a config key"):
        LatentPatchPipeline(denoiser=pipe.denoiser, vae=pipe.vae, sampler={"guidance": 2})


@pytest.mark.parametrize("preset", ["DiT-T/2", "DiT-T/2-2025"])
def test_dit_pipeline_round_trips_and_resaves_after_a_call(tiny_vae_dir, tmp_path, one_thread_per_module, preset):
    """A DiT denoiser (non-persistent position buffer, built empty by from_pretrained) survives
    save / load with the same images; a pipeline that has run (its VAE channels_last) saves again.
    The 2025 block (issue 29: RoPE frequencies in that buffer, SwiGLU, RMSNorm, QK-norm) too."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    den = LatentPatchDenoiser(model={"preset": preset, "latent_channels": 4, "latent_size": 8, "num_classes": 3},
                              sigma_data=0.5, scaling_factor=0.5)
    den.load_state_dict(_perturbed(den, 3))
    pipe = LatentPatchPipeline(denoiser=den.eval(), vae=AutoencoderKL.from_pretrained(tiny_vae_dir), class_names=["a", "b", "c"])
    pipe.set_progress_bar_config(disable=True)

    def images(p):
        return p(class_labels=["a", 2], num_inference_steps=3, guidance_scale=1.5,
                 generator=LatentPatchPipeline.sample_generators([0, 1], seed=1), output_type="np").images

    before = images(pipe)
    pipe.save_pretrained(tmp_path / "dit")
    loaded = _load(tmp_path / "dit")
    assert loaded.denoiser.latent_norm is None and before.shape == (2, 32, 32, 3)
    assert np.array_equal(images(loaded), before)
    loaded.save_pretrained(tmp_path / "again")
    assert np.array_equal(images(_load(tmp_path / "again")), before)
