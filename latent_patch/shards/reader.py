"""Reading shards: one shard's samples (or a range of them) as (float16 [mean, std] view, label).

A range starts where it starts: each shard has an index (``shard-XXXXXX.idx.npy`` beside it,
written by the encoder with the shard, made once by the loader for shards written before), the
byte offset of every sample, so a reader of samples ``[start, stop)`` seeks straight to
``start`` instead of parsing every header before it (a shard cut among k streams used to be
scanned about k/2 times a pass). Every offset is checked against the tar as it is read.

Security: shards are data, not code. Only ``latent.npy`` (float16 header checked, read with
``np.frombuffer``), ``cls`` (ASCII digits) and, when asked for, ``repr.npy`` (float16, checked
like the latent) are ever read; every other member (``json``,
``.pyd``, ``.pickle``, ...) is skipped unread, so nothing is ever unpickled. Only the user's own
URLs (never a manifest's text) go through webdataset's ``gopen`` (``pipe:``, ``http:``, ...).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .. import fsutil
from .manifest import URL_SCHEME, ShardError, shard_paths

log = logging.getLogger(__name__)

LATENT_EXT = "latent.npy"
LABEL_EXT = "cls"
REPR_EXT = "repr.npy"  # optional: the representation encoder's float16 (gh, gw, K) grid (issue 28)
_F16 = np.dtype("<f2")


@dataclass(frozen=True)
class ShardRef:
    """One shard to read, with its sample count when known.

    ``is_local`` is decided by whoever made the reference, never guessed from a manifest's
    text: only the user's own URLs may go through webdataset's ``gopen`` (pipe:, http:, ...).
    """

    url: str
    num_samples: int | None = None
    is_local: bool = True
    offsets: np.ndarray | None = field(default=None, compare=False, repr=False)  # see :func:`with_index`


def refs_from_manifest(manifest: dict, root: str | Path) -> list[ShardRef]:
    """Shard references with counts, which the exact split and truncation checks rely on."""
    paths = shard_paths(manifest, root)
    return [ShardRef(str(p), s["num_samples"], is_local=True) for p, s in zip(paths, manifest["shards"])]


def refs_from_urls(urls: Sequence[str]) -> list[ShardRef]:
    """The user's own shard URLs (brace-expanded); counts unknown, so ranks split by whole shards."""
    import braceexpand  # a webdataset dependency

    expanded = [u for pattern in urls for u in braceexpand.braceexpand(pattern)]
    return [ShardRef(u, None, is_local=not URL_SCHEME.match(u)) for u in expanded]


