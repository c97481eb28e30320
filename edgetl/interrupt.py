"""SIGINT and SIGTERM as an exception that unwinds the build, so that every `with`/`finally` cleans up:
the temporary folder goes, a staged bundle is discarded, a bundle already at OUT/<target> stays.

The CLI turns it into exit 128 + the signal's number (130 for SIGINT, 143 for SIGTERM) and one line.
`Interrupted` is a KeyboardInterrupt, so library code that handles Ctrl-C (torch's DataLoader
workers) handles it too, and no `except Exception` swallows it. Steps that must not be cut in two
(publishing renames, removing a folder) run inside `deferred()`: a signal that arrives there is
held and raised when the step is done. A second signal during the clean-up is noted and ignored;
a third quits at once, without cleaning up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
cancelled = threading.Event()  # set by the first signal; threads stop at their next `check()`
_state: dict = {"active": False, "signum": 0, "count": 0, "deferring": 0, "pending": False, "expected": [],
                "published": []}


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
        if _state["deferring"]:
            _state["pending"] = True  # raised when the deferred step is done
            return
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
    _state.update(active=True, signum=0, count=0, deferring=0, pending=False, expected=[], published=[])
    try:
        yield
    finally:
        _state["active"] = False
        for s, h in previous.items():
            signal.signal(s, h)


def caught_elsewhere(signum: int) -> Interrupted:
    """A signal another handler took (torch elastic's): recorded as if ours had, to raise."""
    _state["count"] = max(_state["count"], 1)
    _state["signum"] = _state["signum"] or signum
    cancelled.set()
    return Interrupted(signum)


def in_worker() -> None:
    """In a DataLoader worker: the parent owns the shutdown. A worker ignores SIGINT and SIGTERM (a
    Ctrl-C reaches the whole process group): the parent unwinds and stops its workers, and torch's
    watchdog ends a worker whose parent is gone. A worker that died of the signal itself could do so
    while the parent was receiving a shared file descriptor from it (a traceback from
    multiprocessing's resource sharer thread after the one edgetl line)."""
    _state.update(deferring=0, pending=False, active=False)
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def reinstall() -> None:
    """Take SIGINT/SIGTERM back after a library installed its own handlers (torch elastic's launcher)."""
    if _state["active"] and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


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


def pending() -> Interrupted | None:
    """The interrupt this process has had, if any (an error a signal caused is that interrupt)."""
    return Interrupted(_state["signum"] or signal.SIGINT) if cancelled.is_set() else None


def check() -> None:
    """For work off the main thread (signals reach only the main one), and for an error that a
    signal caused (a killed worker): once interrupted, raise Interrupted here."""
    if cancelled.is_set():
        raise Interrupted(_state["signum"] or signal.SIGINT)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT/SIGTERM back for a step that must not be cut in two; raise it once the step is done.
    (Python runs signal handlers in the main thread, whichever thread the kernel gave the signal to,
    so a flag the handler reads holds where a thread's signal mask would not.)"""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if not _state["deferring"] and _state["pending"]:
        _state["pending"] = False
        raise Interrupted(_state["signum"])


@contextlib.contextmanager
def temporary_folder(prefix: str, dir: Path | None = None):
    """tempfile.TemporaryDirectory whose making and removing a signal cannot cut in two."""
    with deferred():
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    try:
        yield path
    finally:
        with deferred():
            shutil.rmtree(path, ignore_errors=True)
