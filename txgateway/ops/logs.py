"""The daemon's own log under twistd: where it goes, what each line says, and SIGUSR1.

twistd picks its log observer after `makeService`, from its own options: stdout under `-n`,
else a file (`--logfile`, twistd.log by default), syslog (`--syslog`), or a `--logger`
factory. `TwistdLog.from_options` reads the same options, so that:

- under `twistd -n` logging to stdout, the gateway gives twistd the observer to use
  (`ProcessRoot` sets the application's ILogObserver, the component twistd looks for before
  making its own): twistd's line format, plus `[worker N]` after the time in a `--workers`
  worker and, when stdout is the systemd journal, the sd-daemon priority prefix on every line
  (`<3>` error and critical, `<4>` warning, `<6>` info, `<7>` debug), so that `journalctl -p
  warning` finds the warnings and errors. A terminal, a file or a pipe gets the plain format.
- daemonised, stdout is /dev/null: `stdout_stream()` is then twistd's log, for
  `access_log: "-"`.
- `handle_usr1` takes SIGUSR1 without losing twistd's own use of it (rotating its log file).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LoggingFile,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.components import Componentized

from txgateway.ops.accesslog import TextStream

__all__ = ["ProcessRoot", "TwistdLog", "journal_priority_format", "on_signal", "writes_to_journal"]

# sd-daemon(3) priorities. Twisted logs every unhandled failure at "critical": in syslog
# terms those are errors, not "critical conditions" (<2>).
_PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 3}


@dataclass(frozen=True)
class TwistdLog:
    """How twistd logs this process, read from twistd's options."""

    daemon: bool = False            # twistd forks into the background: stdout is /dev/null
    to_stdout: bool = False         # the log goes to stdout: -n without --logfile, --syslog, --logger
    rotates_on_usr1: bool = False   # twistd writes its own log file and rotates it on SIGUSR1
    worker: str | None = None       # this process is worker N of a --workers parent

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TwistdLog:
        """`options` are txgateway's; twistd's are their `parent` (absent outside twistd)."""
        worker = options.get("worker")
        twistd = getattr(options, "parent", None)
        if twistd is None:
            return cls(worker=worker)
        elsewhere = bool(twistd.get("syslog") or twistd.get("logger"))
        daemon = not twistd.get("nodaemon")
        to_stdout = not daemon and not elsewhere and twistd.get("logfile") in (None, "", "-")
        return cls(daemon, to_stdout, not elsewhere and not to_stdout, worker)

    def observer(self, stdout: IO[str], environ: Mapping[str, str]) -> FileLogObserver | None:
        """The observer twistd should use, or None to let twistd make its own (not stdout)."""
        if not self.to_stdout:
            return None
        stamp: Callable[[float | None], str] = formatTime
        if self.worker is not None:
            tag = f" [worker {self.worker}]"

            def stamp(when: float | None) -> str:
                return formatTime(when) + tag

        def classic(event: LogEvent) -> str | None:
            return formatEventAsClassicLogText(event, formatTime=stamp)

        text = journal_priority_format(classic) if writes_to_journal(stdout, environ) else classic
        return FileLogObserver(stdout, text)

    def stdout_stream(self) -> TextStream:
        """Where `access_log: "-"` writes: stdout, or twistd's log when daemonised (a
        LoggingFile: each line one event of namespace txgateway.access)."""
        if self.daemon:
            return LoggingFile(Logger(namespace="txgateway.access"))
        return sys.stdout

    def handle_usr1(self, reactor: Any, action: Callable[[], None]) -> None:
        """Run `action` in the reactor thread on SIGUSR1. When twistd writes its own log file,
        it installs a SIGUSR1 handler rotating it after `makeService`, and only if none is set
        yet: ours then goes in once the reactor runs, and passes each signal on to twistd's.
        Otherwise ours goes in at once (SIGUSR1 kills a process that does not handle it)."""
        if self.rotates_on_usr1:
            reactor.addSystemEventTrigger("after", "startup", on_signal, reactor, signal.SIGUSR1, action)
        else:
            on_signal(reactor, signal.SIGUSR1, action)


def on_signal(reactor: Any, signum: int, action: Callable[[], None]) -> None:
    """Run `action` in the reactor thread when `signum` arrives, then the handler it replaces."""
    previous = signal.getsignal(signum)

    def handler(number: int, frame: Any) -> None:
        reactor.callFromThread(action)
        if callable(previous):
            previous(number, frame)

    signal.signal(signum, handler)


def writes_to_journal(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Whether `stream` is the systemd journal: systemd sets JOURNAL_STREAM to the
    "device:inode" of the stream it connects stdout/stderr to (systemd.exec(5))."""
    expected = environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):       # no file descriptor (a test's captured stream)
        return False
    return f"{st.st_dev}:{st.st_ino}" == expected


def journal_priority_format(text: Callable[[LogEvent], str | None]) -> Callable[[LogEvent], str | None]:
    """`text` with each line of an event prefixed by its sd-daemon priority ("<4>"): the
    journal stores each line as an entry of its own, a traceback's included."""

    def prefixed(event: LogEvent) -> str | None:
        formatted = text(event)
        if not formatted:
            return formatted
        prefix = "<%d>" % _PRIORITY.get(event.get("log_level", LogLevel.info), 6)
        return "".join(prefix + line for line in formatted.splitlines(keepends=True))

    return prefixed


class ProcessRoot(MultiService):
    """The service twistd runs. Added to twistd's application, it sets the application's
    ILogObserver (when `log_observer` is not None), which twistd then logs to."""

    def __init__(self, log_observer: FileLogObserver | None) -> None:
        super().__init__()
        self.log_observer = log_observer

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)
