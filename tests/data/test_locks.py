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


def test_a_holder_that_lost_its_lock_releases_only_its_own_and_learns_it_lost(tmp_path, caplog):
    """Issue 37 item 1: a holder suspended past stale_s is taken over; when it resumes it must neither delete the
    new holder's lock (a third job would then build the same entry) nor publish."""
    from slm.data.locks import LockLost

    first = CacheLock(tmp_path / "entry", "the entry", stale_s=0.5, heartbeat_s=1000)  # a heartbeat that sleeps
    first.acquire()
    first.confirm()  # still ours
    old = time.time() - 10
    os.utime(tmp_path / "entry.lock", (old, old))  # suspended past stale_s
    second = CacheLock(tmp_path / "entry", "the entry", stale_s=0.5)
    second.acquire()  # takes it over
    with pytest.raises(LockLost, match="the entry"):
        first.confirm()
    with caplog.at_level(logging.WARNING, logger="slm.data.locks"):
        first.release()
    assert (tmp_path / "entry.lock").exists(), "the resumed holder deleted the new holder's lock"
    assert any("lost" in r.message for r in caplog.records)
    second.confirm()
    second.release()
    assert not (tmp_path / "entry.lock").exists()


def test_the_heartbeat_survives_a_transient_error_and_warns_once(tmp_path, monkeypatch, caplog):
    """Issue 37 item 2: an ESTALE/EIO on touching the lock (or the instant a waiter has renamed it aside) must not
    end the heartbeat: age alone would then mark a live holder stale."""
    import errno

    real, failures = os.utime, [3]

    def flaky(path, *a, **k):
        if str(path).endswith("entry.lock") and failures[0]:
            failures[0] -= 1
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path, *a, **k)

    monkeypatch.setattr(os, "utime", flaky)
    with caplog.at_level(logging.WARNING, logger="slm.data.locks"):
        with CacheLock(tmp_path / "entry", "x", heartbeat_s=0.05):
            first = (tmp_path / "entry.lock").stat().st_mtime_ns
            time.sleep(0.6)
            assert failures[0] == 0 and (tmp_path / "entry.lock").stat().st_mtime_ns > first
    assert sum("could not touch" in r.message for r in caplog.records) == 1


def test_every_process_of_a_job_waits_on_another_jobs_lock_as_long_as_it_lasts(tmp_path):
    """Issue 37 item 3: a job's other processes do not sit in a collective (which times out) while their main
    process waits on another job's lock: they wait on the lock themselves, until their own job holds it."""
    import threading

    from slm.data.locks import wait_for_holder

    other = _holder(tmp_path / "entry", 1.5)  # another job holds it for 1.5 s
    ours = "token-of-our-job"
    took = {}

    def main_process():
        with CacheLock(tmp_path / "entry", "the entry", token=ours):
            took["at"] = time.monotonic()
            time.sleep(0.3)  # the main process holds it while the others join it

    started = time.monotonic()
    main = threading.Thread(target=main_process)
    main.start()
    wait_for_holder(tmp_path / "entry", "the entry", ours)  # what every other process of the job does
    waited = time.monotonic() - started
    main.join()
    other.wait()
    assert waited > 1.0 and took["at"] - started > 1.0  # through the other job's whole hold


def test_the_dead_process_rule_needs_the_same_machine_not_only_the_same_host_name(tmp_path):
    """Issue 37 item 4 (decided): containers often share a host name; a dead pid is judged only for a lock
    written on this very machine (host name, boot and process namespace). Another machine with our host name
    is taken over only once its heartbeat has stopped for stale_s."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owner = {"host": socket.gethostname(), "machine": "another-container", "pid": gone.pid, "since": time.time()}
    (tmp_path / "entry.lock").write_text(json.dumps(owner))
    started = time.monotonic()
    with CacheLock(tmp_path / "entry", "x", stale_s=0.8):
        waited = time.monotonic() - started
    assert waited > 0.7
