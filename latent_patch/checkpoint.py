"""Training checkpoints: atomic save, find the latest complete one, load for resume or inference,
and the state of a run that makes a resumed run continue exactly (counters, RNGs, data position).

Layout of a run folder ``RUN/``::

    RUN/checkpoints/step-000001000/
        model.safetensors   the raw network weights (fp32)
        ema.safetensors     the EMA weights, what the sampler uses
        state.pt            optimizer, scaler, progress counters, schedule RNGs and rank 0's
                            RNG + loader state (torch.load(weights_only=True) readable)
        rank-00001.pt ...   RNG + loader state of every other rank (multi-process runs)
        config.yaml         the resolved TrainConfig
        manifest.json       copy of the shards' manifest (VAE id, class names) for the sampler
        projector.safetensors  REPA's projector (repa.weight > 0): training state only
        DONE                JSON {"files": {file name: size in bytes}, "seq": write number},
                            written last

A checkpoint is written into ``checkpoints/.tmp-step-.../``, DONE is written after every other
file is flushed, and only then is the folder renamed to ``step-...``. A crash at any instant thus
leaves either no ``step-...`` folder or a complete one; DONE's sizes additionally catch a
checkpoint damaged later (truncated copy, full disk on a sync) with an error naming the file.

"Latest" means the run's newest write, not the highest step: after ``--resume PATH`` from step
1000 while an abandoned 5000 exists, the run's 1500 and 2000 are newer than 5000, and ``--resume
auto``, ``sample.py RUN`` and ``keep_last`` pruning go by that. DONE's ``seq`` (one more than
the highest among the complete checkpoints when it was finished) records the order; it survives
copies, which mtimes do not. Markers without one (older code) order by step, below every numbered
one. Never by size.

Loading maps the files instead of reading them into each process's memory (``copy_weights``,
``load_state``): the ranks of a node share one copy of the pages through the page cache, and
every tensor goes straight into its module or optimizer, on the training device.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import pickle  # only for its exception class: nothing here unpickles (torch.load weights_only=True)
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import config as config_mod
from . import fsutil
from .config import TrainConfig
from .models import build_model, check_same_model
from .seeds import derive_seed, global_rng_state, set_global_rng_state

log = logging.getLogger("latent_patch.train")

CKPT_DIR = "checkpoints"
DONE = "DONE"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
PROJECTOR_FILE = "projector.safetensors"  # REPA's projector (align.py): training state, never sampled or exported
_NAME_RE = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged, or does not fit the current config."""


# --------------------------------------------------------------------------- names and discovery

def ckpt_name(step: int) -> str:
    """Folder name of the checkpoint after optimizer step ``step`` (zero padded so names sort)."""
    return f"step-{step:09d}"


def rank_file(rank: int) -> str:
    """File holding the RNG/loader state of a rank other than 0."""
    return f"rank-{rank:05d}.pt"


def is_complete(path: str | Path) -> bool:
    """A checkpoint folder counts only when its DONE marker exists (written last)."""
    return (Path(path) / DONE).is_file()


