"""A lock on a shared cache entry that holds on the filesystems clusters share (NFS, Lustre, GPFS), where
``fcntl`` locks may not reach across machines.

The lock is a file created atomically (``O_CREAT | O_EXCL``) beside the entry, naming its owner (host, pid,
when). While held, a background thread touches it every :data:`HEARTBEAT_S` seconds. A waiter takes the lock
over when its owner is gone: at once when the owner is a process of this machine that no longer exists, else
when the heartbeat has stopped for :data:`STALE_S` seconds (its machine died, or its job was killed). Taking
over renames the stale file aside first (one waiter's rename wins; one that moved a fresh lock instead, taken
by a faster waiter meanwhile, puts it back). Waiters say once what they wait for. Machines' clocks must agree
to within ``STALE_S`` (the file's time is the server's).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # how often a holder touches its lock file
STALE_S = 120.0  # a lock file not touched for this long belongs to a holder that is gone
POLL_S = 0.2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class CacheLock:
    """``with CacheLock(path, "what it guards"):`` prepare the entry; see the module docstring."""

    def __init__(self, path: str | os.PathLike, what: str, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.path, self.what = Path(str(path) + ".lock"), what
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _gone(self) -> tuple[str | None, os.stat_result | None]:
        """(why the current holder is gone, or None while it holds; the lock file's stat then), or
        ("released", None) when there is no lock file any more."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return "released", None
        owner = self._owner()
        if owner.get("host") == socket.gethostname() and owner.get("pid") and not _alive(int(owner["pid"])):
            return f"its holder (pid {owner['pid']} on this machine) is gone", st
        age = time.time() - st.st_mtime
        if age > self.stale_s:
            return f"its holder ({owner.get('host')}, pid {owner.get('pid')}) has not touched it for {age:.0f} s", st
        return None, st

    def _take_over(self, stale: os.stat_result, why: str) -> None:
        """Move the stale lock file aside (one waiter's rename finds it); had another waiter already replaced it
        with its own, fresh one, put that back where it was."""
        aside = self.path.with_name(f"{self.path.name}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another waiter took it over first
        moved = aside.stat()
        if (moved.st_ino, moved.st_mtime_ns) != (stale.st_ino, stale.st_mtime_ns):
            try:
                os.link(aside, self.path)  # a fresh holder's lock: restore it (unless the path is taken again)
            except FileExistsError:
                pass
        else:
            log.warning("cache: took over the lock of %s: %s", self.what, why)
        os.unlink(aside)

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        said = False
        while not self._try_create():
            why, stat = self._gone()
            if why == "released":
                continue
            if why is not None:
                self._take_over(stat, why)
                continue
            if not said:
                owner = self._owner()
                log.info(
                    "cache: waiting for %s, which another job (%s, pid %s) is preparing; it is reused when ready",
                    self.what,
                    owner.get("host"),
                    owner.get("pid"),
                )
                said = True
            time.sleep(POLL_S)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="slm-cache-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
