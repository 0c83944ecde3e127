"""CacheLock: one holder at a time across processes, waiters that say once what they wait for, a holder that
keeps its lock fresh, and a lock whose holder is gone (a dead process here, a silent machine elsewhere) taken
over instead of waited on forever. Real processes hold the locks the tests wait on."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from slm.data.locks import CacheLock

HOLD = (
    "import sys, time\n"
    "from slm.data.locks import CacheLock\n"
    "lock = CacheLock(sys.argv[1], 'the test entry', heartbeat_s=0.1)\n"
    "lock.acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "lock.release()\n"
)


def _holder(entry, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(entry), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_process_waits_for_the_holder_and_says_so_once(tmp_path, caplog):
    holder = _holder(tmp_path / "entry", 1.5)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="slm.data.locks"), CacheLock(tmp_path / "entry", "the test entry"):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 1.0  # in only once the holder released it (it held it 1.5 s)
    said = [r.message for r in caplog.records if "waiting for the test entry" in r.message]
    assert len(said) == 1 and f"pid {holder.pid}" in said[0]
    assert not (tmp_path / "entry.lock").exists()  # released: the file is gone


def test_the_holder_keeps_its_lock_fresh(tmp_path):
    lock = CacheLock(tmp_path / "entry", "x", heartbeat_s=0.05)
    with lock:
        first = (tmp_path / "entry.lock").stat().st_mtime_ns
        time.sleep(0.4)
        assert (tmp_path / "entry.lock").stat().st_mtime_ns > first


def _stale_file(path, host: str, pid: int, age_s: float = 0.0):
    path.write_text(json.dumps({"host": host, "pid": pid, "since": time.time() - age_s}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_lock_whose_holder_died_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists, as a job killed with SIGKILL leaves it
    _stale_file(tmp_path / "entry.lock", socket.gethostname(), gone.pid)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="slm.data.locks"), CacheLock(tmp_path / "entry", "the test entry"):
        assert time.monotonic() - started < 1.0
    assert any(f"pid {gone.pid} on this machine) is gone" in r.message for r in caplog.records)


@pytest.mark.parametrize("age_s", [1000.0, 0.0])
def test_a_lock_not_touched_for_stale_s_is_taken_over(tmp_path, caplog, age_s):
    """Another machine's holder (its pid means nothing here) whose heartbeat stopped: taken over once the lock
    file has not been touched for stale_s, not before."""
    _stale_file(tmp_path / "entry.lock", "another-node", 1, age_s=age_s)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="slm.data.locks"), CacheLock(tmp_path / "entry", "x", stale_s=0.8):
        waited = time.monotonic() - started
    assert (waited < 0.5) if age_s else (waited > 0.7)
    assert any("has not touched it for" in r.message for r in caplog.records)
    assert not list(tmp_path.glob("entry.lock.stale*"))
