"""The fault suite's toolbox: bad-input factories, a SIGKILL-and-resume harness, output checks.

Users run the three jobs for days on preemptible machines over millions of unchecked files, so
the suite has to show two things with evidence rather than assertions of intent:

* every bad input gets a clear answer (encoded correctly when it is merely unusual, skipped and
  listed when it is broken, refused with a message naming the culprit when a run cannot go on),
* a job killed with SIGKILL at a random moment and re-run with the same command ends with exactly
  the output of an uninterrupted run: no sample lost, none duplicated, no half-written file.

Both ``tests/test_faults.py`` / ``tests/test_bad_inputs.py`` and ``benchmarks/bench_faults.py``
drive these functions, so the figures the benchmark prints come from the same checks the tests
assert. Every check reads outputs independently of the stage's own readers where it can
(``tarfile`` for shards, ``numpy`` for arrays), so a bug in a stage's reader cannot hide itself.

Nothing here ever unpickles: the planted payloads are hand-written pickle opcodes that would
create a marker file if anything executed them; the checks assert the marker never appears.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu_dit.yaml"
RES = 32  # pixels; the tiny VAE downsamples 4x, giving the 4 x 8 x 8 latents the tiny configs want


# ============================================================================ verdicts

@dataclass
class Outcome:
    """The verdict on one bad input: handled or not, and what was seen (for the report)."""

    group: str  # images | shards | checkpoints | configs | safety
    kind: str
    handled: bool
    detail: str
    traceback: bool = False  # the CLI's answer was an escaped exception, not a one-line error


@dataclass
class KillRecord:
    """One SIGKILL: where it landed, and whether everything after it checked out."""

    stage: str
    seed: int
    attempt: int
    mode: str  # "work": delay counted from the job's first work line; "any": from process start
    delay_s: float
    progress: float = 0.0  # fraction of the job done on disk when the kill landed
    problems: list[str] = field(default_factory=list)
    ok: bool = False


@dataclass
class ChainResult:
    """A kill chain's kills plus the final comparison with the uninterrupted reference."""

    stage: str
    seed: int
    kills: list[KillRecord]
    lost: int
    duplicated: int
    problems: list[str]
    seconds: float
    extra: dict = field(default_factory=dict)  # stage-specific findings (Stage.report)


# ============================================================================ running the CLIs

