"""Real redis-server / redis-sentinel processes for tests (rate limits on Redis, outages, failover).

Real processes, because the behaviour under test (a reconnecting client, a server that dies
mid-request, a Sentinel promoting a replica) is exactly what fakes get wrong. The module stays
synchronous and reactor-free: it talks RESP over a plain socket and never imports txredisapi,
whose import installs the global reactor. Every wait is bounded and every process is killed by
the end of the session (stop(), an atexit hook, and on Linux a parent-death signal).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Self, TypeVar

HOST = "127.0.0.1"
MASTER_NAME = "mymaster"
START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
FAILOVER_TIMEOUT = 15.0
REPLICATION_TIMEOUT = 10.0
POLL_INTERVAL = 0.02

T = TypeVar("T")

# Every process started here and not yet stopped: killed at interpreter exit, whatever happened.
_LIVE: set[_RedisProcess] = set()
_LIVE_LOCK = threading.Lock()


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening right now (the kernel picks it)."""
    s = socket.socket()
    s.bind((HOST, 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def wait_for(what: str, check: Callable[[], T | None], timeout: float,
             detail: Callable[[], str] = lambda: "") -> T:
    """Poll `check` until it returns something other than None/False; raise naming `what` after `timeout`.

    Exceptions from `check` count as "not yet" (a server still starting refuses connections);
    the last one is put in the error message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
        except (OSError, RedisReplyError) as e:
            last_error, result = e, None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            extra = detail()
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}"
                               + (f" (last error: {last_error!r})" if last_error else "")
                               + (f"\n{extra}" if extra else ""))
        time.sleep(POLL_INTERVAL)


class RedisReplyError(Exception):
    """An error reply ("-ERR ...", "-NOAUTH ...") from the server."""

    @property
    def code(self) -> str:
        """The first word of the error, e.g. "NOAUTH", "ERR", "READONLY"."""
        return str(self).split(" ", 1)[0]


# --- a tiny synchronous RESP2 client -------------------------------------------------------------

def _encode(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, (int, float)):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to redis: {arg!r}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(f: Any, decode: bool) -> Any:
    """One RESP2 reply: str (simple), RedisReplyError (error), int, str/bytes/None (bulk), list/None (array)."""
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"redis closed the connection mid-reply (read {line!r})")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        return RedisReplyError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        n = int(body)
        if n < 0:
            return None
        data = f.read(n + 2)
        if len(data) != n + 2:
            raise ConnectionError("redis closed the connection mid-reply")
        return data[:-2].decode(errors="surrogateescape") if decode else data[:-2]
    if kind == b"*":
        n = int(body)
        return None if n < 0 else [_read_reply(f, decode) for _ in range(n)]
    raise ConnectionError(f"not a RESP reply: {line!r}")


def command(port: int, *args: Any, password: str | None = None, decode: bool = True,
            timeout: float = 2.0) -> Any:
    """Send one command on a fresh connection (AUTH first when `password`), return its reply.

    A fresh connection per call keeps this correct across kill/restart. An error reply is raised
    as RedisReplyError; errors nested in an array (EXEC) are returned as RedisReplyError values.
    """
    with socket.create_connection((HOST, port), timeout=timeout) as s, s.makefile("rb") as f:
        if password is not None:
            s.sendall(_encode(("AUTH", password)))
            reply = _read_reply(f, decode=True)
            if isinstance(reply, RedisReplyError):
                raise reply
        s.sendall(_encode(args))
        reply = _read_reply(f, decode)
    if isinstance(reply, RedisReplyError):
        raise reply
    return reply


def parse_info(text: str) -> dict[str, str]:
    """INFO's "key:value" lines as a dict (section headers and blank lines dropped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            out[key] = value
    return out


# --- processes ------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: get SIGKILL when the test process dies, so even a killed pytest leaves no server."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _RedisProcess:
    """What redis-server and redis-sentinel share: a port, a log, start/stop/kill, commands."""

    what = "redis"

    def __init__(self, password: str | None = None) -> None:
        self._port = free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix=f"{self.what}-{self._port}-")
        self.proc: subprocess.Popen[bytes] | None = None

    # subclasses say how to run the process
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        return bool(self.command("PING") == "PONG")

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, f"{self.what}.log")

    def log(self) -> str:
        """The process's stdout+stderr so far (redis logs there with daemonize no)."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def start(self) -> None:
        """Start the process and block until it answers (at most START_TIMEOUT), or raise with its log."""
        if self.running:
            raise RuntimeError(f"{self.what} on port {self.port} is already running")
        os.makedirs(self.dir, exist_ok=True)
        argv = self._argv()
        linux_main_thread = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                # PDEATHSIG fires when the forking *thread* exits, so only set it from the main thread.
                preexec_fn=_die_with_parent if linux_main_thread else None)
        with _LIVE_LOCK:
            _LIVE.add(self)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {self.proc.returncode} at start: {argv}\n{self.log()}")
            return self._ready()
        try:
            wait_for(f"{self.what} on port {self.port} to answer", ready, START_TIMEOUT,
                     detail=lambda: f"argv: {argv}\nlog:\n{self.log()}")
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit within STOP_TIMEOUT. Removes its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._forget()
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed, connections reset. The port can be reused by restart()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        self._forget()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, so clients can reconnect to the same URL."""
        if self.running:
            self.stop()
        self.start()

    def _forget(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def command(self, *args: Any, auth: bool = True, decode: bool = True) -> Any:
        """Run one command (AUTH first when a password is set and `auth`); error replies raise RedisReplyError."""
        return command(self.port, *args, password=self.password if auth else None, decode=decode)

    def info(self, section: str = "default") -> dict[str, str]:
        """INFO <section> as a dict."""
        return parse_info(self.command("INFO", section))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self.port} running={self.running}>"


