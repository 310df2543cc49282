"""Bad inputs and their judges: unusual or broken images for the encoder, damaged shards for the
loader, damaged checkpoints, configs and sample folders for training and sampling. Each case says
what a correct answer is (encoded, skipped and listed, or refused naming the culprit)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu_dit.yaml"
RES = 32  # pixels; the tiny VAE downsamples 4x, giving the 4 x 8 x 8 latents the tiny configs want


# ============================================================================ verdicts
from .common import (  # noqa: F401
    THREADS, CliResult, Outcome, call_cli, make_image_tree, metrics_records, npy_object_payload, pattern, pickle_payload, read_npy, root_script, tar_samples, torch_zip_payload,
)


@dataclass
class ImageCase:
    """One unusual or broken input placed in a source tree.

    ``expect`` "encode": a correct decoder must encode it like ``twin`` (a plain 8-bit RGB PNG
    holding the pixels computed independently with numpy) within ``tol`` grey levels;
    "skip": it must be absent from the shards and listed in the manifest's ``skipped``.
    """

    kind: str
    source: str  # source id as the manifest names it, e.g. "odd/cmyk.JPEG" or "empty/"
    expect: str
    twin: str | None = None
    tol: int = 0
    note: str = ""


def _png(width: int, height: int, color_type: int, depth: int, rows: bytes) -> bytes:
    """A PNG written by hand (16-bit RGB, or a header that lies about the size)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _save_twin(d: Path, name: str, rgb: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgb, np.uint8), "RGB").save(d / name)
    return f"{d.name}/{name}"