def child_env(threads: int = 1) -> dict[str, str]:
    """Environment for the CLIs under test: one pinned thread count (so CPU numerics match the
    in-process references bit for bit), sleeping OpenMP threads, and the checkout importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    extra = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *extra])
    return env


def script_cmd(script: str, *args: Any, nproc: int = 1) -> list[str]:
    """``python SCRIPT ARGS`` or, for several processes, the same under torchrun --standalone
    (a free rendezvous port, so concurrent suites on one machine do not collide)."""
    argv = [str(a) for a in args]
    if nproc == 1:
        return [sys.executable, str(ROOT / script), *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), str(ROOT / script), *argv]


@dataclass
class CliResult:
    """What a user would see from one CLI call: exit code and text; ``uncaught`` names an
    exception that escaped main() (the user gets a traceback instead of a one-line error)."""

    rc: int
    text: str
    uncaught: str | None = None


def root_script(name: str) -> Any:
    """Import a root-level CLI script (e.g. encode_latents.py) as a module, to call its main()."""
    spec = importlib.util.spec_from_file_location(f"_cli_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_cli(main: Callable[..., Any], argv: list[str]) -> CliResult:
    """Run a CLI's main(argv) in this process (no interpreter start-up: the suite stays fast),
    capturing everything it prints and turning exits and escaped exceptions into a CliResult."""
    buf = io.StringIO()
    uncaught = None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            ret = main([str(a) for a in argv])
            rc = ret if isinstance(ret, int) else 0
        except SystemExit as err:
            rc = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
            if isinstance(err.code, str):
                print(err.code)
        except Exception as err:  # what a user would see as a traceback
            rc, uncaught = 1, type(err).__name__
            print(f"{type(err).__name__}: {err}")
    return CliResult(rc, buf.getvalue(), uncaught)


class Proc:
    """A CLI in its own session, its output read line by line on a thread (so the harness can
    wait for the job's first work line); :meth:`kill` takes down its whole process tree."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT):
        self.t0, self.wall0 = time.monotonic(), time.time()
        self.p = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.p.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def running(self) -> bool:
        return self.p.poll() is None

    def wait_until(self, pred: Callable[[], bool], timeout: float) -> bool:
        """Poll ``pred`` until true (True) or the process ends / time runs out (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            if not self.running():
                return pred()
            time.sleep(0.005)
        return False

    def kill(self) -> bool:
        """SIGKILL every process of the job at once; False when it had already ended by itself."""
        if not self.running():
            self.finish(5)
            return False
        kill_tree(self.p.pid)
        self.finish(30)
        return True

    def finish(self, timeout: float) -> int:
        """Wait for the end (killing the job on timeout); returns the exit code."""
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.p.pid)
            rc = self.p.wait()
            self.lines.append(f"[fault suite: killed after the {timeout:.0f} s time limit]")
        self._reader.join(timeout=10)
        return rc


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc (Linux). torchrun starts its workers in
    sessions of their own, so a process-group kill would leave them running as orphans."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_tree(pid: int) -> None:
    """Freeze the whole tree (SIGSTOP: no process does more work or forks), then SIGKILL it:
    every process of the job dies at the same instant, as on a preempted machine."""
    frozen: set[int] = set()
    for _ in range(3):  # re-scan: a child forked before its parent froze joins the next pass
        new = [p for p in process_tree(pid) if p not in frozen]
        if not new:
            break
        for p in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
        frozen.update(new)
    for p in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


# ============================================================================ fixtures

def make_tiny_vae(path: Path, latent_channels: int = 4) -> Path:
    """A random diffusers AutoencoderKL (downsampling 4) saved offline: the suite's VAE."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                        layers_per_block=1, norm_num_groups=8, sample_size=RES)
    vae.save_pretrained(path)
    return path


def pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth, asymmetric uint8 RGB image (gradients + mild noise): JPEG keeps it recognisable
    and any rotation or flip changes it, which the EXIF check relies on."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1),
                     255 * ((x + 2 * y) % 17) / 16], axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def make_image_tree(root: Path, classes: int, per_class: int, seed: int = 0) -> int:
    """``root/c<k>/img_<k>_<i>.{JPEG,png}``: plain, valid images of varied sizes (the good data
    the kill suite encodes). Returns the number of images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = root / f"c{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(RES, 2 * RES + 16, size=2))
            ext = "png" if i % 3 == 0 else "JPEG"
            Image.fromarray(pattern(rng, h, w)).save(d / f"img_{k}_{i}.{ext}")
    return classes * per_class


# ============================================================================ pickle payloads

def pickle_payload(marker: Path) -> bytes:
    """Protocol-0 pickle opcodes for ``open(marker, "w")``, written by hand (no pickle module):
    whoever unpickles it creates ``marker``; the suite asserts it never appears."""
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def npy_object_payload(marker: Path, shape: tuple[int, ...]) -> bytes:
    """An .npy of dtype object whose body is :func:`pickle_payload`: np.load with pickles allowed
    would run it; a safe reader must refuse it from the header alone."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False,
                                                  "shape": shape})
    return header.getvalue() + pickle_payload(marker)


