"""latent_patch.config: YAML + key=value overrides into typed dataclasses, errors that name the key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from latent_patch import config


@dataclass
class Inner:
    lr: float = 1e-4
    sizes: list[int] = field(default_factory=lambda: [16, 32])
    name: str | None = None


@dataclass
class WithTuple:
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = 10
    flag: bool = False
    mode: Literal["no", "bf16", "fp16"] = "no"


def _yaml(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_file_then_overrides(tmp_path):
    p = _yaml(tmp_path, "steps: 5\ninner:\n  lr: 0.001\n")
    cfg = config.load(Outer, p, ["flag=true", "mode=bf16", "inner.sizes=[8]"])
    assert cfg.steps == 5 and cfg.inner.lr == 1e-3  # from the file
    assert cfg.flag is True and cfg.mode == "bf16" and cfg.inner.sizes == [8]  # overrides, typed
    assert cfg.inner.name is None  # untouched default


def test_override_beats_file_and_parses_yaml_scalars(tmp_path):
    p = _yaml(tmp_path, "steps: 5\n")
    cfg = config.load(Outer, p, ["steps=7", "inner.lr=3.0e-4", "inner.name=run1"])
    assert cfg.steps == 7 and cfg.inner.lr == pytest.approx(3e-4) and cfg.inner.name == "run1"
    assert isinstance(cfg.inner.lr, float)


def test_fixed_length_tuple_override():
    assert config.load(WithTuple).betas == (0.9, 0.999)
    assert config.load(WithTuple, None, ["betas=[0.5, 0.6]"]).betas == (0.5, 0.6)


def test_exponent_without_dot_is_a_float():
    assert config.load(Outer, None, ["inner.lr=3e-4"]).inner.lr == pytest.approx(3e-4)


def test_int_into_float_field_is_accepted(tmp_path):
    assert config.load(Outer, None, ["inner.lr=1"]).inner.lr == 1.0


def test_unknown_key_in_file_is_named(tmp_path):
    p = _yaml(tmp_path, "inner:\n  lrr: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"inner\.lrr"):
        config.load(Outer, p)


def test_unknown_override_key_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match=r"inner\.bogus"):
        config.load(Outer, None, ["inner.bogus=1"])
    with pytest.raises(config.ConfigError, match=r"'nope'"):
        config.load(Outer, None, ["nope=1"])


@pytest.mark.parametrize(
    "override, key",
    [("steps=abc", "steps"), ("flag=3", "flag"), ("inner.lr=fast", "inner.lr"),
     ("mode=fp8", "mode"), ("inner.sizes=[1, x]", r"inner.sizes\[1\]"), ("inner.sizes=3", "inner.sizes"), ("steps=1.5", "steps")],
)
def test_wrong_type_is_named(override, key):
    with pytest.raises(config.ConfigError, match=key if "\\" in key else key.replace(".", r"\.")):
        config.load(Outer, None, [override])


def test_wrong_type_in_file_names_file_and_key(tmp_path):
    p = _yaml(tmp_path, "steps: many\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(Outer, p)
    assert "steps" in str(err.value) and str(p) in str(err.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="key=value"):
        config.load(Outer, None, ["steps"])
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(Outer, tmp_path / "missing.yaml")


def test_save_then_load_round_trips(tmp_path):
    cfg = config.load(Outer, None, ["inner.sizes=[1, 2]", "steps=3", "inner.name=x"])
    config.save(cfg, tmp_path / "out.yaml")
    assert config.load(Outer, tmp_path / "out.yaml") == cfg


def test_train_config_yaml_files_load():
    """Every shipped config loads into TrainConfig (keys match the dataclasses)."""
    from pathlib import Path

    from latent_patch.config import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    names = ["imagenet256_adm_unet.yaml", "imagenet256_dit_b2.yaml", "imagenet256_dit_xl2.yaml",
             "tiny_cpu_dit.yaml", "tiny_cpu_unet.yaml"]
    for name in names:
        cfg = config.load(TrainConfig, root / name)
        assert cfg.optim.batch_size_global > 0, name


def test_train_config_bad_override_is_named():
    from latent_patch.config import TrainConfig

    with pytest.raises(config.ConfigError, match=r"optim\.lrr"):
        config.load(TrainConfig, None, ["optim.lrr=1"])
    with pytest.raises(config.ConfigError, match=r"run\.mixed_precision"):
        config.load(TrainConfig, None, ["run.mixed_precision=fp8"])


# --------------------------------------------------------------------------- renamed keys (issue 10)

def _old_style(data: dict) -> dict:
    """A TrainConfig dict written with the pre-rename keys (what older checkpoints hold)."""
    from latent_patch.config import TrainConfig

    old = {sec: dict(v) for sec, v in data.items()}
    for before, after in TrainConfig.RENAMED.items():
        (sec_a, key_a), (sec_b, key_b) = before.split("."), after.split(".")
        old.setdefault(sec_a, {})[key_a] = old[sec_b].pop(key_b)
    old.pop("eval")
    return old


@pytest.mark.parametrize("old, new", [("run.total_images", "run.total_patches"),
                                      ("ema.half_life_images", "ema.half_life_patches"),
                                      ("optim.warmup_images", "optim.warmup_patches"),
                                      ("run.fid_every_images", "eval.fid_every_patches"),
                                      ("run.preview_vae", "eval.vae")])
def test_renamed_key_refused_naming_the_new_one(tmp_path, old, new):
    from latent_patch.config import TrainConfig

    with pytest.raises(config.ConfigError, match=rf"'{re.escape(old)}' was renamed: use '{re.escape(new)}'"):
        config.load(TrainConfig, None, [f"{old}=5"])
    sec, key = old.split(".")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({sec: {key: 5}}))
    with pytest.raises(config.ConfigError, match=rf"old\.yaml: '{re.escape(old)}' was renamed: use '{re.escape(new)}'"):
        config.load(TrainConfig, tmp_path / "old.yaml")


def test_saved_config_with_old_keys_is_migrated(tmp_path):
    from latent_patch.config import TrainConfig

    cfg = config.load(TrainConfig, None, ["run.total_patches=1234", "ema.half_life_patches=77", "optim.warmup_patches=9",
                                          "eval.fid_every_patches=55", "eval.fid_ref=ref.npz", "eval.vae=some/vae"])
    old = _old_style(config.to_dict(cfg))
    assert old["run"]["total_images"] == 1234 and "eval" not in old  # the fixture really is old-style
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(config.ConfigError, match="was renamed"):  # not as a user's config ...
        config.load(TrainConfig, tmp_path / "config.yaml")
    assert config.load_saved(TrainConfig, tmp_path / "config.yaml") == cfg  # ... but as a saved one


def _entry_point_parsers():
    import importlib.util
    from pathlib import Path

    import train_latent as train_cli
    from latent_patch import demo, sampling

    spec = importlib.util.spec_from_file_location("encode_cli", Path(__file__).resolve().parents[1] / "encode_latents.py")
    encode_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(encode_cli)
    helps = {"encode_latents.py": encode_cli.build_parser().format_help(), "sample.py": sampling.build_parser().format_help(),
             "demo": demo.build_parser().format_help()}
    for name, fn in (("sample.py fid-ref", sampling.main_ref), ("sample.py fid", sampling.main_fid),
                     ("train_latent.py", train_cli.main)):
        try:
            fn(["--help"])
        except SystemExit:
            pass
    return encode_cli, helps


def test_every_help_marks_required_and_shows_defaults(capsys):
    encode_cli, helps = _entry_point_parsers()
    helps["others"] = capsys.readouterr().out
    assert "(--source SOURCE | --verify)" in helps["encode_latents.py"]
    flat = {k: " ".join(v.split()) for k, v in helps.items()}
    assert "--num-samples NUM_SAMPLES samples to make (50,000 for FID) (default: 50000)" in flat["sample.py"]
    assert "--seed SEED sample i's noise and label come from (seed, i) (default: 0)" in flat["sample.py"]
    assert "(default: 64)" in flat["sample.py"].split("--batch-size BATCH_SIZE")[-1][:80]
    assert "folder (required)" in flat["sample.py"]  # --checkpoint
    assert "--config CONFIG YAML config (see configs/) (required)" in flat["others"]
    for name, text in flat.items():  # no option hides its set default
        assert "(default: None)" not in text and "(default: False)" not in text, name


def test_every_option_of_every_entry_point_states_its_default(monkeypatch):
    """Each option that takes a value says its default (shown by the formatter or in its own words),
    is marked required, or sits in a group whose title states the defaults (sample.py's sampler)."""
    import argparse

    parsers: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", capture)
    encode_cli, _ = _entry_point_parsers()  # every entry point builds its parser and parses
    from latent_patch import demo, pipeline, sampling

    for fn in (encode_cli.main, pipeline.main_export):
        with pytest.raises(SystemExit):
            fn([])
    parsers += [sampling.build_parser(), demo.build_parser()]
    assert len({p.prog for p in parsers}) == 7, [p.prog for p in parsers]
    missing = []
    for p in parsers:
        fmt = p._get_formatter()
        for group in p._action_groups:
            for action in group._group_actions:
                if not action.option_strings or action.nargs == 0:  # positionals and on/off flags
                    continue
                text = fmt._get_help_string(action)
                if not ("default" in text or "required" in text or "defaults" in (group.title or "")):
                    missing.append(f"{p.prog} {action.option_strings[0]}: {text}")
    assert not missing, missing
