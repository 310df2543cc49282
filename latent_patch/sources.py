"""Image sources: what the inputs are, listed once. This module exists so that the question "which
inputs does this source hold, in what order, with what labels and where do their bytes live" is
answered in one place, apart from turning bytes into pixels (:mod:`latent_patch.images`): a source
is listed once, deterministically (sorted, hidden files ignored), into a :class:`Listing`: one
entry per input with a stable index, a source id, a label and where its bytes live. The index is
what makes the encoding reproducible and splittable: shard ``j`` is a fixed block of indices
whatever the number of processes. The encoder lists once per output folder and shares the result
(:meth:`Listing.to_record`, :func:`source_identity`; see ``encode.shared_listing``).

Source kinds (auto-detected by :func:`list_source`):
  - ``class_tree``: ``root/<class>/<file>``; label = index of the class folder in the sorted list
    (the ImageNet train layout is this with wnid folders).
  - ``flat``: ``root/<file>`` plus a label file (ImageNet ``LOC_val_solution.csv`` or
    ``filename label`` lines).
  - ``tars``: webdataset tar shards (local paths, ``{000..009}`` brace patterns, globs, or a folder
    of tars), one input per sample, label from its ``.cls`` member.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import tarfile
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .fsutil import atomic_write_json, commit
from .images import BadImage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif", "jpe")
_TAR_LABEL_EXTS = ("cls", "class", "label")
_CLASS_NAME_FILES = ("classes.txt", "class_names.txt", "class_names.json", "class_names")
_CSV_HEADERS = {"imageid", "image_id", "filename", "file", "image", "path", "id", "name"}


@dataclass
class Listing:
    """Every input of a source in its deterministic order (index = position in the lists).

    ``locations`` is only set for tar sources: ``(tar path, byte offset, size)`` of the image
    member (``None`` when the sample has no image); folder inputs live at ``base/source``.
    ``problems`` holds inputs known bad at listing time (index -> reason) and ``warnings`` the
    listing-level notes (empty class folders, label file entries without a file).
    """

    kind: str
    path: str
    base: str
    sources: list[str]
    labels: list[int]
    class_names: list[str]
    locations: list[tuple[str, int, int] | None] | None = None
    problems: dict[int, str] = field(default_factory=dict)
    warnings: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)

    def read_bytes(self, i: int) -> bytes:
        """Raw bytes of input ``i`` (raises :class:`BadImage` when known bad or unreadable)."""
        if i in self.problems:
            raise BadImage(self.problems[i])
        try:
            if self.locations is None:
                return Path(self.base, self.sources[i]).read_bytes()
            loc = self.locations[i]
            assert loc is not None  # inputs without an image member are in problems
            with open(loc[0], "rb") as f:
                f.seek(loc[1])
                return f.read(loc[2])
        except OSError as err:
            raise BadImage(f"cannot read: {err.strerror or err}") from None

    def sha256(self) -> str:
        """Fingerprint of (label, source id) for every input: detects a changed source on resume."""
        h = hashlib.sha256()
        for label, src in zip(self.labels, self.sources):
            h.update(f"{label}\t{src}\n".encode())
        return h.hexdigest()

    def to_record(self, root: str | Path) -> dict:
        """The listing as plain JSON data (no pickle), to be read back by :meth:`from_record`.

        Tar locations are ``[tar number, offset, size]`` into ``tars`` (one path per tar, not per
        input); a tar inside ``root`` (an unpacked copy in the output folder) is stored relative
        to it, so the folder can move. ``tar_sizes`` lets a reader check the copies are still whole.
        """
        root = os.path.abspath(root)
        tars: list[str] = []
        number: dict[str, int] = {}
        locs: list[list[int] | None] | None = None
        if self.locations is not None:
            locs = []
            for loc in self.locations:
                if loc is None:
                    locs.append(None)
                    continue
                if loc[0] not in number:
                    number[loc[0]] = len(tars)
                    tars.append(loc[0])
                locs.append([number[loc[0]], loc[1], loc[2]])
        inside = [os.path.commonpath([root, os.path.abspath(t)]) == root for t in tars]
        return {"kind": self.kind, "path": self.path, "base": self.base, "sources": self.sources,
                "labels": self.labels, "class_names": self.class_names,
                "tars": [os.path.relpath(t, root) if i else t for t, i in zip(tars, inside)],
                "tar_sizes": [os.path.getsize(t) for t in tars], "locations": locs,
                "problems": [[i, r] for i, r in sorted(self.problems.items())],
                "warnings": self.warnings}

    @classmethod
    def from_record(cls, rec: dict, root: str | Path) -> "Listing":
        """Inverse of :meth:`to_record`; relative tar paths are taken from ``root``."""
        tars = [os.path.join(os.path.abspath(root), t) for t in rec["tars"]]
        locs = rec["locations"]
        return cls(rec["kind"], rec["path"], rec["base"], rec["sources"], rec["labels"],
                   rec["class_names"],
                   locations=None if locs is None else [
                       None if x is None else (tars[x[0]], x[1], x[2]) for x in locs],
                   problems={int(i): r for i, r in rec["problems"]}, warnings=rec["warnings"])


# ----------------------------------------------------------------------------- listing


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _looks_like_tars(spec: str) -> bool:
    return "{" in spec or any(c in spec for c in "*?[") or spec.endswith(TAR_SUFFIXES)


def tar_folder(folder: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """The tar shards of ``folder`` (sorted, absolute) and a skipped-note for every other entry.

    Why notes: a data folder often holds a README, checksums or a class list beside its shards;
    they are not inputs, and the manifest says so instead of refusing the folder."""
    root = Path(folder)
    tars, notes = [], []
    for name in _visible(os.listdir(root)):
        if name.endswith(TAR_SUFFIXES) and (root / name).is_file():
            tars.append(os.path.abspath(root / name))
        elif name in _CLASS_NAME_FILES:
            notes.append({"source": name, "reason": "class names: read for the manifest's class_names, not an input"})
        else:
            notes.append({"source": name + ("/" if (root / name).is_dir() else ""),
                          "reason": "not a tar shard (.tar, .tar.gz, .tgz): skipped"})
    return tars, notes


def _source_kind(spec: str, labels: str | Path | None) -> tuple[str, str]:
    """(kind, what its lister reads) for ``spec``; raises for a missing or unusable source."""
    if _looks_like_tars(spec) and not os.path.isdir(spec):
        if labels is not None:
            raise ValueError(f"--labels {labels}: only for a flat folder; tar samples carry .cls")
        return "tars", spec
    root = Path(spec)
    if not root.exists():
        raise FileNotFoundError(f"--source {spec}: no such file or folder")
    if not root.is_dir():
        raise ValueError(f"--source {spec}: not a folder and not a .tar / brace pattern")
    entries = _visible(os.listdir(root))
    if labels is not None:
        return "flat", spec
    if any(e.endswith(TAR_SUFFIXES) and (root / e).is_file() for e in entries):
        return "tars", spec  # a folder of shards: a README or a checksums folder beside them is fine
    if any((root / e).is_dir() for e in entries):
        return "class_tree", spec
    raise ValueError(
        f"--source {spec}: a folder of files without class subfolders or tar shards needs --labels FILE "
        "(e.g. LOC_val_solution.csv or 'filename label' lines)"
    )


def list_source(spec: str | Path, labels: str | Path | None = None,
                unpack_dir: str | Path | None = None) -> Listing:
    """List a source, detecting its kind: tars, class tree, or flat folder + ``labels`` file.

    ``unpack_dir``: where compressed tars are unpacked, once (see :func:`list_tars`)."""
    kind, target = _source_kind(str(spec), labels)
    if kind == "tars":
        return list_tars(target, unpack_dir)
    if kind == "flat":
        return list_flat(target, labels)
    return list_class_tree(target)


def _stamp(path: str | Path) -> list:
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def source_identity(spec: str | Path, labels: str | Path | None = None) -> dict:
    """What a saved listing of ``spec`` must match to be reused, at about one stat per class
    folder or tar instead of one per image: the source and label file (real paths), the kind, and
    a ``stamp`` of what the lister reads (size and mtime of the root and class folders, of every
    tar, of the label file). Adding, removing or renaming a file changes its folder's mtime.
    Raises what :func:`list_source` raises for a missing or unusable source."""
    spec = str(spec)
    kind, target = _source_kind(spec, labels)
    if kind == "tars":
        stamp = [_stamp(p) for p in (tar_folder(target)[0] if os.path.isdir(target) else expand_tar_spec(target))]
        stamp += [_stamp(target)] if os.path.isdir(target) else []
    else:
        root = Path(target)
        stamp = [_stamp(root)]
        if kind == "class_tree":
            stamp += [_stamp(root / e) for e in _visible(os.listdir(root)) if (root / e).is_dir()]
    if labels is not None:
        if not Path(labels).is_file():
            raise FileNotFoundError(f"--labels {labels}: no such file")
        stamp.append(_stamp(labels))
    return {"source": os.path.realpath(spec),
            "labels": None if labels is None else os.path.realpath(labels),
            "kind": kind, "stamp": stamp}


def _regular_files(folder: Path, prefix: str, notes: list[dict[str, str]]) -> list[str]:
    """Visible regular files of ``folder``; every other visible entry is noted, never dropped silently.

    A FIFO is never opened (it could block the job), a dangling symlink cannot be read, and a
    sub-folder is not searched: each goes into the manifest's ``skipped`` with its reason.
    """
    files = []
    for f in _visible(os.listdir(folder)):
        p = folder / f
        if p.is_file():
            files.append(f)
        elif p.is_symlink() and not p.exists():
            notes.append({"source": f"{prefix}{f}", "reason": "dangling symlink (target missing)"})
        elif p.is_dir():
            notes.append({"source": f"{prefix}{f}/", "reason": "a folder inside an image folder (not searched)"})
        else:
            notes.append({"source": f"{prefix}{f}", "reason": "not a regular file (FIFO, socket or device)"})
    return files


def list_class_tree(root: str | Path) -> Listing:
    """``root/<class>/<file>``: label = index of the class folder among the sorted folders.

    An empty class folder still takes its index (so labels stay the standard ones) and is noted.
    """
    root = Path(root)
    classes = [e for e in _visible(os.listdir(root)) if (root / e).is_dir()]
    if not classes:
        raise ValueError(f"{root}: no class folders found")
    sources: list[str] = []
    labels: list[int] = []
    notes: list[dict[str, str]] = []
    for label, name in enumerate(classes):
        files = _regular_files(root / name, f"{name}/", notes)
        if not files:
            notes.append({"source": f"{name}/",
                          "reason": "empty class folder (class kept, no images)"})
        sources += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
    return Listing("class_tree", str(root.resolve()), str(root.resolve()), sources, labels, classes,
                   warnings=notes)


def read_label_file(path: str | Path) -> dict[str, str]:
    """File name or stem -> label text, from a CSV (ImageNet val solution) or `name label` lines."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--labels {p}: no such file")
    text = p.read_text()
    first = text.split("\n", 1)[0]
    out: dict[str, str] = {}
    if p.suffix.lower() == ".csv" or "," in first:
        rows = list(csv.reader(io.StringIO(text)))
        if rows and rows[0] and rows[0][0].strip().lower() in _CSV_HEADERS:
            rows = rows[1:]
        for n, row in enumerate(rows, 1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"{p}: row {n} has no label: {row!r}")
            out[row[0].strip()] = row[1].split()[0]  # val solution: first wnid of the box list
    else:
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or line.lstrip().startswith("#"):
                continue
            if len(parts) < 2:
                raise ValueError(f"{p}: line {n} is not 'filename label': {line!r}")
            out[parts[0]] = parts[1]
    if not out:
        raise ValueError(f"{p}: no labels found")
    return out


