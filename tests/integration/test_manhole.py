"""The Manhole (issue 7) driven by the real OpenSSH client against a gateway in the test reactor.

Each `ssh` is a subprocess. Its blocking reads and waits run in threads (`deferToThread`), so
the reactor keeps serving the SSH server, the gateway and the echo upstream meanwhile. Every
wait is bounded: console output is awaited with a deadline, processes get a timeout, and every
ssh still running at teardown is killed.

The console is ANSI-coloured and echoes the typed line (redrawn on each keystroke), so output
is stripped of escapes and assertions look for markers that only the console's *output* can
hold: `print("<" + "<done 1>>")` prints `<<done 1>>`, while its echo reads `"<" + "<done 1>>"`.

Tracebacks are watched in every log namespace (the `events` fixture): conch reports errors of
its session channel through the legacy `log.err` (namespace `log_legacy`, key `failure`), which
the `gateway` fixture's check, scoped to `txgateway` and `log_failure`, would not see.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.conch.manhole_ssh import ConchFactory
from twisted.conch.ssh import common, connection, transport, userauth
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer

from tests.conftest import TIMEOUT, Response, assert_envelope, parse_responses, raw, simple_config


def _tool(name: str) -> str:
    # Not a skip: without OpenSSH the Manhole would go untested without anyone noticing.
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"the Manhole tests drive the real OpenSSH client: {name} is missing "
                           "(Debian: apt-get install openssh-client)")
    return path


SSH, SSH_KEYGEN, SSH_KEYSCAN = _tool("ssh"), _tool("ssh-keygen"), _tool("ssh-keyscan")

SSH_TIMEOUT = 15.0    # for one expected piece of console output, or one ssh process to end
BREAKER = ", circuit_breaker: {consecutive_failures: 3, open_for: 30s}"

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78DEHMc]")


def clean(data: bytes) -> str:
    """Terminal output as text: NEL (ESC E) as a newline, other escapes and CRs dropped."""
    return _ANSI.sub(b"", data.replace(b"\x1bE", b"\n")).replace(b"\r", b"").decode("utf-8", "replace")


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A short command, bounded (blocking: call it in a thread once the reactor serves the Manhole)."""
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SSH_TIMEOUT)


def keygen(path: Path) -> Path:
    """A fresh ed25519 key pair: `path` (private) and `path`.pub."""
    done = run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)])
    assert done.returncode == 0, done.stderr
    return path


def openssh_fingerprint(pub: Path) -> str:
    """The SHA256 fingerprint exactly as `ssh-keygen -lf` shows it (what the audit log writes)."""
    done = run([SSH_KEYGEN, "-lf", str(pub)])
    found = re.search(r"SHA256:[A-Za-z0-9+/]+", done.stdout)
    assert done.returncode == 0 and found, (done.stdout, done.stderr)
    return found.group(0)


