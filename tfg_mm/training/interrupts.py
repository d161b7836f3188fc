"""A run stopped from outside: SIGTERM (what SLURM sends at a time limit or on preemption, and ``kill``, systemd,
Docker), SIGINT (Ctrl-C in a terminal) and SIGUSR1 (SLURM's ``--signal`` warning before the time limit).

Within :func:`stop_on_signals` the first such signal abandons the current step: it raises :class:`RunInterrupted`
in the main thread, which the experiment records as ``status: interrupted`` (signal, epoch, step, time) before it
propagates; the state of the last saved epoch stays, so the same command resumes the run to the same history. A
second signal during that cleanup is ignored (the record is written once). The command line turns the exception
into one line and the conventional exit code, ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

#: The signals that stop a run (SIGUSR1 only where the platform has it).
STOP_SIGNALS: tuple[int, ...] = tuple(
    s for s in (getattr(signal, name, None) for name in ("SIGINT", "SIGTERM", "SIGUSR1")) if s is not None
)


class RunInterrupted(BaseException):
    """The run was stopped by a signal (not a failure of the run: a ``BaseException``, like ``KeyboardInterrupt``)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.signal = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, :data:`STOP_SIGNALS` raise :class:`RunInterrupted` (the first one; later ones are
    ignored until the block ends); the previous handlers are restored after it. A signal the process was started
    ignoring (SIGINT of a job a non-interactive shell put in the background) stays ignored, as Python's own
    KeyboardInterrupt does. Outside the main thread (a notebook's worker thread, a test runner's) signals cannot
    be handled: the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):  # noqa: ARG001  (the signal module's signature)
        if fired:  # the first signal is being handled: the record is written once
            return
        fired.append(signum)
        raise RunInterrupted(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:  # ignored on purpose (a background job's SIGINT): kept so
            continue
        try:
            previous[signum] = signal.signal(signum, handler)
        except (ValueError, OSError):  # not settable here (e.g. an embedded interpreter)
            continue
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
