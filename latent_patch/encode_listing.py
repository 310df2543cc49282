"""The source's listing, made once per output folder and read by every process and job.

Why a module of its own: listing is the one step of the encoding job that must happen exactly
once across processes and hosts before any of them can plan its shards (``filelock.do_once``), and
it owns its files in the output folder: ``listing.json.gz``, ``listing.lock`` and ``unpacked/``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from pathlib import Path

from . import filelock, fsutil
from .config import EncodeConfig
from .sources import Listing, list_source, source_identity

log = logging.getLogger(__name__)

LISTING_FILE = "listing.json.gz"  # the source's Listing (sources.Listing.to_record) + its identity
LISTING_LOCK = "listing.lock"  # held (O_EXCL) by the one process listing; {host, pid, token}
UNPACKED_DIR = "unpacked"  # seekable copies of a .tar.gz source, one per compressed tar
LISTING_FORMAT = "latent-patch-listing/1"


def shared_listing(cfg: EncodeConfig) -> Listing:
    """The source's listing, made once per output folder and read by every process and job.

    Why: listing ImageNet stats 1.28M files, a tar source is read header by header and a .tar.gz
    must be unpacked; done by each of 8 processes on 8 nodes that is 64 times the work (and 8
    unpacked copies per node). The first process to take ``OUT/listing.lock`` lists and writes
    ``OUT/listing.json.gz`` atomically; the others poll for that file (:func:`filelock.do_once`:
    no collective, a dead lister's lock is taken over). A later run (resume) reuses the file while
    :func:`sources.source_identity` stamps the source the same; else it lists again and
    :func:`claim_out_dir` compares the new listing with ``job.json`` as before. A listing of
    another source (path or label file) is refused.
    """
    ident = source_identity(cfg.source, cfg.labels)  # a missing source fails here, before OUT is made
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path, rejected = out / LISTING_FILE, None

    def ready() -> Listing | None:
        nonlocal rejected
        listing, rejected = _read_listing(path, ident, out, rejected)
        return listing

    return filelock.do_once(out / LISTING_LOCK, ready, lambda: _write_listing(cfg, out), f"the listing {path}")


def _write_listing(cfg: EncodeConfig, out: Path) -> Listing:
    """List the source (unpacking compressed tars into ``OUT/unpacked``) and publish the result."""
    path = out / LISTING_FILE
    for p in out.glob(f".{LISTING_FILE}.*.tmp"):
        p.unlink(missing_ok=True)  # a killed lister's leftovers (we hold the lock)
    ident = source_identity(cfg.source, cfg.labels)  # stamped before listing: a change during it shows
    t0 = time.perf_counter()
    listing = list_source(cfg.source, cfg.labels, unpack_dir=out / UNPACKED_DIR)
    rec = {"format": LISTING_FORMAT, "identity": ident, **listing.to_record(out)}
    data = gzip.compress(json.dumps(rec, separators=(",", ":")).encode(), compresslevel=6, mtime=0)
    fsutil.atomic_write_bytes(path, data)
    print(f"listed the {listing.kind} source {cfg.source}: {len(listing)} inputs in "
          f"{time.perf_counter() - t0:.1f} s -> {path} (shared by every process)", flush=True)
    return listing


def _read_listing(path: Path, ident: dict, out: Path,
                  rejected: tuple | None) -> tuple[Listing | None, tuple | None]:
    """(the saved listing when it is this source's and still current, else None; the file's
    (inode, mtime, size)). A file seen before as ``rejected`` (out of date) is not read again:
    waiters poll while it is being replaced, and a large listing takes a second to parse."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    if key == rejected:
        return None, key
    try:
        rec = json.loads(gzip.decompress(path.read_bytes()))
    except FileNotFoundError:
        return None, None
    except (OSError, EOFError, ValueError) as err:
        log.warning("%s: unreadable (%s); listing the source again", path, err)
        return None, key
    return _listing_if_current(path, rec, ident, out), key


def _listing_if_current(path: Path, rec: dict, ident: dict, out: Path) -> Listing | None:
    """The listing held in ``rec`` (read from ``path``) if it is still current; raises when it is
    another source's."""
    if not isinstance(rec, dict) or rec.get("format") != LISTING_FORMAT:
        return None  # another version's file: replaced
    old = rec["identity"]
    if (old.get("source"), old.get("labels")) != (ident["source"], ident["labels"]):
        was = f"--source {old.get('source')}" + (f" --labels {old['labels']}" if old.get("labels") else "")
        now = f"--source {ident['source']}" + (f" --labels {ident['labels']}" if ident["labels"] else "")
        raise ValueError(f"{path} is the listing of {was}, not of {now}: use another --out for "
                         f"another source (if the same data moved, delete {path} to list it again)")
    if (old["kind"], old["stamp"]) != (ident["kind"], ident["stamp"]):
        log.info("%s: the source changed since it was listed; listing it again", path)
        return None
    for tar, size in zip(rec["tars"], rec["tar_sizes"]):
        if not os.path.isabs(tar) and not _has_size(out / tar, size):
            return None  # an unpacked copy was removed or damaged: unpack again
    return Listing.from_record(rec, out)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