def _label_indices(raw: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """Integer labels are used as they are; names map to their index among the sorted names."""
    values = set(raw.values())
    if all(v.isdigit() for v in values):
        top = max(int(v) for v in values)
        return {k: int(v) for k, v in raw.items()}, [str(i) for i in range(top + 1)]
    names = sorted(values)
    index = {n: i for i, n in enumerate(names)}
    return {k: index[v] for k, v in raw.items()}, names


def list_flat(root: str | Path, labels_file: str | Path) -> Listing:
    """A flat folder of images labelled by a file keyed by file name or by stem (ImageId)."""
    root = Path(root)
    by_key, names = _label_indices(read_label_file(labels_file))
    notes: list[dict[str, str]] = []
    files = _regular_files(root, "", notes)
    labels: list[int] = []
    problems: dict[int, str] = {}
    used: set[str] = set()
    for i, f in enumerate(files):
        key = f if f in by_key else Path(f).stem
        if key in by_key:
            labels.append(by_key[key])
            used.add(key)
        else:
            labels.append(-1)
            problems[i] = f"no label in {Path(labels_file).name}"
    if len(problems) == len(files):
        raise ValueError(f"{root}: no file matches an entry of --labels {labels_file}")
    notes += [{"source": k, "reason": f"in {Path(labels_file).name} but no such file"}
              for k in sorted(set(by_key) - used)]
    return Listing("flat", str(root.resolve()), str(root.resolve()), files, labels, names,
                   problems=problems, warnings=notes)


def expand_tar_spec(spec: str) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``) and globs to a sorted list of existing tar paths."""
    import braceexpand  # a webdataset dependency

    paths: list[str] = []
    for part in braceexpand.braceexpand(spec):
        if any(c in part for c in "*?["):
            found = sorted(glob.glob(part))
            if not found:
                raise FileNotFoundError(f"--source {spec}: pattern {part} matches no file")
            paths += found
        elif not os.path.isfile(part):
            raise FileNotFoundError(f"--source {spec}: tar shard {part} not found")
        else:
            paths.append(part)
    return [os.path.abspath(p) for p in paths]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything up to the first dot of the base name."""
    d, b = os.path.split(name)
    stem, _, ext = b.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _tar_samples(path: str, shown: str | None = None) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Group the members of one tar into (key, {ext: member}) in file order (errors name ``shown``)."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    try:
        with tarfile.open(path) as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{shown or path}: not a readable tar file ({err})") from None
    for m in members:
        key, ext = _split_key(m.name)
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = m
    return samples