class RedisServer(_RedisProcess):
    """A real redis-server on 127.0.0.1, no persistence, in its own temporary directory.

    `extra_args` are appended to the command line, e.g. ("--replicaof", "127.0.0.1", "6380").
    """

    what = "redis-server"

    def __init__(self, password: str | None = None, extra_args: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(password)
        self.extra_args = list(extra_args)

    def _argv(self) -> list[str]:
        argv = [_binary("redis-server"), "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", self.dir,
                # a replica's first sync would otherwise wait 5 s for more replicas to join it
                "--repl-diskless-sync-delay", "0"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv + self.extra_args

    @property
    def url(self) -> str:
        """The redis:// URL the gateway's config takes (database 0)."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}/0"


class RedisSentinel(_RedisProcess):
    """A real Sentinel monitoring one master as MASTER_NAME (quorum 1), with short timeouts for tests."""

    what = "redis-sentinel"

    def __init__(self, master_port: int, master_host: str = HOST, master_password: str | None = None,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        super().__init__(password=None)
        self.master_host = master_host
        self.master_port = master_port
        self.master_password = master_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def conf_path(self) -> str:
        return os.path.join(self.dir, "sentinel.conf")

    def _argv(self) -> list[str]:
        # Sentinel rewrites its config file at run time, so it must be a writable file of its own.
        lines = [
            f"port {self.port}",
            f"bind {HOST}",
            "daemonize no",
            f"dir {self.dir}",
            f"sentinel monitor {MASTER_NAME} {self.master_host} {self.master_port} 1",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if self.master_password is not None:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {self.master_password}")
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        if shutil.which("redis-sentinel"):
            return [_binary("redis-sentinel"), self.conf_path]
        return [_binary("redis-server"), self.conf_path, "--sentinel"]

    def _ready(self) -> bool:
        return self._master_addr() is not None

    def _master_addr(self) -> tuple[str, int] | None:
        reply = self.command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return None if reply is None else (reply[0], int(reply[1]))

    def master_addr(self) -> tuple[str, int]:
        """(host, port) of the master as this Sentinel currently reports it."""
        addr = self._master_addr()
        if addr is None:
            raise RuntimeError(f"sentinel on port {self.port} does not know {MASTER_NAME}")
        return addr

    def replicas(self) -> list[dict[str, str]]:
        """SENTINEL REPLICAS: each replica's fields (ip, port, flags, master-link-status, ...) as a dict."""
        return [dict(zip(r[::2], r[1::2], strict=True)) for r in self.command("SENTINEL", "REPLICAS", MASTER_NAME)]

    def wait_for_replica(self, port: int, timeout: float = REPLICATION_TIMEOUT) -> None:
        """Until Sentinel knows the replica on `port` as healthy, i.e. a failover may pick it."""
        def healthy() -> bool:
            return any(int(r["port"]) == port and r["flags"] == "slave" and r.get("master-link-status") == "ok"
                       for r in self.replicas())
        wait_for(f"sentinel to see a healthy replica on port {port}", healthy, timeout,
                 detail=lambda: f"replicas: {self.replicas()}")

    def failover(self, timeout: float = FAILOVER_TIMEOUT) -> tuple[str, int]:
        """SENTINEL FAILOVER and wait until the reported master changed; returns the new (host, port).

        Retried while Sentinel answers NOGOODREPLICA (it has not yet checked a replica recently);
        INPROG (a failover already running) counts as accepted.
        """
        before = self.master_addr()
        deadline = time.monotonic() + timeout

        def ask() -> bool:
            try:
                self.command("SENTINEL", "FAILOVER", MASTER_NAME)
            except RedisReplyError as e:
                if e.code == "NOGOODREPLICA":
                    return False
                if e.code != "INPROG":
                    raise RuntimeError(f"SENTINEL FAILOVER refused: {e}") from e
            return True
        wait_for(f"sentinel to accept FAILOVER of {before}", ask, timeout, detail=self.log)
        return wait_for(f"sentinel to report a master other than {before}",
                        lambda: (addr if (addr := self._master_addr()) != before else None),
                        max(deadline - time.monotonic(), POLL_INTERVAL), detail=self.log)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (`make system-deps` installs it)")
    return path


def wait_for_replication(replica: RedisServer, timeout: float = REPLICATION_TIMEOUT) -> None:
    """Until the replica reports master_link_status:up (its initial sync is done)."""
    wait_for(f"replica on port {replica.port} to report master_link_status:up",
             lambda: replica.info("replication").get("master_link_status") == "up", timeout,
             detail=lambda: str(replica.info("replication")) if replica.running else replica.log())


@dataclass
class SentinelSetup:
    """A master, one replica of it, and a Sentinel that knows both: what a failover test needs."""

    master: RedisServer
    replica: RedisServer
    sentinel: RedisSentinel

    def server_at(self, port: int) -> RedisServer:
        """The server (master or replica, whichever it is now) listening on `port`."""
        for server in (self.master, self.replica):
            if server.port == port:
                return server
        raise KeyError(port)

    def current_master(self) -> RedisServer:
        """The server Sentinel reports as master now (the replica after a failover)."""
        return self.server_at(self.sentinel.master_addr()[1])

    def stop(self) -> None:
        """Stop everything; each stop runs even if an earlier one raised."""
        try:
            self.sentinel.stop()
        finally:
            try:
                self.replica.stop()
            finally:
                self.master.stop()


def start_sentinel_setup(password: str | None = None) -> SentinelSetup:
    """Start master, replica (--replicaof; synced), then a Sentinel that sees the replica as healthy.

    With `password`, both servers require it, the replica authenticates with it (masterauth) and
    so does Sentinel (auth-pass). Whatever was started is stopped again if a step fails.
    """
    master = RedisServer(password)
    replica_args = ["--replicaof", HOST, str(master.port)]
    if password is not None:
        replica_args += ["--masterauth", password]
    replica = RedisServer(password, replica_args)
    sentinel = RedisSentinel(master.port, master_password=password)
    setup = SentinelSetup(master, replica, sentinel)
    try:
        master.start()
        replica.start()
        wait_for_replication(replica)
        sentinel.start()
        sentinel.wait_for_replica(replica.port)
    except BaseException:
        setup.stop()
        raise
    return setup


@contextlib.contextmanager
def sentinel_setup(password: str | None = None) -> Iterator[SentinelSetup]:
    """`start_sentinel_setup` as a context manager that stops everything on exit."""
    setup = start_sentinel_setup(password)
    try:
        yield setup
    finally:
        setup.stop()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort: a test that forgot stop() must still not leave a server behind."""
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for proc in leftovers:
        with contextlib.suppress(Exception):
            proc.kill()
        shutil.rmtree(proc.dir, ignore_errors=True)
