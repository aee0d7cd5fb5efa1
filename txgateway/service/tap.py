"""`twistd txgateway`: options and the service it runs.

The only place that picks the real reactor; everything below takes it as an argument.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.python import usage

from txgateway import __version__
from txgateway.config.schema import ConfigError, load_config
from txgateway.ops.logs import ProcessRoot, TwistdLog
from txgateway.transport.endpoints import ListenerError, cannot_listen

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[--config FILE | --demo]"
    longdesc = ("Run the txgateway API gateway. --config names the YAML file (see etc/txgateway.yaml); "
                "--demo needs nothing: it serves on 127.0.0.1:8080 with in-process demo upstreams, its admin "
                "listener on 8081 (TXGATEWAY_DEMO_PORTS=gateway=N,admin=N moves them).")
    optParameters = [
        ["config", "c", None, "Path to the YAML config file."],
        ["workers", None, None, "Run N worker processes sharing the listening sockets, under a supervising "
                                "parent (restarts a dead worker, forwards SIGHUP, drains on SIGTERM)."],
        ["worker", None, None, "(internal) this process is worker number N of a --workers parent."],
        ["inherit-fds", None, None, "(internal) listening sockets inherited from the --workers parent."],
    ]
    optFlags = [
        ["demo", None, "Run the demo: gateway on 127.0.0.1:8080 with demo upstreams users, orders, search."],
    ]

    def opt_version(self) -> NoReturn:
        """Display txgateway's version and exit."""
        print(f"txgateway {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["demo"] and self["config"]:
            raise usage.UsageError("--demo and --config exclude each other")
        if not self["demo"] and not self["config"]:
            raise usage.UsageError("--config FILE is required (or --demo to try txgateway out)")
        if self["workers"] is not None:
            if not str(self["workers"]).isdigit() or not 1 <= int(self["workers"]) <= 64:
                raise usage.UsageError(f"--workers expects a number from 1 to 64, got {self['workers']!r}")
            if self["demo"]:
                raise usage.UsageError("--workers runs a --config; the demo is one process")
        if self["config"]:
            try:
                self["loaded"] = load_config(self["config"])
            except ConfigError as e:
                # As check-config says it, without twistd's usage text (the command line was
                # right); exit status 1 before anything binds.
                raise SystemExit(e.report(self["config"])) from None


class _Daemon(ProcessRoot):
    """What twistd runs. A listener that cannot bind ends start-up with one line naming it
    (the address in use, the permission missing), exit status 1, rather than a traceback."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (ListenerError, CannotListenError) as e:    # CannotListenError: a demo upstream's
            message = f"txgateway: {e if isinstance(e, ListenerError) else cannot_listen(e)}"
            # Said now, on stderr (which twistd logs), so the line is in the log file before the
            # parent of a daemonised process is told and exits. twistd must still see the
            # exception: it tells that parent and removes the pid file. The interpreter then
            # prints nothing where it would print the traceback.
            print(message, file=sys.stderr)
            sys.excepthook = lambda *exc_info: None
            raise ListenerError(message[len("txgateway: "):]) from None


def _tune_for_throughput(reactor: Any) -> None:
    """Process-wide settings for the real daemon (tests keep the stock reactor)."""
    from txgateway.core.reactor import make_lean
    make_lean(reactor)
    import gc
    tune_gc()
    reactor.addSystemEventTrigger("after", "startup", _stop_cleanly_on_sigterm, reactor)
    # Frozen again once the services are up: the config's pipelines and pools and, with
    # tracing:, the OpenTelemetry and protobuf modules are made after the first freeze, and
    # the first young collection while serving walked them all (docs/performance.md, trace4).
    reactor.addSystemEventTrigger("after", "startup", gc.freeze)


def _stop_cleanly_on_sigterm(reactor: Any) -> None:
    """SIGTERM means "drain and exit": stop the reactor (services drain in their stopService)
    without recording the signal, which twistd would otherwise re-raise on itself at the end
    (exit status -15 instead of 0). Installed after the reactor's own handlers."""
    import signal

    def stop() -> None:
        from twisted.internet.error import ReactorNotRunning
        from twisted.logger import Logger
        Logger(namespace="txgateway").info("SIGTERM: draining in-flight requests, then exit 0")
        try:
            reactor.stop()
        except ReactorNotRunning:   # a second SIGTERM while draining
            pass

    def drain(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    signal.signal(signal.SIGTERM, drain)


def tune_gc() -> None:
    """Requests allocate many short-lived objects; collecting the young generation every
    700 allocations costs a few percent for nothing. Objects alive at start are frozen out."""
    import gc
    gc.freeze()
    gc.set_threshold(20000, 20, 20)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """`reactor` is for tests; without it this is the real daemon (signals, tuning)."""
    daemon = reactor is None
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
        _tune_for_throughput(reactor)
    log = TwistdLog.from_options(options)
    top = _Daemon(log.observer(sys.stdout, os.environ))
    if options["demo"]:
        from txgateway.service.demo import demo_service
        demo_service(reactor, os.environ, log.stdout_stream()).setServiceParent(top)
        return top
    config = options["loaded"]
    if options["workers"] is not None and options["worker"] is None:
        from txgateway.service.workers import WorkerSupervisor, check_shareable
        problems = check_shareable(config)
        if log.daemon:
            problems.append("--workers needs twistd -n (as systemd runs it): the workers log to the parent's stdout, "
                            "which a daemonised twistd closes")
        if problems:
            raise SystemExit("txgateway: " + "; ".join(problems))
        WorkerSupervisor(config, int(options["workers"]), reactor).setServiceParent(top)
        if daemon:       # the parent is the unit's main process: it says ready and stopping
            reactor.addSystemEventTrigger("after", "startup", notify_systemd, "READY=1")
            reactor.addSystemEventTrigger("before", "shutdown", notify_systemd, "STOPPING=1")
        return top
    from txgateway.ops.workerstats import STATE_DIR
    from txgateway.service.gateway import Gateway  # not in a --workers parent: it serves nothing
    if options["worker"] is not None:
        _exit_with_parent()
    inherited = [int(fd) for fd in options["inherit-fds"].split(",")] if options["inherit-fds"] else None
    try:
        gateway = Gateway(config, reactor, inherited_fds=inherited, operations=options["worker"] in (None, "0"),
                          stdout=log.stdout_stream(), workers_state=os.environ.get(STATE_DIR) if options["worker"] is not None else None,
                          worker=int(options["worker"] or 0))
    except ListenerError as e:
        raise SystemExit(f"txgateway: {e}") from None
    gateway.setServiceParent(top)
    if daemon:
        _reload_on_sighup(reactor, gateway)  # now: a SIGHUP during start-up must not kill us
        log.handle_usr1(reactor, gateway.reopen_access_log)
        reactor.addSystemEventTrigger("after", "startup", notify_systemd, "READY=1")
        reactor.addSystemEventTrigger("before", "shutdown", notify_systemd, "STOPPING=1")
    return top


def notify_systemd(state: str) -> None:
    """sd_notify for `Type=notify` units: READY=1 once every listener is bound (systemd then
    starts ordering reloads and dependants after it), STOPPING=1 when draining begins."""
    import os
    import socket
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            pass


def _exit_with_parent() -> None:
    """A --workers worker gets SIGTERM (drain) when its parent dies, rather than serving on
    as an orphan nobody supervises (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op). A parent
    that died while the worker was still starting, before this ran, sends nothing: the worker
    then stops here."""
    import ctypes
    import os
    import signal

    from txgateway.service.workers import WORKERS_PARENT
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.environ.get(WORKERS_PARENT)
    if parent and os.getppid() != int(parent):
        raise SystemExit(f"txgateway: the --workers parent (pid {parent}) is gone; this worker stops")


def _reload_on_sighup(reactor: Any, gateway: Any) -> None:
    """SIGHUP (`systemctl reload`, or logrotate) reopens a file access log and re-reads the
    config file, in the reactor thread."""
    import signal

    def reopen_and_reload() -> None:
        gateway.reopen_access_log()
        gateway.reload()

    def reload(signum: int, frame: Any) -> None:
        reactor.callFromThread(reopen_and_reload)

    signal.signal(signal.SIGHUP, reload)