def _read_member(path: str, m: tarfile.TarInfo) -> bytes:
    with open(path, "rb") as f:
        f.seek(m.offset_data)
        return f.read(m.size)


def _tar_class_names(first_tar: str, top: int) -> list[str]:
    """Names from a classes.txt / class_names(.json) beside the tars, else str(index)."""
    here = Path(first_tar).parent
    for fname in _CLASS_NAME_FILES:
        p = here / fname
        if p.is_file():
            text = p.read_text()
            names = json.loads(text) if fname.endswith(".json") else [
                ln.strip() for ln in text.splitlines() if ln.strip()]
            if len(names) <= top:
                raise ValueError(f"{p}: {len(names)} class names but labels go up to {top}")
            return [str(n) for n in names]
    return [str(i) for i in range(top + 1)]


_COMPRESSIONS = ((b"\x1f\x8b", gzip), (b"BZh", bz2), (b"\xfd7zXZ\x00", lzma))  # magic, module
_UNPACKED: dict[str, str] = {}


def _decompressor(path: str):
    """gzip.open / bz2.open / lzma.open for a compressed file (by its magic bytes), else None."""
    with open(path, "rb") as f:
        magic = f.read(6)
    return next((mod.open for m, mod in _COMPRESSIONS if magic.startswith(m)), None)


