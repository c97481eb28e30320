"""SIGINT and SIGTERM as an exception that unwinds the build, so that every `with`/`finally` cleans up:
the temporary folder goes, a staged bundle is discarded, a bundle already at OUT/<target> stays.

The CLI turns it into exit 128 + the signal's number (130 for SIGINT, 143 for SIGTERM) and one line.
`Interrupted` is a KeyboardInterrupt, so library code that handles Ctrl-C (torch's DataLoader
workers) handles it too, and no `except Exception` swallows it. A second signal during the
clean-up is noted and ignored; a third quits at once, without cleaning up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
cancelled = threading.Event()  # set by the first signal; threads stop at their next `check()`
_state: dict = {"signum": 0, "count": 0, "expected": [], "published": []}


class Interrupted(KeyboardInterrupt):
    """The build was interrupted by a signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _handler(signum, frame):
    _state["count"] += 1
    if _state["count"] == 1:
        _state["signum"] = signum
        cancelled.set()
        raise Interrupted(signum)
    if _state["count"] == 2:
        log.warning("%s again: still cleaning up; a third signal quits at once, leaving temporary files",
                    signal.Signals(signum).name)
        return
    os._exit(128 + signum)


@contextlib.contextmanager
def as_exceptions():
    """While inside (main thread only): SIGINT and SIGTERM raise Interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    cancelled.clear()
    _state.update(signum=0, count=0, expected=[], published=[])
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def expect(targets: list[str]) -> None:
    """The targets this build is to publish (for the line an interrupt ends with)."""
    _state["expected"] = list(targets)


def record_published(target: str) -> None:
    """Called inside `deferred()` once a bundle is in place, so the record and the rename are one step."""
    _state["published"].append(target)


def unpublished() -> tuple[list[str], list[str]]:
    """(published, not published) among the expected targets."""
    done = list(_state["published"])
    return done, [t for t in _state["expected"] if t not in done]


def check() -> None:
    """For work off the main thread (signals reach only the main one): stop here once interrupted."""
    if cancelled.is_set():
        raise Interrupted(_state["signum"] or signal.SIGINT)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT/SIGTERM back for a few lines that must not be cut in two (a publishing rename)."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover (Windows)
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