def _png16_grey(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    from PIL import Image

    a = (np.linspace(0, 65535, 48 * 40).reshape(40, 48) + rng.normal(0, 300, (40, 48)))
    a = np.clip(a, 0, 65535).astype(np.uint16)
    Image.fromarray(a).save(d / "grey16.png")
    twin = _save_twin(d, "grey16_twin.png", np.repeat(np.rint(a / 257.0)[..., None], 3, -1))
    return ImageCase(kind, f"{d.name}/grey16.png", "encode", twin, tol=2)


def _png16_rgb(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    h, w = 36, 44
    a = (pattern(rng, h, w).astype(np.uint16) * 257 + rng.integers(0, 257, (h, w, 3))).astype(">u2")
    rows = b"".join(b"\x00" + a[i].tobytes() for i in range(h))
    (d / "rgb16.png").write_bytes(_png(w, h, 2, 16, rows))
    twin = _save_twin(d, "rgb16_twin.png", np.rint(a.astype(np.float64) / 257.0))
    # within 1 level before the bicubic resize of the ADM crop (high byte vs /257), 2 after it
    return ImageCase(kind, f"{d.name}/rgb16.png", "encode", twin, tol=2)


def _cmyk(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    from PIL import Image

    rgb = pattern(rng, 40, 52)
    cmyk = np.concatenate([255 - rgb, rng.integers(0, 60, (40, 52, 1), dtype=np.uint8)], -1)
    Image.fromarray(cmyk, "CMYK").save(d / "cmyk.JPEG", quality=95)
    raw = np.asarray(Image.open(d / "cmyk.JPEG")).astype(np.float64)  # decoded C, M, Y, K
    expect = (255 - raw[..., :3]) * (255 - raw[..., 3:]) / 255.0  # the textbook CMYK -> RGB
    twin = _save_twin(d, "cmyk_twin.png", np.rint(expect))
    return ImageCase(kind, f"{d.name}/cmyk.JPEG", "encode", twin, tol=2)


def _grey(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    from PIL import Image

    Image.fromarray(pattern(rng, 44, 36)[..., 0], "L").save(d / "grey.JPEG")
    raw = np.asarray(Image.open(d / "grey.JPEG"))
    twin = _save_twin(d, "grey_twin.png", np.repeat(raw[..., None], 3, -1))
    return ImageCase(kind, f"{d.name}/grey.JPEG", "encode", twin)


def _palette_alpha(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    from PIL import Image

    idx = rng.integers(0, 8, (40, 40), dtype=np.uint8)
    palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.flatten().tolist())
    im.save(d / "palette.png", transparency=3)  # palette entry 3 is fully transparent
    expect = palette[idx]
    expect[idx == 3] = 255  # transparent pixels over white
    twin = _save_twin(d, "palette_twin.png", expect)
    return ImageCase(kind, f"{d.name}/palette.png", "encode", twin)


def _one_pixel(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    from PIL import Image

    px = rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)
    Image.fromarray(px, "RGB").save(d / "one.png")
    twin = _save_twin(d, "one_twin.png", np.broadcast_to(px, (RES, RES, 3)))
    return ImageCase(kind, f"{d.name}/one.png", "encode", twin)


def _exif_rotated(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    from PIL import Image

    im = Image.fromarray(pattern(rng, 40, 72))  # stored landscape 72 x 40 ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... displayed rotated 90 degrees clockwise: portrait 40 x 72
    im.save(d / "exif6.JPEG", exif=exif.tobytes(), quality=95)
    raw = np.asarray(Image.open(d / "exif6.JPEG").convert("RGB"))  # the stored orientation
    twin = _save_twin(d, "exif6_twin.png", np.rot90(raw, k=-1))
    _save_twin(d, "exif6_unrotated.png", raw)  # to show the check can tell the two apart
    return ImageCase(kind, f"{d.name}/exif6.JPEG", "encode", twin,
                     note="EXIF orientation 6 (rotate 90 cw)")


def _truncated(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pattern(rng, 48, 48)).save(buf, "JPEG")
    (d / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return ImageCase(kind, f"{d.name}/truncated.JPEG", "skip")


def _zero(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    (d / "zero.JPEG").write_bytes(b"")
    return ImageCase(kind, f"{d.name}/zero.JPEG", "skip")


def _text(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    (d / "notes.JPEG").write_text("this is a text file, not a JPEG\n")
    return ImageCase(kind, f"{d.name}/notes.JPEG", "skip")


def _bomb(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    rows = b"".join(b"\x00" + bytes(3 * 16) for _ in range(4))  # 4 real rows behind the lie
    (d / "bomb.png").write_bytes(_png(100_000, 100_000, 2, 8, rows))
    return ImageCase(kind, f"{d.name}/bomb.png", "skip",
                     note="PNG header claims 100000 x 100000 px; 4 rows of data")


def _unreadable(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    (d / "unreadable.JPEG").symlink_to("/proc/self/mem")
    return ImageCase(kind, f"{d.name}/unreadable.JPEG", "skip",
                     note="we run as root, so chmod 000 cannot stop a read: a symlink to "
                          "/proc/self/mem, a regular file whose read() fails with EIO even for root")


def _dangling(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    (d / "dangling.JPEG").symlink_to(d / "no-such-target.JPEG")
    return ImageCase(kind, f"{d.name}/dangling.JPEG", "skip")


def _fifo(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    os.mkfifo(d / "fifo.JPEG")
    _feed_fifo(d / "fifo.JPEG")
    return ImageCase(kind, f"{d.name}/fifo.JPEG", "skip",
                     note="a named pipe; a writer thread feeds junk so a reader cannot hang")


def _dir_named_jpeg(d: Path, rng: np.random.Generator, kind: str) -> ImageCase:
    (d / "folder.JPEG").mkdir()
    return ImageCase(kind, f"{d.name}/folder.JPEG", "skip")


def _feed_fifo(path: Path) -> None:
    """Keep answering readers of a FIFO with junk (a daemon thread), so an encoder that opens it
    gets 'not an image' instead of blocking forever; the suite then still finishes."""
    def feed() -> None:
        while path.exists():
            try:
                with open(path, "wb") as f:  # blocks until a reader opens the pipe
                    f.write(b"junk, not an image\n")
            except OSError:
                return
            time.sleep(0.05)
    threading.Thread(target=feed, daemon=True).start()


# kind -> writer: unusual images that must be encoded, broken inputs that must be skipped and listed
UNUSUAL_IMAGES: dict[str, Callable[[Path, np.random.Generator, str], ImageCase]] = {
    "png_16bit_grey": _png16_grey, "png_16bit_rgb": _png16_rgb, "cmyk_jpeg": _cmyk,
    "greyscale_jpeg": _grey, "palette_with_transparency": _palette_alpha,
    "one_by_one_pixel": _one_pixel, "exif_rotated_jpeg": _exif_rotated,
}
BROKEN_IMAGES: dict[str, Callable[[Path, np.random.Generator, str], ImageCase]] = {
    "truncated_jpeg": _truncated, "zero_byte_file": _zero, "text_named_jpeg": _text,
    "decompression_bomb_header": _bomb, "unreadable_file": _unreadable,
    "dangling_symlink": _dangling, "fifo_named_jpeg": _fifo, "directory_named_jpeg": _dir_named_jpeg,
}
EMPTY_CLASS = "empty_class_folder"


def write_image_cases(root: Path, seed: int = 0, plain_per_class: int = 3) -> list[ImageCase]:
    """A class tree holding every image fault kind plus plain images and an empty class.

    Layout: ``plain/`` (ordinary images), ``odd/`` (the unusual, their twins and the broken
    ones), ``empty/`` (no files: must be kept as a class and noted)."""
    rng = np.random.default_rng(seed)
    make_image_tree(root, 1, plain_per_class, seed)
    (root / "c0").rename(root / "plain")
    odd = root / "odd"
    odd.mkdir()
    cases = [make(odd, rng, kind) for kind, make in {**UNUSUAL_IMAGES, **BROKEN_IMAGES}.items()]
    (root / "empty").mkdir()
    cases.append(ImageCase(EMPTY_CLASS, "empty/", "skip"))
    return cases


def encoded_samples(out: Path) -> dict[str, tuple[np.ndarray, int, int]]:
    """source id -> (stored latent (2, C, h, w), label, copies) over every listed shard."""
    man = json.loads((out / "manifest.json").read_text())
    found: dict[str, tuple[np.ndarray, int, int]] = {}
    for sh in man["shards"]:
        for _, parts in tar_samples(out / sh["name"]):
            meta = json.loads(parts["json"])
            if meta.get("flip"):
                continue
            prev = found.get(meta["source"])
            copies = 1 + (prev[2] if prev else 0)
            found[meta["source"]] = (read_npy(parts["latent.npy"]), int(parts["cls"]), copies)
    return found


def _pixels(src: Path, source: str) -> np.ndarray:
    from latent_patch.images import load_image

    return load_image((src / source).read_bytes(), RES).astype(np.int16)


def check_encoded_case(case: ImageCase, src: Path, samples: dict, latent_tol: float) -> Outcome:
    """An unusual image counts as handled when it is in the shards exactly once, with its
    class label, its pixels equal its twin's within ``tol`` and its stored latent the twin's."""
    if case.source not in samples:
        return Outcome("images", case.kind, False, "not in the shards (should have been encoded)")
    if case.twin not in samples:
        return Outcome("images", case.kind, False, f"its plain twin {case.twin} was not encoded")
    lat, label, copies = samples[case.source]
    t_lat, t_label, _ = samples[case.twin]
    if copies != 1 or label != t_label:
        return Outcome("images", case.kind, False, f"{copies} copies, label {label} vs {t_label}")
    pix_err = int(np.abs(_pixels(src, case.source) - _pixels(src, case.twin)).max())
    lat_err = float(np.abs(lat[0].astype(np.float32) - t_lat[0].astype(np.float32)).max())
    ok = pix_err <= case.tol and lat_err <= latent_tol
    detail = f"encoded; max pixel error vs twin {pix_err} (tol {case.tol}), latent {lat_err:.2g}"
    if case.source.endswith("exif6.JPEG"):
        unrot = int(np.abs(_pixels(src, case.source) - _pixels(src, "odd/exif6_unrotated.png")).max())
        ok = ok and unrot > 8 * max(case.tol, 1)  # the check must be able to see a missed rotation
        detail += f"; vs the unrotated pixels {unrot}"
    return Outcome("images", case.kind, ok, detail)


def check_skipped_case(case: ImageCase, skipped: dict[str, str], samples: dict) -> Outcome:
    """A broken input counts as handled when it is absent from the shards and the manifest's
    ``skipped`` lists it by name with a reason."""
    names = [s for s in skipped if s == case.source or s.rstrip("/") == case.source.rstrip("/")]
    if case.source in samples:
        return Outcome("images", case.kind, False, "encoded although it is broken")
    if not names or not skipped[names[0]].strip():
        return Outcome("images", case.kind, False,
                       "silently dropped: not in the shards and not listed in manifest 'skipped'")
    return Outcome("images", case.kind, True, f"skipped: {skipped[names[0]]}")


def check_image_cases(out: Path, src: Path, cases: list[ImageCase],
                      latent_tol: float = 0.05) -> list[Outcome]:
    """Verdicts for every case of :func:`write_image_cases` after encoding ``src`` into ``out``."""
    man = json.loads((out / "manifest.json").read_text())
    skipped = {s["source"]: s.get("reason", "") for s in man.get("skipped", [])}
    samples = encoded_samples(out)
    return [check_encoded_case(c, src, samples, latent_tol) if c.expect == "encode"
            else check_skipped_case(c, skipped, samples) for c in cases]


def encode_in_process(src: Path, out: Path, vae: Path, shard_size: int = 8, **extra: Any) -> CliResult:
    """encode_latents.py's main() on ``src`` (same flags as the kill suite: its batch size and
    ``--threads`` THREADS, which encoding pins itself), in this process."""
    cli = root_script("encode_latents.py")
    argv = ["--source", src, "--out", out, "--vae", vae, "--resolution", RES, "--shard-size",
            shard_size, "--batch-size", 4, "--threads", THREADS, "--workers", 0, "--device", "cpu",
            "--no-progress"]
    for flag, value in extra.items():
        argv += [f"--{flag.replace('_', '-')}", value]
    return call_cli(cli.main, argv)


def run_image_suite(work: Path, vae: Path) -> list[Outcome]:
    """Write every image fault, encode the tree once, judge each input."""
    src, out = work / "images", work / "images_out"
    cases = write_image_cases(src)
    res = encode_in_process(src, out, vae)
    if res.rc != 0 or not (out / "manifest.json").is_file():
        return [Outcome("images", c.kind, False, f"encode failed: {res.text[-300:]}") for c in cases]
    return check_image_cases(out, src, cases)


# ============================================================================ bad shards

def rewrite_tar(path: Path, edit: Callable[[str, bytes], list[tuple[str, bytes]]]) -> None:
    """Rewrite a shard member by member: ``edit(name, data)`` returns the members to write in
    its place (``[]`` drops it, several insert beside it), so the damage stays inside a valid tar
    and inside its sample (webdataset groups members by adjacent keys)."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            for new_name, new in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size, info.mtime, info.mode = len(new), 0, 0o444
                tf.addfile(info, io.BytesIO(new))


def _second_key(path: Path) -> str:
    return tar_samples(path)[1][0]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def damage_truncate(out: Path, shard: Path, marker: Path) -> str:
    """The shard cut at 60 % (a copy interrupted mid-transfer)."""
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    return shard.name


def damage_missing_member(out: Path, shard: Path, marker: Path) -> str:
    """One sample loses its ``cls`` member (a hand-edited or badly merged shard)."""
    key = _second_key(shard)
    rewrite_tar(shard, lambda n, d: [] if n == f"{key}.cls" else [(n, d)])
    return shard.name


def _replace_latent(shard: Path, make: Callable[[np.ndarray], bytes]) -> None:
    key = _second_key(shard)
    rewrite_tar(shard, lambda n, d: [(n, make(read_npy(d)) if n == f"{key}.latent.npy" else d)])


def damage_wrong_shape(out: Path, shard: Path, marker: Path) -> str:
    """One latent at half the spatial size (mixed shards from another resolution)."""
    _replace_latent(shard, lambda a: _npy_bytes(a[:, :, ::2, ::2].copy()))
    return shard.name


def damage_wrong_dtype(out: Path, shard: Path, marker: Path) -> str:
    """One latent stored as float32 (shards from another writer)."""
    _replace_latent(shard, lambda a: _npy_bytes(a.astype(np.float32)))
    return shard.name


def damage_flip_byte(out: Path, shard: Path, marker: Path) -> str:
    """One byte of a latent changed in place: a valid tar, valid .npy, only the sha256 knows."""
    data = bytearray(shard.read_bytes())
    pos = data.find(b"\x93NUMPY") + 200
    data[pos] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard.name


def damage_delete(out: Path, shard: Path, marker: Path) -> str:
    """The manifest names a shard that is not there (an incomplete copy)."""
    shard.unlink()
    return shard.name


def damage_manifest_pipe(out: Path, shard: Path, marker: Path) -> str:
    """The manifest names a ``pipe:`` command instead of a file: it must be refused, unrun."""
    man = json.loads((out / "manifest.json").read_text())
    man["shards"][1]["name"] = f"pipe:touch {marker}; cat {shard}"
    (out / "manifest.json").write_text(json.dumps(man))
    return "pipe:"


def damage_manifest_torn(out: Path, shard: Path, marker: Path) -> str:
    """manifest.json cut in half (a copy interrupted mid-file)."""
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    return "manifest.json"


def damage_pickled_npy(out: Path, shard: Path, marker: Path) -> str:
    """A latent.npy replaced by an object array whose body is a pickle payload."""
    _replace_latent(shard, lambda a: npy_object_payload(marker, a.shape))
    return shard.name


def damage_pickle_member(out: Path, shard: Path, marker: Path) -> str:
    """An extra ``.pyd`` member (webdataset's default decoders would unpickle it)."""
    key = _second_key(shard)
    payload = (f"{key}.pyd", pickle_payload(marker))
    rewrite_tar(shard, lambda n, d: [(n, d), payload] if n == f"{key}.cls" else [(n, d)])
    return shard.name


@dataclass
class ShardCase:
    """A shard fault: the damage, and how it must be caught.

    ``loader``: "error" (the training loader raises naming ``culprit``), "verify-error" (it
    raises with data.verify=true), "ok" (it must read everything, the damage being inert);
    ``verify``: whether ``encode_latents.py --verify`` must fail naming the culprit."""

    kind: str
    damage: Callable[[Path, Path, Path], str]
    loader: str
    verify: bool
    safety: bool = False


SHARD_CASES = (
    ShardCase("truncated_tar", damage_truncate, "error", True),
    ShardCase("sample_missing_a_member", damage_missing_member, "error", True),
    ShardCase("latent_wrong_shape", damage_wrong_shape, "error", True),
    ShardCase("latent_wrong_dtype", damage_wrong_dtype, "error", True),
    ShardCase("sha256_differs_from_manifest", damage_flip_byte, "verify-error", True),
    ShardCase("manifest_names_missing_shard", damage_delete, "error", True),
    ShardCase("manifest_truncated", damage_manifest_torn, "error", True),
    ShardCase("manifest_names_pipe_command", damage_manifest_pipe, "error", False, safety=True),
    ShardCase("pickle_as_latent_npy", damage_pickled_npy, "error", True, safety=True),
    ShardCase("pickle_member_in_shard", damage_pickle_member, "ok", True, safety=True),
)


def read_with_loader(shards: Path, verify: bool = False) -> str | None:
    """Load every sample the way training does (in memory); the error text, or None if fine."""
    from latent_patch.config import DataConfig
    from latent_patch.loader import build_loader

    cfg = DataConfig(shards=str(shards), batch_size=2, in_memory=True, num_workers=0, verify=verify)
    try:
        loader = build_loader(cfg, infinite=False)
        for _ in loader:
            pass
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _last_line(text: str, culprit: str = "") -> str:
    """The line of ``text`` that names ``culprit`` (else the last one): the user's answer."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if culprit and culprit in ln]
    return (named or lines or [""])[-1][:300]


def judge_shard_case(case: ShardCase, out: Path, culprit: str, marker: Path,
                     num_classes: int) -> Outcome:
    """Run the loader, the verifier and the training CLI on a damaged copy and compare with
    what ``case`` wants; the training CLI must stop before its first step, naming the culprit."""
    notes, ok, tb = [], True, False
    err = read_with_loader(out, verify=case.loader == "verify-error")
    if case.loader == "ok":
        ok &= err is None
        notes.append("loader read it, damage inert" if err is None else f"loader failed: {err}")
    else:
        ok &= err is not None and culprit in err
        notes.append(f"loader: {err}" if err else "loader read it without complaint")
        run = out.parent / f"{out.name}_run"
        extra = ["data.verify=true"] if case.loader == "verify-error" else []
        res = train_cli(train_argv(out, run, num_classes, *extra, resume=None))
        ok &= res.rc != 0 and culprit in res.text and run_state(run)[0] == 0
        tb |= res.uncaught is not None
        notes.append(f"train_latent.py rc {res.rc}{' (traceback)' if res.uncaught else ''}")
    if case.verify:
        res = call_cli(root_script("encode_latents.py").main, ["--verify", "--out", out])
        ok &= res.rc != 0 and culprit in res.text
        tb |= res.uncaught is not None
        notes.append(f"--verify rc {res.rc}{' (traceback)' if res.uncaught else ''}: "
                     f"{_last_line(res.text, culprit)}")
    if marker.exists():
        ok = False
        notes.append(f"PAYLOAD EXECUTED: {marker} exists")
    return Outcome("safety" if case.safety else "shards", case.kind, ok, " | ".join(notes)[:600], tb)


def run_shard_suite(work: Path, good: Path) -> list[Outcome]:
    """Every shard fault on its own copy of a good, finished encoding ``good``."""
    num_classes = len(json.loads((good / "manifest.json").read_text())["class_names"])
    outcomes = []
    for case in SHARD_CASES:
        out = work / f"shards_{case.kind}"
        shutil.copytree(good, out)
        marker = work / f"MARKER_{case.kind}"
        culprit = case.damage(out, out / "shard-000001.tar", marker)
        outcomes.append(judge_shard_case(case, out, culprit, marker, num_classes))
    return outcomes


# ============================================================================ checkpoints, configs

def train_argv(shards: Path, run: Path, num_classes: int, *overrides: str,
               resume: str | None = "auto", total: int = 600, ckpt_every: int = 300) -> list[str]:
    """train_latent.py's argv on the tiny DiT config, logging every step (losses per step)."""
    argv = ["--config", str(TINY_CONFIG), f"data.shards={shards}", f"run.out_dir={run}",
            f"model.num_classes={num_classes}", f"run.total_patches={total}",
            "run.log_every_patches=1", f"run.ckpt_every_patches={ckpt_every}", "run.keep_last=0",
            "run.tensorboard=false", *overrides]
    return argv + (["--resume", resume] if resume else [])


def train_cli(argv: list[str]) -> CliResult:
    """train_latent.py in this process."""
    from train_latent import main

    return call_cli(main, argv)


def sample_cli(argv: list[str]) -> CliResult:
    """sample.py (its sampling command) in this process, through the script a user runs."""
    return call_cli(root_script("sample.py").main, argv)


def sample_argv(ckpt: Path, out: Path, n: int = 8, *extra: str) -> list[str]:
    """sample.py's argv for a few quick samples (4 Heun steps, npz only)."""
    return ["--checkpoint", str(ckpt), "--out", str(out), "--num-samples", str(n), "--batch-size",
            "4", "--steps", "4", "--no-progress", "--save", "npz", "--grid", "0", *extra]


def run_state(run: Path) -> tuple[int, list[str]]:
    """(metrics lines, checkpoint folder names): what 'did any work' compares before/after."""
    ck = run / "checkpoints"
    names = sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []
    return len(metrics_records(run)), names


def latest_ckpt(run: Path) -> Path:
    """The checkpoint a case damages: the one --resume auto would take."""
    from latent_patch import checkpoint

    found = checkpoint.find_latest(run)
    if found is None:
        raise RuntimeError(f"{run}: no complete checkpoint to damage")
    return found


def restamp_done(ckpt: Path) -> None:
    """Rewrite DONE's file sizes after planting a file, as an attacker (or a sync tool) could:
    then only the loader's own safety stands between the payload and execution."""
    done = json.loads((ckpt / "DONE").read_text())
    done["files"] = {p.name: p.stat().st_size for p in ckpt.iterdir() if p.name != "DONE"}
    (ckpt / "DONE").write_text(json.dumps(done))


def answer(group: str, kind: str, res: CliResult, culprit: str, before: tuple, after: tuple) -> Outcome:
    """A refusal counts when the exit is non-zero, the text names the culprit and no work was
    done (no new metrics line, checkpoint or sample part); a traceback is flagged, not failed."""
    ok = res.rc != 0 and culprit in res.text and before == after
    style = " (escaped as a traceback)" if res.uncaught else ""
    work = "" if before == after else f"; WORK DONE before stopping: {before} -> {after}"
    return Outcome(group, kind, ok, f"rc {res.rc}{style}: {_last_line(res.text, culprit)}{work}",
                   res.uncaught is not None)


@dataclass
class RunFixture:
    """What the checkpoint/config cases share: good shards, a finished tiny run, the VAEs."""

    work: Path
    shards: Path
    run: Path
    num_classes: int
    vae: Path
    vae8: Path

    def copy_run(self, name: str) -> Path:
        dst = self.work / name
        shutil.copytree(self.run, dst)
        return dst


def case_other_model(fx: RunFixture) -> Outcome:
    """--resume auto with a deeper model than the checkpoint's: refused, naming the key."""
    run = fx.copy_run("ck_other_model")
    before = run_state(run)
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, "model.depth=3", total=900))
    return answer("checkpoints", "checkpoint_from_other_model_config", res, "model.depth", before, run_state(run))


def _truncate_case(fx: RunFixture, kind: str, fname: str) -> Outcome:
    run = fx.copy_run(f"ck_{kind}")
    f = latest_ckpt(run) / fname
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = run_state(run)
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, total=900))
    return answer("checkpoints", kind, res, fname, before, run_state(run))


def case_truncated_weights(fx: RunFixture) -> Outcome:
    """The latest model.safetensors cut in half: refused, naming the file."""
    return _truncate_case(fx, "truncated_checkpoint_weights", "model.safetensors")


def case_truncated_state(fx: RunFixture) -> Outcome:
    """The latest state.pt cut in half: refused, naming the file."""
    return _truncate_case(fx, "truncated_checkpoint_state", "state.pt")


def case_half_written(fx: RunFixture) -> Outcome:
    """A newer step folder without DONE and a .tmp folder (a writer killed mid-save): --resume
    auto must take the newest COMPLETE checkpoint and finish normally."""
    run = fx.copy_run("ck_half_written")
    good = latest_ckpt(run)
    fake = run / "checkpoints" / "step-000999999"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"\0" * 100)
    shutil.copytree(good, run / "checkpoints" / ".tmp-step-000999998")
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, total=900))
    ok = res.rc == 0 and f"resumed from {good}" in res.text
    return Outcome("checkpoints", "half_written_checkpoint", ok,
                   f"rc {res.rc}; resumed from {good.name}: {f'resumed from {good}' in res.text}")


def case_unknown_key(fx: RunFixture) -> Outcome:
    """A misspelt override (optim.lrr): refused before anything starts, naming the key."""
    run = fx.work / "cfg_unknown"
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, "optim.lrr=1e-3"))
    return answer("configs", "unknown_config_key", res, "optim.lrr", (0, []), run_state(run))


def case_wrong_type(fx: RunFixture) -> Outcome:
    """optim.lr=fast: refused before anything starts, naming the key."""
    run = fx.work / "cfg_type"
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, "optim.lr=fast"))
    return answer("configs", "config_value_of_wrong_type", res, "optim.lr", (0, []), run_state(run))


def case_model_vs_shards(fx: RunFixture) -> Outcome:
    """A model for 8-channel latents on 4-channel shards: refused, naming both."""
    run = fx.work / "cfg_channels"
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, "model.latent_channels=8"))
    return answer("configs", "model_channels_differ_from_shards", res, "latent_channels", (0, []), run_state(run))


