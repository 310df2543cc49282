"""The shared do-once lock (filelock) on its own: exclusive, heartbeat, tokens, inode-checked
breaking, timeouts. Its users' multi-process tests are in test_latent_cache.py and
test_encode_listing.py."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from latent_patch import filelock


def test_one_holder_a_heartbeat_and_release_only_of_our_own_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(filelock, "HEARTBEAT_S", 0.02)
    path = tmp_path / "x.lock"
    a, b = filelock.FileLock(path), filelock.FileLock(path)
    assert a.acquire() and not b.acquire()
    assert filelock.lock_owner(path)["pid"] == os.getpid()
    os.utime(path, (0, 0))
    time.sleep(0.2)
    assert path.stat().st_mtime > 1e9  # touched by the heartbeat
    path.unlink()  # a waiter broke it ...
    assert b.acquire()  # ... and took over: the old holder must leave the new lock alone
    a.release()
    assert path.exists() and filelock.lock_owner(path)["token"] == b.token
    b.release()
    assert not list(tmp_path.iterdir())


def test_breaking_spares_a_fresh_lock_made_meanwhile(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"host": "h", "pid": 1, "token": "dead"}))
    dead = filelock._identity(path, path.stat())
    path.unlink()  # another waiter broke the dead lock first ...
    fresh = filelock.FileLock(path)
    assert fresh.acquire()  # ... and a new holder took it (maybe with the freed inode number)
    filelock._break(path, dead)
    assert filelock.lock_owner(path)["token"] == fresh.token
    assert [p.name for p in tmp_path.iterdir()] == ["x.lock"]  # no aside left behind
    fresh.release()
    path.write_text(json.dumps({"host": "h", "pid": 1, "token": "dead"}))
    filelock._break(path, filelock._identity(path, path.stat()))  # the dead one itself goes
    assert not list(tmp_path.iterdir())


def test_do_once_works_once_and_waiters_get_the_result(tmp_path):
    result, calls = tmp_path / "result", []

    def ready():
        return result.read_text() if result.exists() else None

    def work():
        calls.append(1)
        time.sleep(0.3)
        result.write_text("done")
        return "done"

    got: list = []
    threads = [threading.Thread(target=lambda: got.append(filelock.do_once(tmp_path / "l", ready, work, "it")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == ["done"] * 4 and len(calls) == 1 and not (tmp_path / "l").exists()


def test_waiting_times_out_on_a_live_lock_and_leaves_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(filelock, "POLL_S", 0.05)
    path = tmp_path / "l"
    path.write_text(json.dumps({"host": "node-7", "pid": 12, "token": "t"}))
    with pytest.raises(TimeoutError, match="it: not ready after 0.3 s; .* held by node-7 pid 12"):
        filelock.do_once(path, lambda: None, lambda: pytest.fail("must not work"), "it", timeout_s=0.3,
                         progress=lambda: "3 of 9 done")
    assert "waiting for it: node-7 pid 12 holds" in capsys.readouterr().err and path.exists()


def test_take_holds_a_free_lock_breaks_a_dead_ones_and_leaves_a_live_or_foreign_one(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    free = filelock.take(tmp_path / "free")
    assert free is not None and filelock.lock_owner(tmp_path / "free")["token"] == free.token
    assert filelock.take(tmp_path / "free") is None  # held by a live process (us)
    free.release()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    (tmp_path / "dead").write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "token": "killed"}))
    taken = filelock.take(tmp_path / "dead")
    assert taken is not None and filelock.lock_owner(tmp_path / "dead")["token"] == taken.token
    assert f"its owner (pid {dead}) is gone" in capsys.readouterr().err
    taken.release()
    foreign = json.dumps({"host": "node-7", "pid": dead, "token": "t"})  # another host: judged by waiting only
    (tmp_path / "foreign").write_text(foreign)
    assert filelock.take(tmp_path / "foreign") is None and (tmp_path / "foreign").read_text() == foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]