def ssh_argv(port: int, key: Path, *options: str, user: str = "admin", log_level: str = "ERROR") -> list[str]:
    """OpenSSH with no user config, agent or known_hosts in the way, and bounded connecting."""
    return [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=5", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"LogLevel={log_level}", *options, f"{user}@127.0.0.1"]


class SshSession:
    """An interactive `ssh -tt`; reader threads collect its output. The blocking methods are
    for `deferToThread`; `kill()` is safe at any time.

    With `pty_size` (rows, cols) ssh's stdin and stdout are a pseudo-terminal of that size, as
    for an operator at a terminal (resizable); otherwise pipes, as for a script fed to ssh."""

    def __init__(self, argv: list[str], pty_size: tuple[int, int] | None = None) -> None:
        self.master: int | None = None
        if pty_size is None:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
            out = self.proc.stdout.fileno()  # type: ignore[union-attr]
        else:
            self.master, slave = pty.openpty()
            self._set_size(slave, *pty_size)
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                                         start_new_session=True)
            os.close(slave)
            out = self.master
        self._raw = b""
        self._err = b""
        self._seen = 0                     # `expect` looks past what it matched before
        self._lock = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(fd, attr), daemon=True)
                         for fd, attr in ((out, "_raw"), (self.proc.stderr.fileno(), "_err"))]  # type: ignore[union-attr]
        for t in self._readers:
            t.start()

    @staticmethod
    def _set_size(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def resize(self, rows: int, cols: int) -> None:
        """Resize the pseudo-terminal and tell ssh (SIGWINCH), as a terminal window does."""
        assert self.master is not None
        self._set_size(self.master, rows, cols)
        self.proc.send_signal(signal.SIGWINCH)

    def _read(self, fd: int, attr: str) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:                # EIO: the pty's other side is closed
                chunk = b""
            with self._lock:
                setattr(self, attr, getattr(self, attr) + chunk)
                self._lock.notify_all()
            if not chunk:
                return

    @property
    def output(self) -> str:
        with self._lock:
            return clean(self._raw)

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.decode("utf-8", "replace")

    def expect(self, needle: str, timeout: float = SSH_TIMEOUT) -> str:
        """Block until `needle` appears after the previous match; return the text before it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                text = clean(self._raw)
                at = text.find(needle, self._seen)
                if at >= 0:
                    before, self._seen = text[self._seen:at], at + len(needle)
                    return before
                left = deadline - time.monotonic()
                if left <= 0 or not any(t.is_alive() for t in self._readers):
                    raise AssertionError(f"no {needle!r} from the console within {timeout}s (ssh exit "
                                         f"{self.proc.poll()}); output:\n{text}\nstderr:\n{self._err!r}")
                self._lock.wait(min(left, 0.2))

    def send(self, data: str, pause: float = 0.05) -> None:
        """Type `data`, then pause a little as a person (or a slow script) would."""
        if self.master is not None:
            os.write(self.master, data.encode())
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data.encode())
            self.proc.stdin.flush()
        time.sleep(pause)

    def close_stdin(self) -> None:
        """EOF on ssh's stdin: ssh sends EOF on the session channel."""
        assert self.proc.stdin is not None and self.master is None
        self.proc.stdin.close()

    def wait(self, timeout: float = SSH_TIMEOUT) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(SSH_TIMEOUT)
        if self.master is not None:
            os.close(self.master)
            self.master = None
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Console:
    """The async face of an SshSession logged into the Manhole."""

    def __init__(self, session: SshSession) -> None:
        self.session = session
        self.count = 0

    async def expect(self, needle: str, timeout: float = SSH_TIMEOUT) -> str:
        return await deferToThread(self.session.expect, needle, timeout)

    async def type(self, text: str) -> None:
        await deferToThread(self.session.send, text)

    async def run(self, line: str) -> str:
        """Type `line`, then a marker line; return the console's output lines in between."""
        self.count += 1
        await self.type(line + "\n")
        await self.type(f'print("<" + "<done {self.count}>>")\n')
        text = await self.expect(f"<<done {self.count}>>")
        # text: the echo of `line`, its output, then the prompt and the echo of the marker line.
        return text.split("\n", 1)[1].rsplit("\n", 1)[0] if text.count("\n") >= 2 else ""

    async def close(self) -> int:
        """End the session the way a script piped into `ssh -tt` does: EOF on stdin."""
        self.session.close_stdin()
        return await deferToThread(self.session.wait)

    async def wait(self) -> int:
        return await deferToThread(self.session.wait)


class Ssh:
    """Starts ssh processes; the fixture kills whatever is still running at teardown."""

    def __init__(self) -> None:
        self.sessions: list[SshSession] = []

    async def console(self, port: int, key: Path, user: str = "admin",
                      pty_size: tuple[int, int] | None = None) -> Console:
        session = await deferToThread(SshSession, ssh_argv(port, key, "-tt", user=user), pty_size)
        self.sessions.append(session)
        console = Console(session)
        await console.expect(">>> ")
        return console

    async def once(self, port: int, key: Path, *options: str, log_level: str = "ERROR") -> subprocess.CompletedProcess[str]:
        """A non-interactive ssh with no input (one that should be refused before any shell)."""
        return await deferToThread(run, ssh_argv(port, key, *options, log_level=log_level))


@pytest.fixture
def ssh() -> Iterator[Ssh]:
    starter = Ssh()
    yield starter
    for session in starter.sessions:
        session.kill()


@implementer(ILogObserver)
class Events:
    """Every log event while installed. `failures`: tracebacks, in any namespace and either API."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def messages(self, namespace: str = "txgateway.ops.manhole") -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == namespace]

    @property
    def failures(self) -> list[str]:
        return [formatEvent(e) + "\n" + (e.get("log_failure") or e["failure"]).getTraceback()
                for e in self.events if "log_failure" in e or (e.get("isError") and "failure" in e)]


@pytest.fixture
def events() -> Iterator[Events]:
    """Installed before the gateway starts; fails the test on any traceback logged meanwhile."""
    observer = Events()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)
    assert not observer.failures, "\n".join(observer.failures)


class Keys:
    """The operator's key (authorized), a stranger's key (not), and where the host key goes."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "keys").mkdir()
        self.admin = keygen(tmp_path / "keys" / "admin")
        self.other = keygen(tmp_path / "keys" / "other")
        self.authorized = tmp_path / "keys" / "authorized_keys"
        self.authorized.write_bytes(b"# operators\n" + Path(f"{self.admin}.pub").read_bytes())
        self.host = tmp_path / "state" / "manhole_host_key"
        self.host.parent.mkdir()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


class Manhole:
    """A running gateway with its Manhole: the bound port and the SSH server connections made."""

    def __init__(self, running: Any, port: int, servers: list[Any]) -> None:
        self.running = running
        self.port = port
        self.servers = servers

    async def all_closed(self, reactor: Any) -> None:
        """Every SSH connection the server accepted has been closed on its side (bounded wait)."""
        deadline = time.monotonic() + TIMEOUT
        while not all(s.transport is None or s.transport.disconnected for s in self.servers):
            assert time.monotonic() < deadline, "an SSH connection stayed open on the server side"
            await deferLater(reactor, 0.02, lambda: None)


def manhole_config(upstream_url: str, keys: Keys) -> str:
    return simple_config(upstream_url, upstream_extra=BREAKER, top=f"""
    manhole:
      endpoint: "tcp:0:interface=127.0.0.1"
      authorized_keys: "{keys.authorized}"
      host_key: "{keys.host}"
    """)


async def start(reactor: Any, gateway: Any, upstream_url: str, keys: Keys, clock: Any = None) -> Manhole:
    """A gateway with the Manhole on a free loopback port; the port is read from its service
    (service/gateway.py adds it as a child StreamServerEndpointService around a ConchFactory)."""
    running = await gateway(manhole_config(upstream_url, keys), clock)
    (service,) = [s for s in running.gateway if isinstance(getattr(s, "factory", None), ConchFactory)]
    servers: list[Any] = []
    build = service.factory.buildProtocol

    def tracked(addr: Any) -> Any:
        proto = build(addr)
        if proto is not None:             # None: refused (connection cap, blocked address)
            servers.append(proto)
        return proto
    service.factory.buildProtocol = tracked
    bound: Deferred[Any] = Deferred()

    def peek(port: Any) -> Any:           # pass the port on: the service's stopService needs it
        bound.callback(port)
        return port
    service._waitingForPort.addCallback(peek)
    port = await bound.addTimeout(TIMEOUT, reactor)
    return Manhole(running, port.getHost().port, servers)


def get(path: bytes = b"/api/users/1") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


async def one(port: int, request: bytes) -> Response:
    """Exactly one complete response."""
    (r,) = parse_responses(await raw(port, request))
    return r


def table(text: str) -> dict[str, list[str]]:
    """breakers()'s table by first column (cells split on runs of 2+ spaces)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]
    return {row[0]: row[1:] for row in rows}


def tables(text: str) -> list[list[list[str]]]:
    """status()'s tables (separated by blank lines), each a list of rows of cells."""
    blocks = [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]
    return [[re.split(r"\s{2,}", line.strip()) for line in b.splitlines()] for b in blocks]


@pytest_twisted.ensureDeferred
async def test_operator_inspects_trips_and_resets_a_breaker(reactor, echo, gateway, keys, ssh, events):
    """Login with the authorized key; breakers() and status() show the gateway; trip("users")
    makes the very next proxied request a 503 that never reaches the upstream; reset restores it."""
    mh = await start(reactor, gateway, echo.url, keys)
    console = await ssh.console(mh.port, keys.admin)

    rows = table(await console.run("breakers()"))
    assert rows["upstream"] == ["state", "trips", "consecutive failures", "retry after s"], rows
    assert rows["users"] == ["closed", "0", "0", "-"], rows          # no "retry after" while closed

    text = await console.run("status()")
    assert "{" not in text and "'" not in text, text                     # tables, not dicts
    gateway_rows, routes, targets, breaker_rows = tables(text)
    assert dict((r[0], r[1:]) for r in gateway_rows)["ready"] == ["True"], gateway_rows
    assert [r[0] for r in routes] == ["route", "/api/users"], routes
    assert targets[0][:3] == ["upstream", "target", "state"] and targets[1][:3] == ["users", echo.url, "up"], targets
    assert breaker_rows[1][:2] == ["users", "closed"], breaker_rows

    tripped = table(await console.run('trip("users")'))
    assert tripped["users"][:2] == ["open", "1"] and int(tripped["users"][3]) >= 1, tripped   # seconds (30 s, jittered)
    assert table(await console.run("breakers()"))["users"][:2] == ["open", "1"]
    targets = tables(await console.run("status()"))[2]
    assert targets[1][2] == "up, breaker open", targets                  # not a plain "up"

    seen = len(echo.requests)
    err = assert_envelope(await one(mh.running.port, get(b"/api/users/7")), 503, "UPSTREAM_UNAVAILABLE")
    assert "breaker" in err["message"]
    assert len(echo.requests) == seen, "the request went to the upstream despite the open breaker"

    assert table(await console.run('reset("users")'))["users"] == ["closed", "1", "0", "-"]
    r = await one(mh.running.port, get(b"/api/users/8"))
    assert r.status == 200 and r.json()["path"] == "/users/8", r.body
    assert table(await console.run("breakers()"))["users"][0] == "closed"

    await console.close()
    await mh.all_closed(reactor)
    assert [m for m in events.messages() if "by hand" in m] == [
        "manhole: breaker users tripped by hand", "manhole: breaker users reset by hand"]


@pytest_twisted.ensureDeferred
async def test_trip_of_an_unknown_upstream_writes_no_audit_line(reactor, echo, gateway, keys, ssh, events):
    """trip("nope") and reset("nope") say which names exist, log nothing and change nothing."""
    mh = await start(reactor, gateway, echo.url, keys)
    console = await ssh.console(mh.port, keys.admin)
    out = await console.run('trip("nope")')
    assert "no breaker named 'nope'; upstreams with a breaker: users" in out, out
    assert "Traceback" not in out and "KeyError" not in out, out
    assert "no breaker named 'nope'" in await console.run('reset("nope")')
    assert table(await console.run("breakers()"))["users"][:2] == ["closed", "0"]
    await console.close()
    await mh.all_closed(reactor)
    assert not [m for m in events.messages() if "by hand" in m], events.messages()


@pytest_twisted.ensureDeferred
async def test_a_stranger_key_and_passwords_are_refused(reactor, echo, gateway, keys, ssh, events):
    mh = await start(reactor, gateway, echo.url, keys)

    stranger = await ssh.once(mh.port, keys.other)
    assert stranger.returncode == 255, stranger
    assert "Permission denied (publickey)" in stranger.stderr, stranger.stderr
    refused = f"manhole login refused: admin with key {openssh_fingerprint(Path(f'{keys.other}.pub'))}"
    assert [m for m in events.messages() if m.startswith("manhole login")] == [refused]

    # OpenSSH asked for passwords only: the server offers nothing but publickey, so ssh gives up
    # (BatchMode: no prompt).
    password = await ssh.once(mh.port, keys.admin, "-o", "PreferredAuthentications=password",
                              "-o", "PubkeyAuthentication=no", log_level="DEBUG1")
    assert password.returncode == 255, password
    assert "Permission denied (publickey)" in password.stderr
    offered = re.findall(r"Authentications that can continue: (\S+)", password.stderr)
    assert offered and set(offered) == {"publickey"}, password.stderr

    # A client that sends a password anyway (OpenSSH won't, as it is not offered) is refused too.
    assert await password_attempt(reactor, mh.port, b"admin", b"correct horse battery staple") == "refused: publickey"
    assert not [m for m in events.messages() if m.startswith("manhole login:")]
    await mh.all_closed(reactor)


class _PasswordFirst(userauth.SSHUserAuthClient):
    """Sends a password request at once (no `none` probe) and reports the server's answer."""

    def __init__(self, user: bytes, password: bytes, answer: Deferred[str]) -> None:
        super().__init__(user, connection.SSHConnection())
        self.password = password
        self.answer = answer

    def serviceStarted(self) -> None:
        self.authenticatedWith, self.triedPublicKeys, self.lastPublicKey = [], [], None
        self.askForAuth(b"password", b"\x00" + common.NS(self.password))

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> None:
        methods, rest = common.getNS(packet)
        self.answer.callback(f"refused: {methods.decode()}" + (" (partial)" if rest[:1] == b"\x01" else ""))
        assert self.transport is not None
        self.transport.loseConnection()

    def ssh_USERAUTH_SUCCESS(self, packet: bytes) -> None:
        self.answer.callback("ACCEPTED")
        assert self.transport is not None
        self.transport.loseConnection()


class _AnyHostKey(transport.SSHClientTransport):
    def __init__(self, service: userauth.SSHUserAuthClient) -> None:
        self.auth = service

    def verifyHostKey(self, hostKey: bytes, fingerprint: str) -> Deferred[bool]:
        return succeed(True)

    def connectionSecure(self) -> None:
        self.requestService(self.auth)


async def password_attempt(reactor: Any, port: int, user: bytes, password: bytes) -> str:
    """conch's SSH client, in process, trying one password; the server's verdict."""
    answer: Deferred[str] = Deferred()
    return await attempt_with(reactor, port, _PasswordFirst(user, password, answer), answer)


async def attempt_with(reactor: Any, port: int, auth: userauth.SSHUserAuthClient, answer: Deferred[str]) -> str:
    """conch's SSH client, in process, authenticating with `auth`; the verdict it reports in `answer`."""
    client = _AnyHostKey(auth)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    try:
        return await answer.addTimeout(TIMEOUT, reactor)
    finally:
        if client.transport is not None:
            client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_logins_and_typed_lines_are_audited(reactor, echo, gateway, keys, ssh, events):
    """'manhole login: <user> with key <fingerprint>' (the same key OpenSSH fingerprints), and
    every line typed, in order, before it runs."""
    mh = await start(reactor, gateway, echo.url, keys)
    console = await ssh.console(mh.port, keys.admin, user="ops")
    await console.run("breakers()")
    await console.run("x = 6 * 7")
    assert "42" in await console.run("x")
    await console.close()
    await mh.all_closed(reactor)

    logins = [m for m in events.messages() if m.startswith("manhole login")]
    fingerprint = openssh_fingerprint(Path(f"{keys.admin}.pub"))
    assert logins == [f"manhole login: ops with key {fingerprint}"], logins
    typed = [m.removeprefix("manhole input: ") for m in events.messages() if m.startswith("manhole input: ")]
    assert typed == ["breakers()", 'print("<" + "<done 1>>")', "x = 6 * 7", 'print("<" + "<done 2>>")',
                     "x", 'print("<" + "<done 3>>")'], typed


def public_line(text: str) -> str:
    """'ssh-ed25519 AAAA…' from a key line (known_hosts, .pub or `ssh-keygen -y`)."""
    found = re.search(r"ssh-ed25519 [A-Za-z0-9+/=]+", text)
    assert found, text
    return found.group(0)


@pytest_twisted.ensureDeferred
async def test_host_key_is_created_0600_once_and_reused(reactor, echo, gateway, keys, ssh, events):
    assert not keys.host.exists()
    first = await start(reactor, gateway, echo.url, keys)
    assert keys.host.stat().st_mode & 0o777 == 0o600
    key_file = keys.host.read_bytes()
    # OpenSSH reads the file (and would refuse a private key readable by others).
    derived = await deferToThread(run, [SSH_KEYGEN, "-y", "-f", str(keys.host)])
    assert derived.returncode == 0, derived.stderr
    scanned = await deferToThread(run, [SSH_KEYSCAN, "-p", str(first.port), "-t", "ed25519", "127.0.0.1"])
    assert public_line(scanned.stdout) == public_line(derived.stdout), (scanned, derived)

    second = await start(reactor, gateway, echo.url, keys)       # same host_key path
    assert keys.host.read_bytes() == key_file and keys.host.stat().st_mode & 0o777 == 0o600
    rescanned = await deferToThread(run, [SSH_KEYSCAN, "-p", str(second.port), "-t", "ed25519", "127.0.0.1"])
    assert public_line(rescanned.stdout) == public_line(derived.stdout)
    assert len([m for m in events.messages() if m.startswith("manhole: created host key")]) == 1

    # The key the client is shown is the one it logs in against, with strict checking on.
    known_hosts = keys.host.parent / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{second.port} {public_line(derived.stdout)}\n")
    session = await deferToThread(run, ssh_argv(second.port, keys.admin, "-o", "StrictHostKeyChecking=yes",
                                                 "-o", f"UserKnownHostsFile={known_hosts}",
                                                 "-o", "PreferredAuthentications=none"))
    assert "Host key verification failed" not in session.stderr
    assert "Permission denied" in session.stderr, session.stderr   # got as far as authentication


@pytest_twisted.ensureDeferred
async def test_resize_and_eof_end_cleanly(reactor, echo, gateway, keys, ssh, events, monkeypatch):
    """A terminal resized mid-session (a real pty, SIGWINCH to ssh) reaches the console; EOF on
    the channel ends the session; Ctrl-D at the prompt too. No traceback anywhere (`events`)."""
    from txgateway.ops import manhole
    sizes: list[tuple[int, int]] = []
    terminal_size = manhole._AuditedManhole.terminalSize

    def recorded(self: Any, width: int, height: int) -> None:
        sizes.append((width, height))
        terminal_size(self, width, height)
    monkeypatch.setattr(manhole._AuditedManhole, "terminalSize", recorded)
    mh = await start(reactor, gateway, echo.url, keys)

    at_terminal = await ssh.console(mh.port, keys.admin, pty_size=(24, 80))
    assert sizes == [(80, 24)]
    at_terminal.session.resize(40, 132)
    deadline = time.monotonic() + TIMEOUT
    while (132, 40) not in sizes:
        assert time.monotonic() < deadline, sizes
        await deferLater(reactor, 0.02, lambda: None)
    assert table(await at_terminal.run("breakers()"))["users"][0] == "closed"   # still usable
    await at_terminal.type("\x04")                                             # Ctrl-D
    await at_terminal.wait()
    assert at_terminal.session.stderr == ""

    piped = await ssh.console(mh.port, keys.admin)
    await piped.run("breakers()")
    await piped.close()                                                        # EOF on the channel
    assert piped.session.stderr == "", piped.session.stderr      # no "closed by remote host"
    await mh.all_closed(reactor)
    conch = [formatEvent(e) for e in events.events      # conch's loggers, also in its subclasses there
             if str(e.get("log_namespace", "")).startswith(("twisted.conch", "txgateway.ops.manhole._"))]
    assert conch.count("connection lost") == 2, conch


@pytest_twisted.ensureDeferred
async def test_gateway_serves_during_and_after_a_session(reactor, echo, gateway, keys, ssh, events):
    mh = await start(reactor, gateway, echo.url, keys)
    port = mh.running.port
    assert (await one(port, get(b"/api/users/before"))).status == 200
    console = await ssh.console(mh.port, keys.admin)
    for i in range(3):
        r = await one(port, get(b"/api/users/during-%d" % i))
        assert r.status == 200 and r.json()["path"] == f"/users/during-{i}", r.body
        await console.run("status()")
    await console.type("x = 1")             # a half-typed line left at the prompt
    r = await one(port, get(b"/api/users/mid-line"))
    assert r.status == 200
    await console.close()
    await mh.all_closed(reactor)
    r = await one(port, get(b"/api/users/after"))
    assert r.status == 200 and r.json()["path"] == "/users/after"
    assert [req.path for req in echo.requests] == [b"/users/before", b"/users/during-0", b"/users/during-1",
                                                   b"/users/during-2", b"/users/mid-line", b"/users/after"]


@pytest.mark.parametrize("command", ["exit()", "quit()"])
@pytest_twisted.ensureDeferred
async def test_exit_ends_the_session_cleanly(reactor, echo, gateway, keys, ssh, events, command):
    """exit() is what a Python user types to leave; it ends the session as Ctrl-D does."""
    mh = await start(reactor, gateway, echo.url, keys)
    console = await ssh.console(mh.port, keys.admin)
    await console.run("breakers()")
    await console.type(command + "\n")
    await console.wait()
    assert console.session.stderr == "", console.session.stderr   # not "closed by remote host"
    await mh.all_closed(reactor)
    assert (await one(mh.running.port, get())).status == 200


# --- hardening (issue 21 items 5, 6, 10, 11) --------------------------------------------------

def refused_lines(events: Events) -> list[str]:
    return [m for m in events.messages() if m.startswith("manhole login refused")]


@pytest_twisted.ensureDeferred
async def test_a_user_name_with_a_newline_and_escape_codes_is_logged_escaped(reactor, echo, gateway, keys, ssh, events):
    """The attack: a user name that ends the log line, forges a "manhole login: admin" line and
    clears the reader's terminal. Logged as one line, every control character escaped."""
    mh = await start(reactor, gateway, echo.url, keys)
    forged = b"x\nmanhole login: admin with key SHA256:forged\x1b[2J\x1b[31m\\\xe2\x80\xa8"
    # OpenSSH's client refuses such a name ("remote username contains invalid characters"):
    # conch's client offers the stranger's public key under it.
    other = Key.fromFile(str(keys.other))
    assert await key_attempt(reactor, mh.port, forged, other) == "refused: publickey"
    fingerprint = openssh_fingerprint(Path(f"{keys.other}.pub"))
    assert refused_lines(events) == [
        "manhole login refused: x\\x0amanhole login: admin with key SHA256:forged\\x1b[2J\\x1b[31m\\\\\\u2028 "
        f"with key {fingerprint}"]
    assert not [m for m in events.messages() if "\n" in m or "\x1b" in m or "\u2028" in m]
    assert not [m for m in events.messages() if m.startswith("manhole login:")]
    assert (await one(mh.running.port, get())).status == 200
    await mh.all_closed(reactor)


class _KeyOnly(userauth.SSHUserAuthClient):
    """Logs in with one key, as OpenSSH does (none, the key's query, then its signature); reports
    the server's verdict on the signed attempt."""

    def __init__(self, user: bytes, key: Key, answer: Deferred[str]) -> None:
        super().__init__(user, connection.SSHConnection())
        self.key = key
        self.answer = answer
        self.offered = self.signed = False

    def getPublicKey(self) -> Key | None:
        if self.offered:
            return None
        self.offered = True
        return self.key.public()

    def getPrivateKey(self) -> Deferred[Key]:
        return succeed(self.key)

    def signData(self, publicKey: Key, signData: bytes) -> Any:
        self.signed = True
        return super().signData(publicKey, signData)

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        if not self.signed:
            return super().ssh_USERAUTH_FAILURE(packet)
        self.answer.callback(f"refused: {common.getNS(packet)[0].decode()}")
        assert self.transport is not None
        self.transport.loseConnection()
        return None


async def key_attempt(reactor: Any, port: int, user: bytes, key: Key) -> str:
    """conch's SSH client, in process, offering one public key under `user`; the server's verdict."""
    answer: Deferred[str] = Deferred()
    return await attempt_with(reactor, port, _KeyOnly(user, key, answer), answer)


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_throttled_per_address_and_the_moduli_line_is_gone(
        reactor, echo, gateway, keys, ssh, events):
    """5 wrong keys within a minute: the 5th is disconnected, later connections from that
    address are closed on sight (nothing more logged per attempt), until the failures age out."""
    from twisted.internet.task import Clock

    from txgateway.ops.manhole import FAILED_LOGINS, FAILED_WINDOW
    clock = Clock()
    clock.advance(1000.0)
    mh = await start(reactor, gateway, echo.url, keys, clock)
    for _ in range(FAILED_LOGINS):
        attempt = await ssh.once(mh.port, keys.other)
        assert attempt.returncode == 255, attempt.stderr
        assert "Permission denied" in attempt.stderr or "too many failed logins" in attempt.stderr, attempt.stderr
    assert len(refused_lines(events)) == FAILED_LOGINS
    assert [m for m in events.messages() if "failed logins from" in m] == [
        f"manhole: {FAILED_LOGINS} failed logins from 127.0.0.1 within {FAILED_WINDOW:.0f} s; its connections "
        "are closed on sight for now"]
    for key in (keys.other, keys.admin):                 # now even the right key: the address is blocked
        attempt = await ssh.once(mh.port, key)
        assert attempt.returncode == 255 and "Permission denied" not in attempt.stderr, attempt.stderr
    assert len(refused_lines(events)) == FAILED_LOGINS   # nothing logged per attempt any more
    assert (await one(mh.running.port, get())).status == 200
    clock.advance(FAILED_WINDOW)
    console = await ssh.console(mh.port, keys.admin)
    await console.close()
    assert not [e for e in events.events if "moduli" in formatEvent(e)]
    await mh.all_closed(reactor)


class Silent(Protocol):
    """A TCP client that never speaks SSH; `lost` fires when the server closes it."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


async def silent(reactor: Any, port: int) -> Silent:
    client = Silent()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    return client


@pytest_twisted.ensureDeferred
async def test_connections_that_never_log_in_are_capped_and_closed_after_the_pre_auth_timeout(
        reactor, echo, gateway, keys, ssh, events):
    from twisted.internet.task import Clock

    from txgateway.ops.manhole import MAX_CONNECTIONS, PRE_AUTH_TIMEOUT
    clock = Clock()
    mh = await start(reactor, gateway, echo.url, keys, clock)
    idle = [await silent(reactor, mh.port) for _ in range(MAX_CONNECTIONS)]
    deadline = time.monotonic() + TIMEOUT
    while len(mh.servers) < MAX_CONNECTIONS or not all(c.received.startswith(b"SSH-2.0-") for c in idle):
        assert time.monotonic() < deadline, "the SSH server did not greet every connection"
        await deferLater(reactor, 0.02, lambda: None)
    one_more = await silent(reactor, mh.port)
    await one_more.lost.addTimeout(TIMEOUT, reactor)     # closed at once, never greeted
    assert one_more.received == b""
    assert not any(c.lost.called for c in idle)
    assert (await one(mh.running.port, get())).status == 200   # the main listener serves on
    clock.advance(PRE_AUTH_TIMEOUT - 1)
    assert not any(c.lost.called for c in idle)
    clock.advance(1)
    for client in idle:
        await client.lost.addTimeout(TIMEOUT, reactor)
    await mh.all_closed(reactor)
    console = await ssh.console(mh.port, keys.admin)       # room again, and a login stays past the timeout
    clock.advance(PRE_AUTH_TIMEOUT * 2)
    assert "42" in await console.run("6 * 7")
    await console.close()


@pytest_twisted.ensureDeferred
async def test_the_banner_warns_about_blocking_and_deferlater_is_at_hand(reactor, echo, gateway, keys, ssh, events):
    mh = await start(reactor, gateway, echo.url, keys)
    session = await deferToThread(SshSession, ssh_argv(mh.port, keys.admin, "-tt"), None)
    ssh.sessions.append(session)
    console = Console(session)
    banner = await console.expect(">>> ")
    assert "stalls every request" in banner and "deferLater(reactor, seconds, f)" in banner, banner
    shown = await console.run("print(type(deferLater(reactor, 0, int)).__name__, deferToThread.__name__)")
    assert "Deferred deferToThread" in shown, shown
    await console.close()
    await mh.all_closed(reactor)