def torch_zip_payload(marker: Path) -> bytes:
    """A file laid out like torch.save's zip whose data.pkl is :func:`pickle_payload`: a full
    torch.load would run it; torch.load(weights_only=True) must refuse it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("state/data.pkl", pickle_payload(marker))
        z.writestr("state/byteorder", "little")
        z.writestr("state/version", "3\n")
    return buf.getvalue()


# ============================================================================ reading outputs

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample in file order, read with tarfile alone (an
    independent reader: a bug in the project's loader cannot hide a bad shard here)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


def read_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def manifest_keys(out: Path) -> tuple[Counter, list[str]]:
    """Every key of every shard the manifest lists (a Counter: duplicates show), plus problems:
    a listed shard missing, a sha256 that differs, a count that differs, an unlisted shard."""
    man = json.loads((out / "manifest.json").read_text())
    keys: Counter = Counter()
    problems: list[str] = []
    listed = set()
    for sh in man["shards"]:
        p = out / sh["name"]
        listed.add(sh["name"])
        if not p.is_file():
            problems.append(f"{p.name}: listed in the manifest but missing")
            continue
        if sha256_file(p) != sh["sha256"]:
            problems.append(f"{p.name}: sha256 differs from the manifest")
        samples = tar_samples(p)
        keys.update(k for k, _ in samples)
        if len(samples) != sh["num_samples"]:
            problems.append(f"{p.name}: {len(samples)} samples, manifest says {sh['num_samples']}")
    problems += [f"{p.name}: shard not in the manifest" for p in out.glob("shard-*.tar")
                 if p.name not in listed]
    if sum(keys.values()) != man["num_samples"]:
        problems.append(f"manifest num_samples {man['num_samples']} != {sum(keys.values())} found")
    return keys, problems


def key_diff(ref: Counter, got: Counter) -> tuple[int, int, int]:
    """(lost, duplicated, unexpected): reference keys missing, extra copies, keys never expected."""
    lost = sum(1 for k in ref if k not in got)
    duplicated = sum(c - 1 for c in got.values() if c > 1)
    unexpected = sum(1 for k in got if k not in ref)
    return lost, duplicated, unexpected


def metrics_records(run: Path) -> list[dict]:
    """metrics.jsonl as records; a torn line (a kill mid-write) becomes {"torn": text}."""
    p = run / "metrics.jsonl"
    if not p.is_file():
        return []
    recs = []
    for line in p.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            recs.append({"torn": line[:80]})
    return recs


def last_per_step(records: Iterable[dict]) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed run re-logs the steps
    between its checkpoint and the kill)."""
    return {int(r["step"]): float(r["loss"]) for r in records if "step" in r}


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ============================================================================ bad images

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
    """encode_latents.py's main() on ``src`` (same flags as the kill suite), in this process."""
    cli = root_script("encode_latents.py")
    argv = ["--source", src, "--out", out, "--vae", vae, "--resolution", RES, "--shard-size",
            shard_size, "--batch-size", 4, "--threads", 1, "--workers", 0, "--device", "cpu",
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
    from latent_patch.loader import DataConfig, build_loader

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
            f"model.num_classes={num_classes}", f"run.total_images={total}",
            "run.log_every_images=1", f"run.ckpt_every_images={ckpt_every}", "run.keep_last=0",
            "run.tensorboard=false", *overrides]
    return argv + (["--resume", resume] if resume else [])


def train_cli(argv: list[str]) -> CliResult:
    """train_latent.py in this process."""
    from latent_patch.train import main

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
    """run.preview_vae with 8 latent channels for 4-channel shards: the run must refuse it up
    front (naming the VAE), not train and then crash at the first preview, losing that work."""
    run = fx.work / "cfg_preview_vae"
    res = train_cli(train_argv(fx.shards, run, fx.num_classes, f"run.preview_vae={fx.vae8}",
                               "run.preview_every_images=200", total=400, ckpt_every=400))
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

class Stage:
    """One job under the kill harness, bound to a fresh output folder and its reference.

    Subclasses say how to start the job, when its work has begun, how far it got (from disk),
    what must hold right after a kill, what the next run must do about it, and how the finished
    output compares with the uninterrupted reference."""

    name = "stage"
    anchor = re.compile(r"$^")  # a line the job prints when its real work begins
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

    def progress(self) -> float:
        """Fraction of the job done on disk right now (the live run included)."""
        return 0.0

    def resume_point(self) -> float:
        """Fraction a new run starts from (for training: the latest complete checkpoint)."""
        return self.progress()

    def after_kill(self) -> tuple[list[str], Any]:
        return [], None

    def after_next(self, snapshot: Any, proc: Proc) -> list[str]:
        return []

    def final(self) -> tuple[int, int, list[str]]:
        raise NotImplementedError

    def report(self) -> dict:
        """Stage-specific figures for the summary, read after :meth:`final`."""
        return {}