def list_complete(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), ascending by step number."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def write_seq(ckpt: Path) -> int | None:
    """The write sequence number in a checkpoint's DONE marker; None for a marker without one
    (written by code before sequence numbers) or one that cannot be read (``verify`` names it)."""
    try:
        seq = fsutil.read_json(Path(ckpt) / DONE).get("seq")
    except (OSError, ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def by_recency(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest write first (DONE's ``seq``; markers without
    one by step, before every numbered one)."""
    keyed = []
    for step, p in list_complete(run_dir):
        seq = write_seq(p)
        keyed.append(((0, step) if seq is None else (1, seq, step), step, p))
    return [(step, p) for _, step, p in sorted(keyed)]


def find_latest(run_dir: str | Path) -> Path | None:
    """The run's most recently written complete checkpoint (see ``by_recency``), or None;
    half-written ones are ignored."""
    done = by_recency(run_dir)
    return done[-1][1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from either a checkpoint folder or a run folder (-> its latest complete one)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if (p / DONE).exists() or (p / STATE_FILE).exists() or (p / MODEL_FILE).exists():
        if not is_complete(p):
            raise CheckpointError(f"{p}: checkpoint is incomplete (no {DONE} marker); it was never finished")
        return p
    latest = find_latest(p)
    if latest is None:
        raise CheckpointError(f"{p}: holds no complete checkpoint under {CKPT_DIR}/")
    return latest


def resolve_resume(spec: str | None, run_dir: str | Path) -> Path | None:
    """Map ``--resume`` to a checkpoint: 'auto' -> latest complete in run_dir (or None), a path -> that one."""
    if spec is None or spec in ("", "none", "no"):
        return None
    if spec == "auto":
        return find_latest(run_dir)
    return resolve_checkpoint(spec)


# --------------------------------------------------------------------------- writing

def begin(run_dir: str | Path, step: int) -> Path:
    """Create (fresh) the temporary folder a checkpoint is written into; rank 0 only."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{ckpt_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of a crash while writing this very step
    tmp.mkdir()
    return tmp


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Weights as safetensors: CPU copies, so shared or non-contiguous tensors are stored plainly."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Training state via torch.save; must hold only tensors and plain Python values (weights_only)."""
    torch.save(state, path)


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


def finish(tmp: Path, keep_last: int = 0) -> Path:
    """Flush every file, write DONE (file sizes, write number) last, rename the folder into place,
    prune old ones.

    Returns the final folder. An existing folder of the same step (a run resumed from an earlier
    checkpoint re-reaching it) is replaced only after the new one is complete. The write number is
    one more than the highest of the run's complete checkpoints (rank 0 is the only writer).
    """
    sizes = {}
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        sizes[f.name] = f.stat().st_size
    seqs = [write_seq(p) for _, p in list_complete(tmp.parent.parent)]
    seq = 1 + max((s for s in seqs if s is not None), default=0)
    fsutil.atomic_write_json(tmp / DONE, {"files": sizes, "seq": seq})
    final = tmp.with_name(tmp.name[len(".tmp-"):])
    if final.exists():
        trash = final.with_name(f".old-{final.name}")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    fsutil.fsync_dir(final.parent)
    if keep_last > 0:
        prune(final.parent.parent, keep_last, keep=final)
    return final


def prune(run_dir: str | Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the ``keep_last`` most recently WRITTEN complete checkpoints (``by_recency``:
    DONE's write number, not its mtime, which a copy resets), never ``keep`` (the one just
    written); returns what was removed.

    Why recency, not step: after ``--resume PATH`` from an earlier step, the run's new checkpoints
    have lower steps than the abandoned ones; keeping the highest steps deleted each new one as
    soon as it was written.
    """
    done = by_recency(run_dir)
    removed = [p for _, p in done[:-keep_last] if p != keep] if keep_last > 0 else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def recover(run_dir: str | Path) -> list[str]:
    """Complete a same-step replacement that a kill interrupted; call before looking for the latest.

    ``finish`` replaces an existing ``step-X`` in two renames (old -> ``.old-step-X``, new ->
    ``step-X``); POSIX cannot swap folders atomically. A kill between them leaves no ``step-X``:
    the new copy is published if its DONE shows it complete, else the old one is put back.
    A lone ``.tmp-step-X`` (a writer killed before publishing) is NOT promoted: it stays
    invisible, as any unpublished checkpoint, and ``remove_stale`` deletes it.
    """
    root = Path(run_dir) / CKPT_DIR
    done = []
    for old in sorted(root.glob(".old-step-*")) if root.is_dir() else []:
        final = root / old.name[len(".old-"):]
        if final.exists() or not _NAME_RE.match(final.name):
            continue
        new = root / f".tmp-{final.name}"
        try:
            verify(new)
            os.replace(new, final)
            done.append(f"published {final.name}, whose replacement a kill interrupted")
        except CheckpointError:
            if is_complete(old):
                os.replace(old, final)
                done.append(f"restored {final.name}, whose replacement a kill interrupted")
    if done:
        fsutil.fsync_dir(root)
    return done


def remove_stale(run_dir: str | Path) -> list[Path]:
    """Remove leftovers of killed writers (``.tmp-step-*``, ``.old-step-*``); call before training starts."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((".tmp-step-", ".old-step-"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# --------------------------------------------------------------------------- reading

def verify(ckpt: Path) -> dict[str, int]:
    """Check every file DONE lists exists with its recorded size; raise CheckpointError naming the first bad one."""
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt}: checkpoint is incomplete (no {DONE} marker)")
    try:
        sizes = fsutil.read_json(ckpt / DONE)["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{ckpt / DONE}: damaged marker ({err})") from err
    for name, size in sizes.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint (listed in {DONE})")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{f}: truncated or damaged ({f.stat().st_size} bytes, {DONE} says {size}); "
                "resume from an earlier checkpoint with --resume PATH"
            )
    return sizes


def load_weights(ckpt: Path, name: str = MODEL_FILE) -> dict[str, torch.Tensor]:
    """Read a safetensors file of the checkpoint, naming the file when it cannot be read.

    For a module, ``copy_weights`` loads without holding the weights a second time."""
    path = ckpt / name
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({err})") from err


def copy_weights(module: torch.nn.Module, ckpt: Path, name: str = MODEL_FILE) -> None:
    """Load a safetensors file of the checkpoint into ``module`` (strict, as ``load_into``), one
    tensor at a time from the memory-mapped file straight into the parameter on its device.

    Why not ``load_into(module, load_weights(...))``: that holds every tensor of the file at once
    before copying; here the only host memory is the file's pages in the page cache, which every
    process of a node loading the same checkpoint shares.
    """
    path = ckpt / name
    own = module.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            check_fits(own, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, path)
            with torch.no_grad():
                for key, dst in own.items():
                    dst.copy_(f.get_tensor(key))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({err})") from err


def load_state(path: Path) -> dict[str, Any]:
    """Read a state.pt / rank file with weights_only=True (no arbitrary code), naming the file on failure.

    The file is memory-mapped (``mmap=True``, private: writes to a tensor never reach the file), so
    its tensors are views of the page cache, shared by the processes of a node, not copies in each
    process. A tensor loaded into a CPU optimizer stays such a view until the first step writes it;
    ``Optimizer.load_state_dict`` copies each one to a GPU parameter's device.
    """
    # someone made mappings shared (torch.serialization.set_default_mmap_options): read, never map
    mapped = torch.serialization.get_default_mmap_options() == mmap.MAP_PRIVATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except pickle.UnpicklingError as err:  # only raised here, never executed: weights_only refuses objects
        raise CheckpointError(
            f"{path}: cannot read training state (it holds objects other than tensors and plain values, "
            "refused unexecuted by weights_only loading; the file is not one this code wrote)"
        ) from err
    except Exception as err:  # torch raises RuntimeError/EOFError for damaged files
        reason = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{path}: cannot read training state ({type(err).__name__}: {reason})") from err


def read_manifest(ckpt: Path) -> dict | None:
    """The shards' manifest stored with the checkpoint, or None when the run had none."""
    p = ckpt / MANIFEST_FILE
    return fsutil.read_json(p) if p.is_file() else None


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load that turns key/shape mismatches into an error saying the model config differs."""
    check_fits(module.state_dict(), {k: tuple(v.shape) for k, v in tensors.items()}, source)
    module.load_state_dict(tensors, strict=True)


def check_fits(own: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], source: Path) -> None:
    """Refuse weights (``shapes``: name -> shape in the file) whose names or shapes differ from a
    module's state dict ``own``, naming what differs: a checkpoint of another model config."""
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    bad_shape = [k for k in own if k in shapes and tuple(own[k].shape) != tuple(shapes[k])]
    if missing or unexpected or bad_shape:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if bad_shape:
            k = bad_shape[0]
            detail.append(f"shape of {k}: file {tuple(shapes[k])} vs model {tuple(own[k].shape)}")
        raise CheckpointError(
            f"{source}: weights do not fit this model (a checkpoint of another model config?): "
            + "; ".join(detail)
        )


def load_config(ckpt: Path) -> TrainConfig:
    """The TrainConfig saved with a checkpoint, keys renamed since it was written migrated."""
    try:
        return config_mod.load_saved(TrainConfig, ckpt / CONFIG_FILE)
    except config_mod.ConfigError as err:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {err}") from err


def load_inference_model(
    path_or_run: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, TrainConfig, dict | None]:
    """(network in eval mode, TrainConfig, manifest or None) from a run folder or a checkpoint folder.

    The network is the bare denoiser ``net(x, c_noise, labels)``; wrap it with
    ``edm.Precond(net, cfg.edm.sigma_data)`` to sample. The model is rebuilt from the config stored
    in the checkpoint, so the caller needs no training config of its own.
    """
    ckpt = resolve_checkpoint(path_or_run)
    verify(ckpt)
    cfg = load_config(ckpt)
    net = build_model(cfg.model)
    net.to(device)
    copy_weights(net, ckpt, EMA_FILE if use_ema else MODEL_FILE)
    net.eval().requires_grad_(False)
    return net, cfg, read_manifest(ckpt)


def describe(ckpt: Path) -> str:
    """One line for logs: folder and step."""
    m = _NAME_RE.match(ckpt.name)
    return f"{ckpt} (step {int(m.group(1)) if m else '?'})"


# --------------------------------------------------------------------------- the state of a run

@dataclass
class Progress:
    """Where a run is: optimizer steps, patches seen (all ranks), full-image equivalents."""

    step: int = 0
    patches: int = 0
    full_equiv: float = 0.0
    flops: float = 0.0  # training FLOPs (3 x forward FLOPs of every patch at its side and route)


class RunState(Protocol):
    """What a checkpoint saves and restores of a run (``train.Trainer`` is one)."""

    cfg: TrainConfig
    accelerator: Any
    net: torch.nn.Module
    ema: torch.nn.Module | None  # None on a rank that never reads the EMA: it neither loads nor updates one
    optimizer: torch.optim.Optimizer
    loader: Any  # state_dict()/load_state_dict() of its position; None for synthetic data
    schedule_gen: torch.Generator
    gen: torch.Generator
    manifest: dict | None
    progress: Progress
    rank: int
    world_size: int


def rng_state(run: RunState) -> dict[str, Any]:
    """This rank's random streams and loader position (everything a resumed step depends on)."""
    state: dict[str, Any] = {**global_rng_state(), "step_gen": run.gen.get_state()}
    if run.loader is not None and hasattr(run.loader, "state_dict"):
        state["loader"] = run.loader.state_dict()
    return state


def set_rng_state(run: RunState, state: dict[str, Any]) -> None:
    set_global_rng_state(state)
    run.gen.set_state(state["step_gen"])
    if "loader" in state and run.loader is not None and hasattr(run.loader, "load_state_dict"):
        run.loader.load_state_dict(state["loader"])


def save_run(run: RunState) -> Path:
    """Write ``step-...`` atomically: rank 0 writes weights/state, every other rank its RNG file.

    Call it on every rank (it has barriers), after checking the weights are finite."""
    acc, run_dir, step = run.accelerator, Path(run.cfg.run.out_dir), run.progress.step
    tmp = run_dir / CKPT_DIR / f".tmp-{ckpt_name(step)}"
    if acc.is_main_process:
        begin(run_dir, step)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        save_state(tmp / rank_file(run.rank), rng_state(run))
    acc.wait_for_everyone()
    final = tmp.with_name(ckpt_name(step))
    if acc.is_main_process:
        meta = {"step": str(step), "patches": str(run.progress.patches),
                "model": json.dumps(config_mod.to_dict(run.cfg.model), sort_keys=True, separators=(",", ":"))}
        save_weights(tmp / MODEL_FILE, run.net.state_dict(), meta)
        save_weights(tmp / EMA_FILE, run.ema.state_dict(), meta)
        if getattr(run, "projector", None) is not None:
            save_weights(tmp / PROJECTOR_FILE, run.projector.state_dict(), meta)
        save_state(tmp / STATE_FILE, {
            "step": step, "patches": run.progress.patches, "full_equiv": run.progress.full_equiv,
            "flops": run.progress.flops,
            "world_size": run.world_size, "optimizer": run.optimizer.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "schedule_gens": [run.schedule_gen.get_state()],  # a list: older runs had one per rank
            "rank_state": rng_state(run),
        })
        write_text(tmp / CONFIG_FILE, yaml.safe_dump(config_mod.to_dict(run.cfg), sort_keys=False))
        if run.manifest is not None:
            write_text(tmp / MANIFEST_FILE, json.dumps(run.manifest, indent=1, sort_keys=True))
        final = finish(tmp, run.cfg.run.keep_last)
    acc.wait_for_everyone()
    return final


def resume(run: RunState, ckpt: Path) -> None:
    """Restore weights, EMA, optimizer, scaler, counters and every RNG / loader position from ``ckpt``.

    What each rank needs, and no process holds a second copy: every rank takes the weights and the
    whole AdamW state (DDP keeps it on each rank), the EMA only where ``run.ema`` exists; the files
    are mapped (see ``copy_weights``, ``load_state``), so a node reads each page once, and every
    tensor is copied straight to the training device. A state saved before FLOP counting leaves
    ``run.progress.flops`` NaN (unknown): ``budget.settle_flops`` counts it or refuses the run.
    """
    verify(ckpt)
    try:
        check_same_model(load_config(ckpt).model, run.cfg.model)
    except ValueError as err:
        raise CheckpointError(f"{ckpt}: {err}") from err
    state = load_state(ckpt / STATE_FILE)
    copy_weights(run.net, ckpt, MODEL_FILE)
    if run.ema is not None:
        copy_weights(run.ema, ckpt, EMA_FILE)
    if (proj := getattr(run, "projector", None)) is not None or (ckpt / PROJECTOR_FILE).is_file():
        if proj is None or not (ckpt / PROJECTOR_FILE).is_file():  # the optimizer state holds its moments or not
            raise CheckpointError(f"{ckpt}: trained {'with' if proj is None else 'without'} representation alignment: "
                                  f"resume it with repa.weight {'> 0' if proj is None else '0'}")
        copy_weights(proj, ckpt, PROJECTOR_FILE)
    run.optimizer.load_state_dict(state["optimizer"])  # per tensor to its parameter's device
    if run.accelerator.scaler is not None and state.get("scaler"):
        run.accelerator.scaler.load_state_dict(state["scaler"])
    patches = state["patches"] if "patches" in state else state["images"]  # "images": before issue 10
    run.progress = Progress(step=int(state["step"]), patches=int(patches), full_equiv=float(state["full_equiv"]),
                            flops=float(state.get("flops", "nan")))  # NaN: saved before FLOP counting
    run.schedule_gen.set_state(state["schedule_gens"][0])  # shared by all ranks: any process count continues it
    if run.loader is not None and hasattr(run.loader, "seek"):
        run.loader.seek(run.progress.patches)  # where the run's sample count puts the data; a saved position refines it
    if int(state["world_size"]) != run.world_size:
        log.warning("checkpoint was written by %d processes, this run has %d: progress, weights, the patch "
                    "schedule and the data position resume, but per-rank random streams restart (seeded from the "
                    "step), so the continuation is not bit-identical", state["world_size"], run.world_size)
        reseed(run)
        loader_state = state["rank_state"].get("loader")  # rank 0's: a loader position is the same on every rank
        if loader_state is not None and run.loader is not None and hasattr(run.loader, "load_state_dict"):
            run.loader.load_state_dict(loader_state)
        return
    own = state["rank_state"] if run.rank == 0 else load_state(ckpt / rank_file(run.rank))
    set_rng_state(run, own)


def reseed(run: RunState) -> None:
    """Fresh, step-dependent streams for a resume with another process count (exactness impossible)."""
    s, step = run.cfg.run.seed, run.progress.step
    run.gen.manual_seed(derive_seed(s, run.rank, f"step@{step}"))
    torch.manual_seed(derive_seed(s, run.rank, f"torch@{step}"))