def case_preview_vae(fx: RunFixture) -> Outcome:
    """eval.vae with 8 latent channels for 4-channel shards: the run must refuse it up
    front (naming the VAE), not train and then crash at the first preview, losing that work."""
    run = fx.work / "cfg_preview_vae"
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, f"eval.vae={fx.vae8}",
                               "eval.preview_every_patches=200", total=400, ckpt_every=400))
    return answer("configs", "preview_vae_channels_differ_from_shards", res, str(fx.vae8), (0, []), run_state(run))


def _parts(out: Path) -> tuple[int]:
    return (len(list(out.glob("parts/*.npz"))),)


def case_sample_vae(fx: RunFixture) -> Outcome:
    """sample.py --vae with 8 latent channels for a 4-channel model: refused before sampling,
    naming the VAE, and without leaving settings that block the corrected command."""
    out = fx.work / "smp_vae8"
    res = sample_cli(sample_argv(fx.run, out, 8, "--vae", str(fx.vae8)))
    verdict = answer("configs", "sample_vae_channels_differ_from_model", res, str(fx.vae8), (0,), _parts(out))
    retry = sample_cli(sample_argv(fx.run, out, 8, "--vae", str(fx.vae)))
    verdict.handled &= retry.rc == 0
    verdict.detail += (f" | retry with the right --vae into the same --out: rc {retry.rc} "
                       f"{_last_line(retry.text)[:200] if retry.rc else ''}")
    return verdict


