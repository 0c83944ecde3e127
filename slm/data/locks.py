"""A lock on a shared cache entry that holds on the filesystems clusters share (NFS, Lustre, GPFS), where
``fcntl`` locks may not reach across machines.

The lock is a file created atomically (``O_CREAT | O_EXCL``) beside the entry, naming its owner (host, machine,
pid, when) and a token of its own. While held, a background thread touches it every :data:`HEARTBEAT_S` seconds
(a failed touch, such as NFS's ESTALE, is retried at the next beat with one warning: the heartbeat never stops
while the lock is held). A waiter takes the lock over when its owner is gone: at once when the owner is a process
of this very machine that no longer exists, else when the heartbeat has stopped for :data:`STALE_S` seconds (its
machine died, its job was killed, or it was suspended). Taking over renames the stale file aside first (one
waiter's rename wins; one that moved a fresh lock instead, taken by a faster waiter meanwhile, puts it back).
Waiters say once what they wait for. Machines' clocks must agree to within ``STALE_S`` (the file's time is the
server's).

Decided, with what follows from it:
- A holder knows the lock by its token. It releases only a lock file that still holds its token, and
  :meth:`CacheLock.confirm` (called before publishing an entry) raises :class:`LockLost` when it is not: a
  holder suspended past the stale time (Ctrl-Z, a paused VM) and taken over neither deletes its successor's lock
  nor publishes over its successor's work.
- Three waiters can still race in a take-over (a loser's rename-aside and link-back can delete the winner's
  fresh lock while a third creates one). The tokens make that visible instead of silent: the winner's
  ``confirm`` fails and it stops before publishing, and nobody releases a lock that is not theirs.
- "This machine" is the host name *and* its boot and process namespace (containers often share a host name,
  and a pid means nothing in another container): a lock written elsewhere is judged by its heartbeat alone.
- Every process of a multi-process job waits on another job's lock itself (:func:`wait_for_holder`), as long
  as the lock is held, instead of sitting in a collective that times out while its main process waits.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # how often a holder touches its lock file
STALE_S = 120.0  # a lock file not touched for this long belongs to a holder that is gone
POLL_S = 0.2


class LockLost(RuntimeError):
    """The lock was taken over by another job while this holder was away: do not publish."""


def machine_id() -> str:
    """This machine, as a pid is meaningful on it: the host name, the boot, and the process namespace."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:  # not Linux: the host name alone
        pass
    return "/".join(parts)


def _read_owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_for_holder(entry: str | os.PathLike, what: str, token: str) -> None:
    """On every process of a job but the one that takes the lock on ``entry``: wait until the lock names this
    job's ``token`` (its main process holds it), however long another job holds it first; say once what it waits
    for. The main process keeps the lock until the others have joined it (its first collective comes after)."""
    path, said = Path(str(entry) + ".lock"), False
    while _read_owner(path).get("token") != token:
        if not said:
            log.info("cache: waiting for %s (this job's main process takes it once it is free)", what)
            said = True
        time.sleep(POLL_S)


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

    def __init__(
        self,
        path: str | os.PathLike,
        what: str,
        stale_s: float = STALE_S,
        heartbeat_s: float = HEARTBEAT_S,
        token: str | None = None,
    ):
        """``token``: what names this holder in the lock file (a job's processes share their main process's,
        see :func:`wait_for_holder`); a fresh one by default."""
        self.path, self.what = Path(str(path) + ".lock"), what
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.token = token or uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _owner(self) -> dict:
        return _read_owner(self.path)

    def _ours(self) -> bool:
        return self._owner().get("token") == self.token

    def _gone(self) -> tuple[str | None, os.stat_result | None]:
        """(why the current holder is gone, or None while it holds; the lock file's stat then), or
        ("released", None) when there is no lock file any more."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return "released", None
        owner = self._owner()
        here = owner.get("machine") == machine_id() if "machine" in owner else owner.get("host") == socket.gethostname()
        if here and owner.get("pid") and not _alive(int(owner["pid"])):
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
        owner = {"host": socket.gethostname(), "machine": machine_id(), "pid": os.getpid(), "since": time.time()}
        with os.fdopen(fd, "w") as f:
            json.dump({**owner, "token": self.token}, f)
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
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError as e:  # transient (NFS's ESTALE/EIO, a waiter's rename-aside): try again next beat
                if not warned:
                    log.warning("cache: could not touch the lock of %s (%s); retrying while it is held", self.what, e)
                    warned = True

    def confirm(self) -> None:
        """Raise :class:`LockLost` unless the lock is still this holder's: call it before publishing the entry."""
        if not self._ours():
            owner = self._owner()
            raise LockLost(
                f"the lock of {self.what} was taken over by another job ({owner.get('host')}, pid {owner.get('pid')}) "
                "while this one was away (suspended past its stale time?): that job builds it now; run again to "
                "reuse it when it is ready"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, if it is still this holder's (a lock another job took
        over is left to that job, with a warning)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if not self._ours():
            if self.path.exists():
                log.warning("cache: the lock of %s was lost to another job while held here; leaving it to that job",
                            self.what)  # fmt: skip
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