class EncodeStage(Stage):
    """encode_latents.py into ``out``; reference: an uninterrupted encoding ``ref`` of ``src``."""

    anchor = re.compile(r"^worker \d+/\d+:")

    def __init__(self, src: Path, out: Path, ref: Path, vae: Path, nproc: int = 1,
                 shard_size: int = 8):
        self.src, self.out, self.ref, self.vae, self.nproc = src, out, ref, vae, nproc
        self.shard_size = shard_size
        self.name = f"encode_{nproc}proc"
        self.ref_manifest = json.loads((ref / "manifest.json").read_text())

    def command(self) -> list[str]:
        return script_cmd("encode_latents.py", "--source", self.src, "--out", self.out, "--vae",
                          self.vae, "--resolution", RES, "--shard-size", self.shard_size,
                          "--batch-size", 4, "--threads", 1, "--workers", 0, "--device", "cpu",
                          "--no-progress", nproc=self.nproc)

    def progress(self) -> float:
        done = sum(1 for p in self.out.glob("shard-*.tar") if p.with_suffix(".json").is_file())
        return done / len(self.ref_manifest["shards"])

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

    def __init__(self, shards: Path, run: Path, ref_run: Path, num_classes: int, total: int,
                 ckpt_every: int, ready: threading.Event | None = None):
        self.shards, self.run, self.ref_run, self.ready = shards, run, ref_run, ready
        self.num_classes, self.total, self.ckpt_every = num_classes, total, ckpt_every
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

    @property
    def ref_images(self) -> dict[int, int]:
        return {int(r["step"]): int(r["images"]) for r in self._ref_records()}

    def command(self) -> list[str]:
        return script_cmd("train_latent.py", *train_argv(self.shards, self.run, self.num_classes,
                                                         total=self.total, ckpt_every=self.ckpt_every))

    def progress(self) -> float:
        recs = [r for r in metrics_records(self.run) if "images" in r]
        return min(1.0, recs[-1]["images"] / self.total) if recs else 0.0

    def resume_point(self) -> float:
        from latent_patch import checkpoint

        latest = checkpoint.find_latest(self.run)
        if latest is None:
            return 0.0  # (no need to wait for the reference)
        return min(1.0, self.ref_images.get(int(latest.name.split("-")[1]), 0) / self.total)

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

    def __init__(self, ckpt: Path, out: Path, ref: Path, num_samples: int, batch: int, steps: int,
                 save: str = "npz", ready: threading.Event | None = None):
        self.ckpt, self.out, self.ref, self.ready = ckpt, out, ref, ready
        self.n, self.batch, self.steps, self.save = num_samples, batch, steps, save

    def argv(self, out: Path) -> list[str]:
        return ["--checkpoint", str(self.ckpt), "--out", str(out), "--num-samples", str(self.n),
                "--batch-size", str(self.batch), "--steps", str(self.steps), "--no-progress",
                "--save", self.save, "--grid", "0"]

    def command(self) -> list[str]:
        return script_cmd("sample.py", *self.argv(self.out))

    def started(self, proc: Proc) -> bool:
        """sampling.json is (re)written just before the sampling loop starts."""
        p = self.out / "sampling.json"
        return p.is_file() and p.stat().st_mtime >= proc.wall0 - 1.0

    def progress(self) -> float:
        return len(self._part_indices()) / self.n

    def _part_indices(self) -> set[int]:
        found = set()
        for p in (self.out / "parts").glob("idx-*.npz"):
            m = re.match(r"idx-(\d+)-(\d+)\.npz$", p.name)
            if m:
                found.update(range(int(m.group(1)), int(m.group(2))))
        return {i for i in found if i < self.n}

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
    """Seconds from process start to the job's first work line, and of work after it: the
    kill delays are drawn from these (refreshed from what each attempt shows)."""

    startup_s: float
    work_s: float


def kill_chain(stage: Stage, seed: int, kills: int, timing: Timing, timeout: float = 300.0,
               log: Callable[[str], None] = lambda s: None, p_any: float = 0.25) -> ChainResult:
    """SIGKILL ``stage``'s command ``kills`` times at seeded random moments, re-running the same
    command after each kill, then let it finish and compare with the reference.

    Delay: with probability ``1 - p_any`` uniform over the work still to do, counted from the
    job's first work line ("work"); else uniform from process start ("any", so start-up and
    set-up are hit too). A run that finishes before its kill ends the chain, uncounted."""
    t_start, rng = time.monotonic(), random.Random(seed)
    records: list[KillRecord] = []
    pending: tuple[KillRecord, Any] | None = None
    for attempt in range(1, 3 * kills + 2):
        start = stage.resume_point()
        want = len(records) < kills and start < 1.0  # nothing left to interrupt at 100 %
        mode = ("any" if rng.random() < p_any else "work") if want else "none"
        remaining = max(timing.work_s * (1.0 - start), 0.1)
        delay = rng.uniform(0, 0.9 * remaining + (timing.startup_s if mode == "any" else 0.0))
        proc = Proc(stage.command())
        killed = want and _kill_after(proc, stage, mode, delay, timing, timeout)
        rc = None if killed else proc.finish(timeout)
        if pending:
            pending[0].problems += _guarded(lambda: stage.after_next(pending[1], proc), "resume check")
            pending = None
        if killed:
            rec = KillRecord(stage.name, seed, attempt, mode, round(delay, 3), round(stage.progress(), 3))
            if mode == "work":
                _learn_rate(timing, delay, rec.progress - start)
            try:
                rec.problems, snap = stage.after_kill()
            except Exception as err:  # an unreadable state is a finding, not a harness crash
                rec.problems, snap = [f"post-kill check failed: {type(err).__name__}: {err}"], None
            records.append(rec)
            pending = (rec, snap)
            log(f"  {stage.name} seed {seed} attempt {attempt}: SIGKILL {delay:.2f} s after "
                f"{'its first work line' if mode == 'work' else 'process start'}, "
                f"{100 * rec.progress:.0f}% done on disk"
                f"{'; PROBLEMS: ' + '; '.join(rec.problems) if rec.problems else ''}")
            continue
        if rc != 0:
            return _chain(stage, seed, records, 0, 0, [f"run {attempt} failed (rc {rc}): {proc.text[-800:]}"], t_start)
        break
    try:
        lost, dup, problems = stage.final()
    except Exception as err:
        lost, dup, problems = 0, 0, [f"final comparison failed: {type(err).__name__}: {err}"]
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


