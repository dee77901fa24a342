"""Run locks: one winner among simultaneous claimants, heartbeats, stale locks taken over (dead process on
this host, no heartbeat from another host), a lost lock noticed, the new owner's file left alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import pytest

from fsad_lightning.locks import LockOwner, break_stale, claim, process_alive, read_owner, stale_reason


def _foreign_lock(path, host: str = "elsewhere", pid: int = 4242, age_s: float = 0.0, **fields) -> None:
    owner = replace(LockOwner.this_process("other"), host=host, pid=pid, **fields)
    path.write_text(json.dumps(asdict(owner)))
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_one_of_many_simultaneous_claimants_wins(tmp_path):
    path = tmp_path / "cell.lock"
    barrier = threading.Barrier(8)
    won = []

    def contend(i: int) -> None:
        barrier.wait()
        lock = claim(path, LockOwner.this_process(f"w{i}"), timeout_s=60)
        if lock is not None:
            won.append(lock)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert read_owner(path)["worker"] == won[0].owner.worker
    assert claim(path, LockOwner.this_process("late"), timeout_s=60) is None  # a live lock is left alone
    won[0].release()
    assert not path.exists()
    assert claim(path, LockOwner.this_process("late"), timeout_s=60) is not None


def test_heartbeat_keeps_the_lock_fresh_and_release_removes_it(tmp_path):
    path = tmp_path / "cell.lock"
    lock = claim(path, LockOwner.this_process("w"), timeout_s=1.0, heartbeat_s=0.05)
    old = time.time() - 30
    os.utime(path, (old, old))
    with lock.heartbeat():
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 1.0 and stale_reason(path, 1.0) is None
    assert not path.exists() and not lock.lost


def test_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    path = tmp_path / "cell.lock"
    _foreign_lock(path, host=socket.gethostname(), pid=_dead_pid())
    assert "is gone" in stale_reason(path, timeout_s=3600)
    lock = claim(path, LockOwner.this_process("taker"), timeout_s=3600)
    assert lock is not None and "is gone" in lock.took_over
    assert read_owner(path)["worker"] == "taker"
    # a live pid that was recycled (another start time) is gone too; the live original is not
    _foreign_lock(path, host=socket.gethostname(), pid=os.getpid(), pid_start="-1")
    assert stale_reason(path, timeout_s=3600) is not None
    assert process_alive(os.getpid(), LockOwner.this_process().pid_start)


def test_another_hosts_lock_is_stale_only_after_the_timeout(tmp_path):
    path = tmp_path / "cell.lock"
    _foreign_lock(path, host="elsewhere", pid=os.getpid())  # a pid number that is alive here means nothing
    assert stale_reason(path, timeout_s=60) is None
    assert claim(path, LockOwner.this_process("w"), timeout_s=60) is None
    _foreign_lock(path, host="elsewhere", age_s=120)
    assert "no heartbeat for 120 s" in stale_reason(path, timeout_s=60)
    lock = claim(path, LockOwner.this_process("w"), timeout_s=60)
    assert lock is not None and "worker other on elsewhere" in lock.took_over
    # an empty lock file (its owner died between create and write) goes stale by its age alone
    path.write_text("")
    assert stale_reason(path, timeout_s=60) is None
    old = time.time() - 120
    os.utime(path, (old, old))
    assert claim(path, LockOwner.this_process("w2"), timeout_s=60) is not None


def test_breaking_checks_again_under_the_guard(tmp_path):
    path = tmp_path / "cell.lock"
    _foreign_lock(path, age_s=120)
    guard = tmp_path / "cell.lock.break"
    guard.write_text("{}")  # another worker is breaking it now: leave it to that one
    assert break_stale(path, 60, LockOwner.this_process("w")) is None and path.exists()
    old = time.time() - 120
    os.utime(guard, (old, old))  # ... until that breaker is itself stale
    assert break_stale(path, 60, LockOwner.this_process("w")) is None and not guard.exists()
    assert break_stale(path, 60, LockOwner.this_process("w")) is not None and not path.exists()


def test_a_lost_lock_is_noticed_and_the_new_owners_file_kept(tmp_path):
    path = tmp_path / "cell.lock"
    lock = claim(path, LockOwner.this_process("slow"), timeout_s=1.0, heartbeat_s=0.05)
    _foreign_lock(path, host="elsewhere")  # taken over while our heartbeat had stopped
    with lock.heartbeat():
        time.sleep(0.2)
    assert lock.lost and read_owner(path)["worker"] == "other"


def test_bad_timeouts():
    with pytest.raises(ValueError, match="heartbeat"):
        claim("x.lock", LockOwner.this_process(), timeout_s=1.0, heartbeat_s=2.0)