def unpack_tar(path: str, dest: str | Path) -> Path:
    """Decompress the compressed tar ``path`` to ``dest`` (a seekable tar), unless done already.

    Inputs are read later by byte offset, which only an uncompressed tar allows. The copy is
    written under a temporary name and renamed, then ``dest.done`` records the source's size and
    mtime: a copy with a matching marker is kept (a re-run does not unpack again), anything else
    (a killed unpack, a changed source) is unpacked again.
    """
    dest = Path(dest)
    marker = dest.with_name(dest.name + ".done")
    st = os.stat(path)
    want = {"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in want} == want and dest.stat().st_size == done["unpacked_size"]:
            return dest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    marker.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with _decompressor(path)(path, "rb") as src, open(tmp, "wb") as dst:
            while True:
                try:
                    block = src.read(1 << 24)
                except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
                    raise ValueError(f"{path}: not a readable compressed tar file ({err})") from None
                if not block:
                    break
                dst.write(block)
        commit(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(marker, {**want, "unpacked_size": dest.stat().st_size})
    return dest


def _seekable_tar(path: str, unpack_dir: str | Path | None = None, number: int = 0) -> str:
    """``path`` itself for a plain tar; for a compressed one (.tar.gz, .tgz, ...) its unpacked copy
    ``unpack_dir/{number:05d}-NAME.tar`` (see :func:`unpack_tar`), or without ``unpack_dir`` a copy
    made once per process in the system temp folder, removed at exit."""
    if _decompressor(path) is None:
        return path
    if unpack_dir is not None:
        name = re.sub(r"\.(tar\.)?(gz|bz2|xz)$|\.(tgz|tbz2?|txz|tar)$", "", os.path.basename(path))
        return str(unpack_tar(path, Path(unpack_dir) / f"{number:05d}-{name}.tar"))
    if path not in _UNPACKED:
        import atexit
        import tempfile

        folder = tempfile.mkdtemp(prefix="latent_patch_tar_")
        atexit.register(shutil.rmtree, folder, True)
        _UNPACKED[path] = str(unpack_tar(path, os.path.join(folder, "unpacked.tar")))
    return _UNPACKED[path]


def _prune(folder: Path, keep: set[str]) -> None:
    """Remove every entry of ``folder`` not named in ``keep`` (the folder too once empty)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    if not keep:
        folder.rmdir()


def list_tars(spec: str, unpack_dir: str | Path | None = None) -> Listing:
    """One input per webdataset sample; its image member is read by offset (no re-scan).

    Compressed tars are unpacked into ``unpack_dir`` (kept across runs, see :func:`unpack_tar`;
    whatever else is in that folder is removed: the caller must own it, as ``encode`` does under
    its lock) or, without it, into a per-process temporary copy."""
    paths, notes = tar_folder(spec) if os.path.isdir(spec) else (expand_tar_spec(spec), [])
    sources: list[str] = []
    labels: list[int] = []
    locs: list[tuple[str, int, int] | None] = []
    problems: dict[int, str] = {}
    unpacked = Path(unpack_dir) if unpack_dir is not None else None
    if unpacked is not None and unpacked.is_dir():  # a killed unpack's partial copy, before the next
        _prune(unpacked, {p.name for p in unpacked.iterdir() if not p.name.endswith(".tmp")})
    keep: set[str] = set()
    for number, original in enumerate(paths):
        path = _seekable_tar(original, unpacked, number)
        if path != original and unpacked is not None:
            keep |= {Path(path).name, Path(path).name + ".done"}
        for key, members in _tar_samples(path, original if path != original else None):
            i = len(sources)
            img_ext = _pick(members, IMAGE_EXTS)
            sources.append(f"{Path(original).name}/{key}.{img_ext or 'noimage'}")
            m = members.get(img_ext) if img_ext else None
            locs.append((path, m.offset_data, m.size) if m else None)
            label = _tar_label(path, members)
            labels.append(label if label is not None else -1)
            if m is None:
                problems[i] = "no image member in this sample"
            elif label is None:
                problems[i] = "no valid .cls member in this sample"
    if unpacked is not None:
        _prune(unpacked, keep)  # copies of tars no longer in the source
    if not sources:
        raise ValueError(f"--source {spec}: the tar shards hold no samples")
    top = max(labels, default=-1)
    names = _tar_class_names(paths[0], top) if top >= 0 else []
    base = str(Path(paths[0]).parent)
    return Listing("tars", os.path.abspath(spec), base, sources, labels, names, locations=locs,
                   problems=problems, warnings=notes)


def _pick(members: dict[str, tarfile.TarInfo], wanted: tuple[str, ...]) -> str | None:
    """The member extension whose last part ("1.jpg" -> "jpg") comes first in ``wanted``."""
    ranked = [(wanted.index(e.rsplit(".", 1)[-1]), e) for e in members
              if e.rsplit(".", 1)[-1] in wanted]
    return min(ranked)[1] if ranked else None


def _tar_label(path: str, members: dict[str, tarfile.TarInfo]) -> int | None:
    ext = _pick(members, _TAR_LABEL_EXTS)
    if ext is None:
        return None
    text = _read_member(path, members[ext]).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None

