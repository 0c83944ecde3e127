"""Stop requests from signals, honoured at the next step boundary.

Ctrl-C (SIGINT), SIGTERM (what SLURM sends before preempting or at the time limit) and SIGUSR1
(submitit's warning) only set a flag; the training loop checks it after each optimizer step on
every process, writes a checkpoint and stops. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopSignals:
    """Context manager: while active, the signals above set ``requested`` instead of killing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False