class SampleDecoder:
    """Turns a sample's raw member bytes into (latent view, label[, feature grid view]), checking
    shape and dtype. ``repr_shape`` (gh, gw, K): also read each sample's ``repr.npy`` (the
    representation features, issue 28); None leaves that member unread, as every other.

    A .npy header is parsed (safely, no pickle) the first time and then compared byte for byte:
    every sample of a shard set has the same header, so decoding is one ``frombuffer``.
    """

    def __init__(self, latent_shape: Sequence[int], num_classes: int | None,
                 repr_shape: Sequence[int] | None = None):
        self.num_classes = num_classes
        self.arrays = {LATENT_EXT: _Float16Member(LATENT_EXT, (2, *latent_shape), "manifest latent_shape")}
        if repr_shape is not None:
            self.arrays[REPR_EXT] = _Float16Member(REPR_EXT, tuple(repr_shape), "manifest repr grid + dims")
        self.wanted = (*self.arrays, LABEL_EXT)
        self.shape = self.arrays[LATENT_EXT].shape

    def decode(self, ref: ShardRef, key: str, parts: dict[str, bytes]) -> tuple:
        for ext in self.wanted:
            if ext not in parts:
                hint = " (the shards were encoded without --repr?)" if ext == REPR_EXT else ""
                raise ShardError(f"{ref.url}: sample '{key}' has no '{ext}' member{hint}")
        latent = self.arrays[LATENT_EXT].read(ref, key, parts[LATENT_EXT])
        label = self.label(ref, key, parts[LABEL_EXT])
        if REPR_EXT not in self.arrays:
            return latent, label
        return latent, label, self.arrays[REPR_EXT].read(ref, key, parts[REPR_EXT])

    def latent(self, ref: ShardRef, key: str, b: bytes) -> np.ndarray:
        return self.arrays[LATENT_EXT].read(ref, key, b)

    def label(self, ref: ShardRef, key: str, b: bytes) -> int:
        try:
            y = int(b.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ShardError(f"{ref.url}: sample '{key}' member 'cls' is not an integer: {b[:20]!r}") from None
        if y < 0 or (self.num_classes is not None and y >= self.num_classes):
            raise ShardError(f"{ref.url}: sample '{key}' class {y} outside [0, {self.num_classes})")
        return y


class _Float16Member:
    """One float16 .npy member of a fixed shape: header checked once, then compared."""

    def __init__(self, ext: str, shape: tuple[int, ...], expected_from: str) -> None:
        self.ext, self.shape, self.expected_from = ext, shape, expected_from
        self.nbytes = math.prod(shape) * _F16.itemsize
        self._header: bytes | None = None

    def read(self, ref: ShardRef, key: str, b: bytes) -> np.ndarray:
        h = self._header
        if h is None or not b.startswith(h) or len(b) != len(h) + self.nbytes:
            h = self._check_header(ref, key, b)
        return np.frombuffer(b, _F16, offset=len(h)).reshape(self.shape)

    def _check_header(self, ref: ShardRef, key: str, b: bytes) -> bytes:
        where = f"{ref.url}: sample '{key}' member '{self.ext}'"
        f = io.BytesIO(b)
        try:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as err:
            raise ShardError(f"{where}: not a valid .npy ({err})") from None
        if dtype != _F16 or fortran or tuple(shape) != self.shape:
            raise ShardError(
                f"{where}: has shape {tuple(shape)} dtype {dtype}{' (Fortran order)' if fortran else ''}; "
                f"the {self.expected_from} needs shape {self.shape} dtype float16"
            )
        if len(b) - f.tell() != self.nbytes:
            raise ShardError(f"{where}: holds {len(b) - f.tell()} data bytes, expected {self.nbytes}")
        self._header = b[: f.tell()]
        return self._header


@contextmanager
def _open_tar(ref: ShardRef) -> Iterator[tarfile.TarFile]:
    """Local shards open seekable (skipped members cost a seek); user URLs stream via webdataset."""
    stream = None
    try:
        if ref.is_local:
            tf = tarfile.open(ref.url, "r:")
        else:
            from webdataset.gopen import gopen

            stream = gopen(ref.url, "rb")
            tf = tarfile.open(fileobj=stream, mode="r|*")
    except FileNotFoundError:
        raise ShardError(f"{ref.url}: shard not found") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{ref.url}: cannot open as tar ({err})") from None
    try:
        yield tf
    finally:
        tf.close()
        if stream is not None:
            stream.close()


def _members(ref: ShardRef, tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Regular members in order; a read error becomes a ShardError naming the shard."""
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ShardError(f"{ref.url}: cannot read tar ({err}): truncated or corrupt shard") from None
        if info is None:
            break
        tf.members.clear()  # tarfile keeps every header otherwise; shards can hold millions
        if info.isreg():
            yield info
    if ref.is_local:  # a tar cut at a member boundary reads as shorter, not as an error
        tf.fileobj.seek(tf.offset)
        if tf.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            raise ShardError(f"{ref.url}: no end-of-archive block at byte {tf.offset}: truncated or corrupt shard")


def _read_member(ref: ShardRef, tf: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    try:
        return tf.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{ref.url}: cannot read member '{info.name}' ({err}): truncated or corrupt shard") from None


def _split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.ext`` -> (``dir/key``, ``ext.ext``); keys hold no dot (design.md)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def read_shard(
    ref: ShardRef, decoder: SampleDecoder, start: int = 0, stop: int | None = None
) -> Iterator[tuple]:
    """Samples ``start <= i < stop`` of one shard, in tar order, as (latent (2,C,h,w) view, label[,
    features]) (see :class:`SampleDecoder`).

    With ``ref.offsets`` (:func:`with_index`) the read seeks to sample ``start`` and reads each
    sample's bytes in one go (:func:`_indexed`); without, it parses the headers from the shard's
    start (:func:`_scanned`). Either way a reader that reaches the end of a shard checks it
    against the manifest, so a truncated or swapped shard fails loudly; one that stops early
    leaves that to the reader of the tail (every shard's tail is read once per pass).
    """
    if ref.offsets is not None:
        yield from _indexed(ref, decoder, start, ref.num_samples if stop is None else stop)
    else:
        yield from _scanned(ref, decoder, start, stop)


def _indexed(ref: ShardRef, decoder: SampleDecoder, start: int, stop: int) -> Iterator[tuple]:
    """Samples ``[start, stop)`` by the index: one seek, then one read per sample, whose bytes must
    hold whole members of one key and nothing else (so a stale index cannot go unnoticed)."""
    offsets, n = ref.offsets, len(ref.offsets) - 1
    if not 0 <= start <= stop <= n:
        raise ShardError(f"{ref.url}: samples [{start}, {stop}) asked of a shard of {n}")
    previous = None
    with _open_file(ref) as f:
        f.seek(int(offsets[start]))
        for i in range(start, stop):
            size = int(offsets[i + 1] - offsets[i])
            raw = f.read(size)
            if len(raw) != size:
                raise ShardError(f"{ref.url}: ends inside sample {i} (byte {int(offsets[i]) + len(raw)}): "
                                 "truncated shard")
            key, parts = _sample_members(ref, raw, int(offsets[i]), decoder.wanted)
            if key == previous:
                raise ShardError(f"{ref.url}: sample '{key}' at byte {offsets[i]} continues the one before: "
                                 f"stale {index_path(ref.url).name} (delete it: the loader remakes it)")
            previous = key
            yield decoder.decode(ref, key, parts)
        if stop == n and f.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            raise ShardError(f"{ref.url}: no end-of-archive block at byte {offsets[n]}: the shard holds more than "
                             f"its {n} indexed samples, or is truncated or corrupt")


@contextmanager
def _open_file(ref: ShardRef) -> Iterator[io.BufferedReader]:
    try:
        f = open(ref.url, "rb")
    except FileNotFoundError:
        raise ShardError(f"{ref.url}: shard not found") from None
    except OSError as err:
        raise ShardError(f"{ref.url}: cannot open ({err})") from None
    with f:
        yield f


def _sample_members(ref: ShardRef, raw: bytes, at: int, wanted: Sequence[str]) -> tuple[str, dict[str, bytes]]:
    """(key, {ext: bytes} of the wanted members) of one sample's bytes (starting at byte ``at``).

    Plain ustar headers (what the writer packs for short ASCII names) are parsed here, about 10x
    cheaper than tarfile's generic path, which reads anything else (PAX or GNU headers)."""
    members = _ustar_members(raw)
    if members is None:
        members = _tar_members(ref, raw, at)
    key, parts = None, {}
    for name, lo, hi in members:
        k, ext = _split_name(name)
        if key is None:
            key = k
        elif k != key:
            raise ShardError(f"{ref.url}: bytes {at}..{at + len(raw)} hold samples '{key}' and '{k}': "
                             f"stale {index_path(ref.url).name} (delete it: the loader remakes it)")
        if ext in wanted:
            if ext in parts:
                raise ShardError(f"{ref.url}: sample '{key}' has member '{ext}' twice")
            parts[ext] = raw[lo:hi]
    if key is None:
        raise ShardError(f"{ref.url}: no member at byte {at}: stale {index_path(ref.url).name} (delete it: "
                         "the loader remakes it)")
    return key, parts


def _ustar_members(raw: bytes) -> list[tuple[str, int, int]] | None:
    """(name, data start, data end) of each member when ``raw`` is whole plain-ustar regular
    members with valid checksums; None otherwise (then tarfile decides)."""
    out, pos, end = [], 0, len(raw)
    while pos < end:
        h = raw[pos: pos + tarfile.BLOCKSIZE]
        if len(h) < tarfile.BLOCKSIZE or h[257:263] != b"ustar\x00" or h[156] not in _REGULAR or h[345] != 0:
            return None
        try:
            size, chksum = int(h[124:136].rstrip(b"\x00 "), 8), int(h[148:156].rstrip(b"\x00 "), 8)
            name = h[:100].split(b"\x00", 1)[0].decode("ascii")
        except ValueError:  # base-256 sizes, odd bytes: tarfile's business
            return None
        if chksum != sum(h[:148]) + 256 + sum(h[156:]):  # the checksum field counts as 8 spaces
            return None
        lo = pos + tarfile.BLOCKSIZE
        pos = lo + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        out.append((name, lo, lo + size))
    return out if pos == end else None


_REGULAR = (ord("0"), 0)


def _tar_members(ref: ShardRef, raw: bytes, at: int) -> list[tuple[str, int, int]]:
    """:func:`_ustar_members` through tarfile, for headers it does not parse itself."""
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            for info in tf:
                if info.isreg():
                    out.append((info.name, info.offset_data, info.offset_data + info.size))
            if tf.offset != len(raw):
                raise tarfile.ReadError(f"members end at byte {at + tf.offset}, the index says {at + len(raw)}")
    except (tarfile.TarError, EOFError) as err:
        raise ShardError(f"{ref.url}: bytes {at}..{at + len(raw)} are not one sample's members ({err}): corrupt "
                         f"shard or stale {index_path(ref.url).name} (delete it: the loader remakes it)") from None
    return out


def _scanned(ref: ShardRef, decoder: SampleDecoder, start: int = 0,
             stop: int | None = None) -> Iterator[tuple]:
    """Samples ``[start, stop)`` found by parsing every header from the shard's start (user URLs,
    whole-shard reads)."""
    expect = ref.num_samples
    limit = math.inf if stop is None else stop
    index, key, parts = -1, None, {}
    with _open_tar(ref) as tf:
        for info in _members(ref, tf):
            k, ext = _split_name(info.name)
            if k != key:
                if key is not None and start <= index < limit:
                    yield decoder.decode(ref, key, parts)
                index, key, parts = index + 1, k, {}
                if index >= limit and stop != expect:
                    return  # the rest of this shard belongs to another reader
            if start <= index < limit and ext in decoder.wanted:
                if ext in parts:
                    raise ShardError(f"{ref.url}: sample '{key}' has member '{ext}' twice")
                parts[ext] = _read_member(ref, tf, info)
        if key is not None and start <= index < limit:
            yield decoder.decode(ref, key, parts)
    count = index + 1
    if (expect is not None and count != expect) or (stop is not None and count < stop):
        want = expect if expect is not None else f"at least {stop}"
        raise ShardError(f"{ref.url}: holds {count} samples, manifest says {want}: truncated or replaced shard")


# ----------------------------------------------------------------------------------------------
# The sample index: where each sample begins


INDEX_SUFFIX = ".idx.npy"


def index_path(tar: str | Path) -> Path:
    """``shard-000000.tar`` -> ``shard-000000.idx.npy`` beside it (another name: name + ``.idx.npy``)."""
    p = Path(tar)
    return p.with_name((p.name[:-4] if p.name.endswith(".tar") else p.name) + INDEX_SUFFIX)


def index_bytes(offsets: Sequence[int], tar_bytes: int) -> bytes:
    """The index file, a plain .npy (read with ``allow_pickle=False``): int64 ``(n + 2,)``, each
    sample's first header offset, the end of the last sample's data (where the end-of-archive
    blocks begin) and the tar's size, so a tar replaced after its index was made reads as stale."""
    a = np.asarray([*offsets, tar_bytes], dtype="<i8")
    return fsutil.npy_header(a.shape, "<i8") + a.tobytes()


def read_index(path: str | Path, num_samples: int, tar_bytes: int) -> np.ndarray | None:
    """The ``num_samples + 1`` offsets of an index file, or None where it is missing, unreadable,
    or does not fit the tar (another count or size, offsets not increasing): then it is remade."""
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (ValueError, OSError, EOFError) as err:
        log.warning("%s: unreadable shard index (%s): making it again", path, err)
        return None
    ok = (a.dtype == np.int64 and a.shape == (num_samples + 2,) and int(a[-1]) == tar_bytes
          and a[0] >= 0 and bool(np.all(np.diff(a[:-1]) > 0)) and a[-2] + 2 * tarfile.BLOCKSIZE <= tar_bytes)
    return a[:-1] if ok else None


def scan_offsets(ref: ShardRef) -> list[int]:
    """Each sample's first header offset, then the end of the data, read from the tar's headers
    alone (members' data is skipped by seeking): what the encoder records as it writes."""
    offsets, key = [], None
    with _open_tar(ref) as tf:
        for info in _members(ref, tf):
            k, _ = _split_name(info.name)
            if k != key:
                offsets.append(info.offset)
                key = k
        offsets.append(tf.offset)
    return offsets


def with_index(ref: ShardRef) -> tuple[ShardRef, bool]:
    """(``ref`` with its sample offsets, whether they were made now). A local shard of known count
    reads its index file; a shard written before the encoder wrote indexes (or whose tar changed)
    has its headers read once and the index saved beside it, or kept in memory only where the
    folder is read-only. A shard whose count is not the manifest's fails here, naming it."""
    if not ref.is_local or ref.num_samples is None:
        return ref, False
    try:
        size = os.stat(ref.url).st_size
    except FileNotFoundError:
        raise ShardError(f"{ref.url}: shard not found") from None
    path = index_path(ref.url)
    offsets = read_index(path, ref.num_samples, size)
    if offsets is not None:
        return replace(ref, offsets=offsets), False
    found = scan_offsets(ref)
    if len(found) - 1 != ref.num_samples:
        raise ShardError(f"{ref.url}: holds {len(found) - 1} samples, manifest says {ref.num_samples}: "
                         "truncated or replaced shard")
    try:
        fsutil.atomic_write_bytes(path, index_bytes(found, size))
    except OSError as err:
        log.warning("%s: cannot save the shard index (%s); it is kept in memory for this run", path, err)
    return replace(ref, offsets=np.asarray(found, np.int64)), True


def with_indexes(refs: Sequence[ShardRef], first: int = 0) -> list[ShardRef]:
    """Every ref with its offsets (:func:`with_index`), visited from ``first`` on: ranks start at
    different shards, so a set written before indexes is indexed by all of them at once."""
    out, made, t0 = list(refs), 0, time.perf_counter()
    for k in range(len(out)):
        j = (first + k) % len(out)
        out[j], new = with_index(out[j])
        made += new
    if made:
        log.info("indexed %d shard(s) written without sample offsets in %.1f s (once: saved beside them as %s)",
                 made, time.perf_counter() - t0, INDEX_SUFFIX)
    return out


def index_problem(tar: str | Path, num_samples: int) -> str | None:
    """What is wrong with the index of a shard (``encode_latents.py --verify``): None when it is
    absent (the loader makes it) or gives exactly the offsets the tar's headers give."""
    path = index_path(tar)
    if not path.is_file():
        return None
    offsets = read_index(path, num_samples, os.stat(tar).st_size)
    if offsets is None or offsets.tolist() != scan_offsets(ShardRef(str(tar), num_samples)):
        return f"{path}: does not match {Path(tar).name} (delete it: the loader remakes it)"
    return None
