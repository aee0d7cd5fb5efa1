"""`--workers N`: N gateway processes sharing the listening sockets, under a supervising parent.

The parent binds every `tcp:`/`tcp6:` listener itself, then starts N workers (`twistd -n
txgateway --config FILE --worker I --inherit-fds ...`) that adopt those sockets: the kernel
spreads connections over the workers' accept calls. The parent serves nothing; it restarts a
worker that dies (1 s, doubling up to 30 s while it keeps dying), forwards SIGHUP (reload) and
SIGUSR1 (reopen the access log) to every worker, and on SIGTERM asks them to drain and waits up
to `drain_timeout` + 5 s. The workers write their log (and `access_log: "-"`) to the parent's
stdout, each line tagged with the worker's number.

State is per worker except what lives in Redis: use `backend: redis` or `hybrid` for limits
that hold across workers (with `local`, N workers admit up to N times the rate). The admin
listener and the Manhole run in worker 0 only (their ports cannot be shared); /metrics and
/status there count every worker, from the files the workers write in a directory the parent
makes and removes (ops/workerstats.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from txgateway.config.schema import Config
from txgateway.ops.logs import on_signal
from txgateway.ops.workerstats import STATE_DIR
from txgateway.transport.endpoints import ListenerError, cannot_listen

__all__ = ["WorkerSupervisor", "bind_listener", "check_shareable"]

_log = Logger(namespace="txgateway.service.workers")
WORKERS_PARENT = "TXGATEWAY_WORKERS_PARENT"   # in a worker's environment: its parent's pid
_FIRST_FD = 3
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def bind_listener(endpoint: str) -> socket.socket:
    """A bound, listening socket for a `tcp:PORT[:interface=ADDR][:backlog=N]` (or tcp6:)
    endpoint string, inheritable by child processes."""
    parts = [p.replace("\\:", ":") for p in _UNESCAPED_COLON.split(endpoint)]
    kind = parts[0]
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"--workers shares tcp: and tcp6: listeners only, not {endpoint!r}")
    positional = [p for p in parts[1:] if "=" not in p]
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = positional[0] if positional else options.pop("port", "")
    unknown = sorted(set(options) - {"interface", "backlog"})
    if len(positional) > 1 or unknown or not port.isdigit() or options.get("interface") == "":
        # e.g. an IPv6 interface with unescaped colons ("interface=::1" must be "interface=\:\:1"):
        # guessing would bind every interface.
        raise ValueError(f"cannot read the listener {endpoint!r}: expected tcp:PORT[:interface=ADDR][:backlog=N]"
                         " (escape colons in IPv6 addresses: interface=\\:\\:1)")
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = options.get("interface", "::" if family == socket.AF_INET6 else "0.0.0.0")
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((interface, int(port)))
    except OSError as e:
        sock.close()
        raise CannotListenError(interface, int(port), e) from None
    sock.listen(int(options.get("backlog", "1024")))
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def check_shareable(config: Config) -> list[str]:
    """What keeps --workers from sharing this config's listeners (empty: nothing)."""
    problems = []
    for i, listener in enumerate(config.listen):
        kind = listener.endpoint.split(":", 1)[0]
        if kind not in ("tcp", "tcp6"):
            problems.append(f"--workers shares tcp: and tcp6: listeners only; listen[{i}] is {listener.endpoint!r}")
    return problems


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.supervisor.worker_ended(self, reason.value.exitCode, reason.value.signal)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    def __init__(self, config: Config, count: int, reactor: Any) -> None:
        self.config = config
        self.count = count
        self.reactor = reactor
        self.sockets: list[socket.socket] = []
        self.workers: dict[int, Any] = {}        # index -> IProcessTransport
        self.protocols: dict[int, _Worker] = {}
        self.restarts: dict[int, int] = {}
        self._started_at: dict[int, float] = {}
        self._stopping = False
        self.state_dir: str | None = None        # the workers' counters (ops/workerstats.py)

    def privilegedStartService(self) -> None:
        # Bind before dropping privileges (twistd --uid), like any listener.
        for i, listener in enumerate(self.config.listen):
            try:
                self.sockets.append(bind_listener(listener.endpoint))
            except CannotListenError as e:
                raise ListenerError(f"listen[{i}] ({listener.endpoint}) {cannot_listen(e)}") from None
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if not self.sockets:
            self.privilegedStartService()
        self._forward_signals()          # before the workers exist: an early SIGHUP must not kill us
        self.state_dir = tempfile.mkdtemp(prefix="txgateway-workers-")
        for index in range(self.count):
            self._spawn(index)

    def _argv(self, index: int) -> list[str]:
        fds = ",".join(str(_FIRST_FD + i) for i in range(len(self.sockets)))
        # -P: without the working directory on sys.path, which could hold another txgateway (a checkout)
        return [sys.executable, "-P", "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
                "-n", "--pidfile=", "txgateway", "--config", self.config.file, "--worker", str(index),
                "--inherit-fds", fds]

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for i, sock in enumerate(self.sockets):
            child_fds[_FIRST_FD + i] = sock.fileno()
        protocol = _Worker(self, index)
        self.protocols[index] = protocol
        self._started_at[index] = self.reactor.seconds()
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}   # the parent notifies systemd
        env[WORKERS_PARENT] = str(os.getpid())
        if self.state_dir is not None:
            env[STATE_DIR] = self.state_dir
        transport = self.reactor.spawnProcess(protocol, sys.executable, self._argv(index), env=env,
                                              childFDs=child_fds)
        self.workers[index] = transport
        _log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def worker_ended(self, worker: _Worker, code: int | None, signum: int | None) -> None:
        self.workers.pop(worker.index, None)
        if self._stopping:
            _log.info("worker {index} stopped (exit {code})", index=worker.index, code=code)
            return
        lived = self.reactor.seconds() - self._started_at.get(worker.index, 0.0)
        failures = 0 if lived > 60 else self.restarts.get(worker.index, 0) + 1
        self.restarts[worker.index] = failures
        delay = min(30.0, 2.0 ** max(0, failures - 1))
        _log.warn("worker {index} died ({how}); restarting in {delay:g}s", index=worker.index, delay=delay,
                  how=f"signal {signum}" if signum else f"exit {code}")
        self.reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self.workers:
            self._spawn(index)

    def _forward_signals(self) -> None:
        """SIGHUP and SIGUSR1 go on to every worker (SIGUSR1 also to twistd's own handler:
        it rotates the parent's log file when twistd writes one)."""
        on_signal(self.reactor, signal.SIGHUP, lambda: self.signal_workers("HUP"))
        on_signal(self.reactor, signal.SIGUSR1, lambda: self.signal_workers(signal.SIGUSR1))

    def signal_workers(self, signum: str | int) -> None:
        """`signum`: a signal number, or a name Twisted knows ("HUP", "INT", "KILL", "TERM")."""
        for transport in list(self.workers.values()):
            try:
                transport.signalProcess(signum)
            except ProcessExitedAlready:   # it exited in the meantime
                pass

    def stopService(self) -> Deferred[Any]:
        """Ask every worker to drain (SIGTERM), then SIGKILL whatever is left after
        drain_timeout + 5 s."""
        self._stopping = True
        super().stopService()
        for sock in self.sockets:      # new connections are refused from now on, as without --workers
            sock.close()
        waiting = [p.ended for i, p in self.protocols.items() if i in self.workers]
        self.signal_workers("TERM")
        kill = self.reactor.callLater(self.config.drain_timeout + 5.0, self.signal_workers, "KILL")
        done: Deferred[Any] = DeferredList(waiting)

        def finished(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            if self.state_dir is not None:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            return result

        return done.addBoth(finished)
