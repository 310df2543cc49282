"""Shared pieces of the fault suite: verdict records, running the CLIs in-process or as killable
process trees, fixtures (tiny VAE, image trees), planted pickle payloads, and readers of outputs
that do not use the stages' own code (``tarfile``, ``numpy``)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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
    mode: str  # "event": after the job's output reached ``after_units`` units; "any": timed from process start
    delay_s: float  # seconds after that event ("event") or after process start ("any")
    progress: float = 0.0  # fraction of the job the live run had done (for training: logged patches)
    position: float = 0.0  # fraction of the job's output kept on disk at the kill: what a re-run starts from
    after_units: int = 0  # complete units (shards, checkpoints, parts) on disk that the kill waited for
    resumed: str = ""  # what the next run said it kept / resumed from (its own log line, condensed)
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

THREADS = 1
"""torch's intra-op thread count of every run whose output is compared bit for bit: the processes
started with :func:`child_env` and the references made in this process (:func:`call_cli`,
:func:`pinned_threads`). CPU kernels split their sums by thread count, so two counts can round
differently: at 1 and 2 threads one AMD CPU's VAE decoder (its first convolution, 4.8e-7) moved one
pixel of one sample by one level, which a bit-for-bit check reads as a resume bug. The batch size
is the other half of "the same float ops": compared runs use one batch size too."""


@contextlib.contextmanager
def pinned_threads(threads: int = THREADS) -> Iterator[int]:
    """torch's intra-op threads in this process set to ``threads`` for the block, the caller's count
    restored after; yields the count torch reports inside (what the block's work runs at)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def child_env(threads: int = THREADS) -> dict[str, str]:
    """Environment for the processes under test: ``threads`` torch threads (OpenMP and MKL; the
    count the in-process references are pinned to, so CPU numerics match them bit for bit),
    sleeping OpenMP threads, and the checkout importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    extra = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *extra])
    return env


def env_threads(env: dict[str, str]) -> int | None:
    """The torch thread count a process started with ``env`` runs at (None: torch's default, which
    depends on the machine's cores)."""
    value = env.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else None


def threads_note(out: Path) -> Path:
    """Where the thread count a reference output ``out`` was made at is noted: beside it, so
    nothing inside the output changes."""
    return out.with_name(out.name + ".threads")


def note_threads(out: Path, threads: int | None) -> None:
    threads_note(out).write_text(f"{threads}\n")


def noted_threads(out: Path) -> int | None:
    """The thread count noted for ``out`` by :func:`note_threads` (None: not noted)."""
    note = threads_note(out)
    text = note.read_text().strip() if note.is_file() else ""
    return int(text) if text.isdigit() else None


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
    threads: int | None = None  # torch's intra-op thread count the call ran at


def root_script(name: str) -> Any:
    """Import a root-level CLI script (e.g. encode_latents.py) as a module, to call its main()."""
    spec = importlib.util.spec_from_file_location(f"_cli_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_cli(main: Callable[..., Any], argv: list[str], threads: int = THREADS) -> CliResult:
    """Run a CLI's main(argv) in this process (no interpreter start-up: the suite stays fast) at
    ``threads`` torch threads (the count of :func:`child_env`'s processes, whatever the caller's),
    capturing everything it prints and turning exits and escaped exceptions into a CliResult."""
    buf = io.StringIO()
    uncaught = None
    with (pinned_threads(threads) as ran_at, contextlib.redirect_stdout(buf),
          contextlib.redirect_stderr(buf)):
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
    return CliResult(rc, buf.getvalue(), uncaught, ran_at)


class Proc:
    """A CLI in its own session, its output read line by line on a thread (so the harness can
    wait for the job's first work line); :meth:`kill` takes down its whole process tree."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT):
        self.t0, self.wall0 = time.monotonic(), time.time()
        env = env or child_env()
        self.threads = env_threads(env)  # the torch thread count it runs at
        self.p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
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

    def wait_until(self, pred: Callable[[], bool], timeout: float, poll: float = 0.005) -> bool:
        """Poll ``pred`` until true (True) or the process ends / time runs out (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            if not self.running():
                return pred()
            time.sleep(poll)
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
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)  # the job's own process first: scanning /proc takes a while
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