def case_encode_other_vae(fx: RunFixture) -> Outcome:
    """Resuming an encoding into a folder made with another VAE must be refused, naming it."""
    out = fx.work / "enc_other_vae"
    shutil.copytree(fx.shards, out)
    (out / "manifest.json").unlink()  # an unfinished encoding, as after a kill
    job = json.loads((fx.shards / "job.json").read_text())
    before = sorted(p.name for p in out.iterdir())
    res = encode_in_process(Path(job["source"]["path"]), out, fx.vae8, shard_size=job["shard_size"])
    return answer("configs", "encode_resume_with_other_vae", res, str(fx.vae8), (before,),
                  (sorted(p.name for p in out.iterdir()),))


def _payload_verdict(verdict: Outcome, marker: Path) -> Outcome:
    if marker.exists():
        verdict.handled = False
        verdict.detail = f"PAYLOAD EXECUTED ({marker} exists); " + verdict.detail
    else:
        verdict.detail = f"payload not executed; {verdict.detail}"
    return verdict


def case_pickled_state(fx: RunFixture) -> Outcome:
    """A pickle payload as state.pt (DONE restamped): resume must refuse it unexecuted."""
    run = fx.copy_run("ck_pickled_state")
    ckpt = latest_ckpt(run)
    marker = fx.work / "MARKER_state"
    (ckpt / "state.pt").write_bytes(torch_zip_payload(marker))
    restamp_done(ckpt)
    before = run_state(run)
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, total=900))
    verdict = answer("safety", "pickle_payload_in_checkpoint_state", res, "state.pt", before, run_state(run))
    return _payload_verdict(verdict, marker)


