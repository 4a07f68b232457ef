"""Preemption: SIGTERM/SIGINT become a request that long loops honour at a safe boundary.

Preemptible capacity (SLURM `--requeue`, spot VMs, TPU maintenance) sends SIGTERM and kills
the job a little later. Instead of dying mid-step, a loop inside `PreemptionGuard` polls
`requested` at its step boundary, makes its work durable (checkpoint, committed rows,
flushed metrics) and raises `Preempted`; the CLI turns that into exit status
`PREEMPTED_EXIT`, on which `launch/` scripts requeue or rerun the same command, which
resumes. A second signal while the first is being honoured restores the default action:
a user who presses Ctrl-C twice still gets out at once.
"""

from __future__ import annotations

import signal
import threading

from glp_jax.errors import GLPError

# EX_TEMPFAIL from sysexits.h: "try again later". Launchers requeue on exactly this status.
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(GLPError):
    """The work stopped on a signal after making its progress durable; rerun to resume."""

    exit_code = PREEMPTED_EXIT

    def __init__(self, message: str, signal_name: str, where: str = ""):
        super().__init__(message)
        self.signal_name, self.where = signal_name, where


class PreemptionGuard:
    """Context manager: while active, the first SIGTERM/SIGINT only sets `requested`.

    Handlers can be installed only from the main thread; elsewhere (a test's worker thread,
    an embedding application) the guard is inert and signals keep their usual effect.
    """

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._event = threading.Event()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, signal_name: str = "request") -> None:
        """Ask for a stop as a signal would (tests, or a program embedding the loop)."""
        self.signal_name = self.signal_name or signal_name
        self._event.set()

    def _handle(self, signum, frame) -> None:
        if self._event.is_set():  # second signal: give the default action back, then re-raise
            self._restore()
            signal.raise_signal(signum)
            return
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()

    def stop(self, where: str, durable: str) -> Preempted:
        """The exception to raise once progress is durable: names the signal, the place
        and what was kept."""
        name = self.signal_name or "signal"
        return Preempted(f"stopped on {name} {where}; {durable}; rerun the same command to "
                         "resume", name, where)