def _learn_rate(timing: Timing, delay: float, done: float) -> None:
    """Refine the work-duration estimate from how far a killed run got in ``delay`` seconds
    (a run already finished on disk bounds the work from above)."""
    if 0.05 < done < 0.95 and delay > 0:
        timing.work_s = 0.5 * timing.work_s + 0.5 * delay / done
    elif done >= 0.95:
        timing.work_s = max(0.2, min(timing.work_s, delay))


def _kill_after(proc: Proc, stage: Stage, mode: str, delay: float, timing: Timing, timeout: float) -> bool:
    """Wait for the first work line (mode "work"), then ``delay`` s, then SIGKILL the session."""
    if mode == "work":
        if not proc.wait_until(lambda: stage.started(proc), timeout):
            return proc.kill()
        timing.startup_s = 0.5 * timing.startup_s + 0.5 * (time.monotonic() - proc.t0)
    t_anchor = time.monotonic()
    proc.wait_until(lambda: time.monotonic() - t_anchor >= delay, delay + 1)
    return proc.kill()


def _chain(stage: Stage, seed: int, records: list[KillRecord], lost: int, dup: int,
           problems: list[str], t_start: float) -> ChainResult:
    for rec in records:
        rec.ok = not rec.problems and not problems and lost == 0 and dup == 0
    return ChainResult(stage.name, seed, records, lost, dup, problems, round(time.monotonic() - t_start, 1))


# ============================================================================ summary

def summarize(outcomes: list[Outcome], chains: list[ChainResult], seconds: float, mode: str) -> dict:
    """The benchmark's figures, every one counted from the checks above. ``moments`` lists each
    kill as ``seed/attempt:mode+delay@progress`` (mode "work": delay after the job's first work
    line; "any": after process start; progress: share of the output complete on disk)."""
    kills = [k for c in chains for k in c.kills]
    stages: dict[str, dict] = {}
    for c in chains:
        s = stages.setdefault(c.stage, {"kills": 0, "resumed_ok": 0, "seeds": [], "in_work_phase": 0,
                                        "partial_output": 0, "lost": 0, "duplicated": 0, "moments": []})
        s["kills"] += len(c.kills)
        s["resumed_ok"] += sum(k.ok for k in c.kills)
        s["in_work_phase"] += sum(k.mode == "work" for k in c.kills)  # after the first work line
        s["partial_output"] += sum(0.0 < k.progress < 1.0 for k in c.kills)  # folder part-done
        s["seeds"].append(c.seed)
        s["lost"] += c.lost
        s["duplicated"] += c.duplicated
        s["moments"] += [f"{k.seed}/{k.attempt}:{k.mode}+{k.delay_s:.2f}s@{100 * k.progress:.0f}%" for k in c.kills]
        for key, value in c.extra.items():  # e.g. byte_identical (all chains), max_loss_dev (max)
            s[key] = (s.get(key, True) and value) if isinstance(value, bool) else max(s.get(key, value), value)
    return {
        "kills": len(kills), "resumed_ok": sum(k.ok for k in kills),
        "samples_lost": sum(c.lost for c in chains), "samples_duplicated": sum(c.duplicated for c in chains),
        "bad_inputs": len(outcomes), "bad_inputs_handled": sum(o.handled for o in outcomes),
        "unhandled": [o.kind for o in outcomes if not o.handled],
        "answered_by_traceback": [o.kind for o in outcomes if o.traceback], "stages": stages,
        "mode": mode, "seconds": round(seconds, 1),
    }