def case_pickled_weights(fx: RunFixture) -> Outcome:
    """A pickle payload as ema.safetensors (DONE restamped): sample.py must refuse it unexecuted."""
    run = fx.copy_run("ck_pickled_weights")
    ckpt = latest_ckpt(run)
    marker = fx.work / "MARKER_weights"
    (ckpt / "ema.safetensors").write_bytes(torch_zip_payload(marker))
    restamp_done(ckpt)
    out = fx.work / "smp_pickled"
    res = sample_cli(sample_argv(run, out, 4))
    verdict = answer("safety", "pickle_payload_as_checkpoint_weights", res, "ema.safetensors", (0,), _parts(out))
    return _payload_verdict(verdict, marker)


def case_sample_incomplete(fx: RunFixture) -> Outcome:
    """sample.py pointed at a checkpoint folder without DONE must refuse it, naming it."""
    run = fx.copy_run("ck_incomplete")
    ckpt = latest_ckpt(run)
    (ckpt / "DONE").unlink()
    out = fx.work / "smp_incomplete"
    res = sample_cli(sample_argv(ckpt, out, 4))
    return answer("checkpoints", "sample_from_incomplete_checkpoint", res, ckpt.name, (0,), _parts(out))


RUN_CASES = (case_other_model, case_truncated_weights, case_truncated_state, case_half_written,
             case_unknown_key, case_wrong_type, case_model_vs_shards, case_preview_vae,
             case_sample_vae, case_encode_other_vae, case_pickled_state, case_pickled_weights,
             case_sample_incomplete)


def make_run_fixture(work: Path, shards: Path, vae: Path, vae8: Path, run: Path | None = None) -> RunFixture:
    """A finished tiny training run on ``shards`` with two or more checkpoints: ``run`` when
    given (the cases only ever damage copies of it), else one trained here, in this process."""
    classes = len(json.loads((shards / "manifest.json").read_text())["class_names"])
    if run is None:
        run = work / "run_base"
        res = train_cli(train_argv(shards, run, classes, resume=None))
        if res.rc != 0:
            raise RuntimeError(f"the base training run failed: {res.text[-1500:]}")
    return RunFixture(work, shards, run, classes, vae, vae8)


def run_checkpoint_suite(fx: RunFixture) -> list[Outcome]:
    """Every checkpoint/config case; a case that crashes is a finding (unhandled), not an abort."""
    outcomes = []
    for case in RUN_CASES:
        try:
            outcomes.append(case(fx))
        except Exception as err:  # a crash of the case itself is a finding, not a suite failure
            outcomes.append(Outcome("checkpoints", case.__name__.removeprefix("case_"), False,
                                    f"case crashed: {type(err).__name__}: {err}"))
    return outcomes


# ============================================================================ kill and resume

