"""Reading shards: one shard's samples (or a range of them) as (float16 [mean, std] view, label).

Security: shards are data, not code. Only ``latent.npy`` (float16 header checked, read with
``np.frombuffer``) and ``cls`` (ASCII digits) are ever read; every other member (``json``,
``.pyd``, ``.pickle``, ...) is skipped unread, so nothing is ever unpickled. Only the user's own
URLs (never a manifest's text) go through webdataset's ``gopen`` (``pipe:``, ``http:``, ...).
"""

from __future__ import annotations

import io
import math
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .manifest import URL_SCHEME, ShardError, shard_paths

LATENT_EXT = "latent.npy"
LABEL_EXT = "cls"
_WANTED = (LATENT_EXT, LABEL_EXT)  # every other member is skipped without being read
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
    """Turns a sample's raw member bytes into (latent view, label), checking shape and dtype.

    The .npy header is parsed (safely, no pickle) the first time and then compared byte for
    byte: every sample of a shard set has the same header, so decoding is one ``frombuffer``.
    """

    def __init__(self, latent_shape: Sequence[int], num_classes: int | None):
        self.shape = (2, *latent_shape)
        self.nbytes = math.prod(self.shape) * _F16.itemsize
        self.num_classes = num_classes
        self._header: bytes | None = None

    def decode(self, ref: ShardRef, key: str, parts: dict[str, bytes]) -> tuple[np.ndarray, int]:
        for ext in _WANTED:
            if ext not in parts:
                raise ShardError(f"{ref.url}: sample '{key}' has no '{ext}' member")
        return self.latent(ref, key, parts[LATENT_EXT]), self.label(ref, key, parts[LABEL_EXT])

    def latent(self, ref: ShardRef, key: str, b: bytes) -> np.ndarray:
        h = self._header
        if h is None or not b.startswith(h) or len(b) != len(h) + self.nbytes:
            h = self._check_header(ref, key, b)
        return np.frombuffer(b, _F16, offset=len(h)).reshape(self.shape)

    def _check_header(self, ref: ShardRef, key: str, b: bytes) -> bytes:
        where = f"{ref.url}: sample '{key}' member '{LATENT_EXT}'"
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
                f"manifest latent_shape {list(self.shape[1:])} needs shape {self.shape} dtype float16"
            )
        if len(b) - f.tell() != self.nbytes:
            raise ShardError(f"{where}: holds {len(b) - f.tell()} data bytes, expected {self.nbytes}")
        self._header = b[: f.tell()]
        return self._header

    def label(self, ref: ShardRef, key: str, b: bytes) -> int:
        try:
            y = int(b.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ShardError(f"{ref.url}: sample '{key}' member 'cls' is not an integer: {b[:20]!r}") from None
        if y < 0 or (self.num_classes is not None and y >= self.num_classes):
            raise ShardError(f"{ref.url}: sample '{key}' class {y} outside [0, {self.num_classes})")
        return y


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
) -> Iterator[tuple[np.ndarray, int]]:
    """Samples ``start <= i < stop`` of one shard, in tar order, as (latent (2,C,h,w) view, label).

    A reader that reaches the end of a shard checks its sample count against the manifest, so a
    truncated or swapped shard fails loudly; one that stops early leaves that to the reader of
    the tail (every shard's tail is read once per pass).
    """
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
            if start <= index < limit and ext in _WANTED:
                if ext in parts:
                    raise ShardError(f"{ref.url}: sample '{key}' has member '{ext}' twice")
                parts[ext] = _read_member(ref, tf, info)
        if key is not None and start <= index < limit:
            yield decoder.decode(ref, key, parts)
    count = index + 1
    if (expect is not None and count != expect) or (stop is not None and count < stop):
        want = expect if expect is not None else f"at least {stop}"
        raise ShardError(f"{ref.url}: holds {count} samples, manifest says {want}: truncated or replaced shard")
