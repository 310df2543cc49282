"""Do a piece of work once across processes and hosts: an ``O_EXCL`` lock file with a heartbeat.

Why: several steps are wanted by every process of every job at start (the encoder's source
listing and .tar.gz unpack, the in-memory training cache), take minutes to an hour, and must run
once. :func:`do_once` is the one implementation of that pattern: whoever creates the lock file
does the work while refreshing the lock's mtime; everyone else polls for the finished result
without any collective (so no NCCL timeout can fire, and a job started alone or hours later
behaves the same). A lock whose owner is dead is broken and taken over:

- its pid is gone on this host (the owner is named in the lock: ``{host, pid, token}``), at once;
- or it stayed untouched for ``STALE_S`` by the *waiter's own clock* (how long its inode and
  mtime stayed the same), so clocks that differ between hosts do not matter.

Breaking is a rename then a check (:func:`_break`), so of several waiters judging the same lock
dead exactly one takes over, and a fresh lock moved aside by mistake is put back.

Not in :mod:`fsutil`: that module writes single files atomically; this is a protocol between
processes (a heartbeat thread, polling, judging owners), used by two stages.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

from .fsutil import pid_alive

T = TypeVar("T")

HEARTBEAT_S = 10.0  # the holder touches its lock this often ...
STALE_S = 300.0  # ... so a lock unchanged this long (30 missed beats, by the waiter's clock) is a dead one's
POLL_MIN_S = 0.05  # a waiter looks again this soon at first (a short job finishes fast) ...
POLL_S = 2.0  # ... backing off to this (a long one is not stat-ed to death on a network file system)
REPORT_S = 60.0  # a waiter says what it waits for when it starts waiting, then this often


def _say(msg: str) -> None:
    """Waiting can last an hour: say so on stderr whatever logging is set up (stdout is for results)."""
    print(msg, file=sys.stderr, flush=True)


def lock_owner(path: Path) -> dict:
    """The lock's ``{host, pid, token}``; ``{}`` when it is gone, being written, or not ours to read."""
    try:
        owner = json.loads(Path(path).read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _name(owner: dict) -> str:
    return f"{owner['host']} pid {owner['pid']}" if {"host", "pid"} <= owner.keys() else "an unknown process"


class FileLock:
    """One process's hold on a lock file; while held, a thread touches it every ``HEARTBEAT_S``.

    The token tells our lock from one that replaced it after a waiter judged us dead: the
    heartbeat stops touching, and :meth:`release` does not remove, a lock that is not ours.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """True if this process created the lock (and now holds it), False if another holds it."""
        assert self.token is None, f"{self.path}: already held"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        self.token = uuid.uuid4().hex
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}, f)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if lock_owner(self.path).get("token") != self.token:
                return  # taken over by a waiter who judged us dead
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours, with a killed breaker's leftovers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.token is not None and lock_owner(self.path).get("token") == self.token:
            for aside in self.path.parent.glob(f"{self.path.name}.*.stale"):
                aside.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
        self.token = None


def _identity(path: Path, st: os.stat_result) -> tuple:
    """What tells one lock from the next: inode (reused once freed), mtime (a beat changes it), token."""
    return st.st_ino, st.st_mtime_ns, lock_owner(path).get("token")


def _break(path: Path, dead: tuple) -> None:
    """Remove the lock judged dead (``dead``: its :func:`_identity`), not a fresh one made meanwhile.

    Moved aside first (of several breakers exactly one rename succeeds), then checked: a fresh
    lock, or the dead one touched since, moved by mistake is linked back (link never replaces).
    In the remaining race two processes work at once, which callers must tolerate: each result
    is published atomically."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if _identity(aside, aside.stat()) != dead:
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
    finally:
        aside.unlink(missing_ok=True)


def _owner_gone(owner: dict) -> bool:
    """The owner ran on this host and its pid is gone: dead for sure, no need to wait ``STALE_S``."""
    return owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
        and not pid_alive(owner["pid"])


def take(path: str | Path) -> FileLock | None:
    """A hold on ``path`` now, or None while a live process holds it; a dead owner's lock is taken over.

    Why: a caller that tries each lock once and moves on (bench_quality.train_all) would
    otherwise put off the work a killed run left half done and start new work instead. Only an
    owner gone from this host counts as dead here; a lock of another host is judged by waiting
    (:class:`_Waiter`)."""
    path = Path(path)
    for _ in range(2):  # once more after breaking: another process may take it first
        lock = FileLock(path)
        if lock.acquire():
            return lock
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        owner = lock_owner(path)
        if not _owner_gone(owner):
            return None
        _say(f"taking over {path}: its owner (pid {owner['pid']}) is gone")
        _break(path, (st.st_ino, st.st_mtime_ns, owner.get("token")))
    return None


class _Waiter:
    """A waiter's view of another process's lock: sleep (backing off), report, or break a dead lock."""

    def __init__(self, path: Path, what: str, progress: Callable[[], str] | None) -> None:
        self.path, self.what, self.progress = path, what, progress
        self.seen: tuple | None = None  # (inode, mtime) of the lock when last looked at ...
        self.since = 0.0  # ... unchanged since then (monotonic)
        self.delay, self.reported = POLL_MIN_S, None

    def wait(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return  # released: look for the result, or take the lock, now
        now = time.monotonic()
        if (st.st_ino, st.st_mtime_ns) != self.seen:
            self.seen, self.since = (st.st_ino, st.st_mtime_ns), now
        owner = lock_owner(self.path)
        if _owner_gone(owner):
            why = f"its owner (pid {owner['pid']}) is gone"
        elif now - self.since > STALE_S:
            why = f"not touched for {STALE_S:.0f} s ({_name(owner)} presumed dead)"
        else:
            if self.reported is None or now - self.reported >= REPORT_S:
                more = f"; {self.progress()}" if self.progress is not None else ""
                _say(f"waiting for {self.what}: {_name(owner)} holds {self.path}{more}")
                self.reported = now
            time.sleep(self.delay)
            self.delay = min(POLL_S, self.delay * 1.5)
            return
        _say(f"taking over {self.path}: {why}")
        _break(self.path, (st.st_ino, st.st_mtime_ns, owner.get("token")))
        self.seen, self.delay = None, POLL_MIN_S


def do_once(lock: str | Path, ready: Callable[[], T | None], work: Callable[[], T | None], what: str,
            timeout_s: float | None = None, progress: Callable[[], str] | None = None) -> T:
    """``ready()``'s result, made by ``work()`` in whichever process takes ``lock`` first.

    Loops: ``ready()`` not None -> return it; else take the lock -> look again (it may have
    finished between the looks), else ``work()`` under the heartbeat, release; else wait (poll,
    report every ``REPORT_S``, break a dead lock). ``work`` publishes its result where ``ready``
    finds it and returns it (None: look again). ``what`` names the result in messages;
    ``progress()`` adds how far the holder got. ``timeout_s`` (None: none) bounds the waiting, not
    the work: waiting lasts as long as the work does.
    """
    path, started = Path(lock), time.monotonic()
    waiter = _Waiter(path, what, progress)
    while True:
        got = ready()
        if got is not None:
            return got
        held = FileLock(path)
        if held.acquire():
            try:
                got = ready()
                if got is None:
                    got = work()
            finally:
                held.release()
            if got is not None:
                return got
            continue
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not ready after {timeout_s:g} s; {path} is held by "
                               f"{_name(lock_owner(path))}")
        waiter.wait()
