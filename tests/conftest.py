"""Shared fixtures: a real gateway in the test reactor, real upstreams, raw-socket clients."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.redisproc import RedisServer, SentinelSetup, start_sentinel_setup
from txgateway.config.schema import Config, parse_config
from txgateway.filters.auth.config import hash_api_key
from txgateway.service.demo import EchoResource
from txgateway.service.gateway import Gateway

TIMEOUT = 10.0
# Credentials shared by the auth and rate-limit tests (tests only, never a real secret).
SECRET = b"integration-secret-0123456789abcdef"
ALICE_KEY = "alice-service-key-0123456789"
BOB_KEY = "bob-service-key-0123456789"
ISSUER = "https://auth.test"


def jwt_claims(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Alice's claims (admin, pro tier) from ISSUER for audience "api", valid an hour from `now`;
    an override of None drops that claim."""
    now = time.time() if now is None else now
    out: dict[str, Any] = {"sub": "alice", "role": "admin", "tier": "pro", "iss": ISSUER, "aud": "api",
                           "iat": int(now), "exp": int(now) + 3600}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def mint_token(now: float | None = None, key: bytes = SECRET, algorithm: str = "HS256", **overrides: Any) -> str:
    """A JWT of `jwt_claims(now, **overrides)`, signed with SECRET (HS256) unless told."""
    return jwt.encode(jwt_claims(now, **overrides), key, algorithm=algorithm)


@pytest.fixture
def secret_file(tmp_path) -> str:
    path = tmp_path / "jwt_secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


@pytest.fixture
def keys_file(tmp_path) -> str:
    path = tmp_path / "api_keys.yaml"
    path.write_text(
        f'- {{hash: "{hash_api_key(ALICE_KEY)}", id: alice-svc, role: admin, tier: pro}}\n'
        f'- {{hash: "{hash_api_key(BOB_KEY)}", id: bob-svc, role: user, tier: free}}\n')
    return str(path)


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor as r
    return r


@dataclass
class Upstream:
    port: int
    listening: Any
    requests: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def listen(reactor: Any, factory: Any) -> Any:
    return await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)


def quiet_site(resource: Resource) -> Site:
    """A twisted.web Site for a test's own server, without its per-request log lines."""
    site = Site(resource)
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


class RecordingEcho(EchoResource):
    """The demo echo upstream, also recording each request for assertions."""

    def __init__(self, name: str, seen: list[Any]) -> None:
        super().__init__(name)
        self.seen = seen

    def render(self, request: Any) -> bytes:
        self.seen.append(request)
        return super().render(request)


@pytest_twisted.async_yield_fixture()
async def echo(reactor: Any) -> Any:
    """A real HTTP upstream (twisted.web) answering JSON about what it received."""
    seen: list[Any] = []
    site = Site(RecordingEcho("echo", seen))
    site.log = lambda request: None
    port = await listen(reactor, site)
    yield Upstream(port.getHost().port, port, seen)
    await port.stopListening()


Answer = tuple[int, bytes, bytes]        # status, content type, body


class Scripted(Resource):
    """An upstream answering by path (the path with its query); records each request."""

    isLeaf = True

    def __init__(self, answers: dict[str, Answer | Callable[[Any], Any]], seen: list[Any]) -> None:
        super().__init__()
        self.answers = answers
        self.seen = seen

    def render(self, request: Any) -> Any:
        self.seen.append(request)
        answer = self.answers.get(request.uri.decode("latin-1"))
        if answer is None:
            request.setResponseCode(404)
            return b'{"error": "not found"}'
        if callable(answer):
            return answer(request)
        status, kind, body = answer
        request.setResponseCode(status)
        request.setHeader(b"content-type", kind)
        return body


def js(value: Any, status: int = 200) -> Answer:
    return status, b"application/json", json.dumps(value).encode()


async def _scripted(reactor: Any, answers: dict[str, Any], ports: list[Any]) -> Upstream:
    seen: list[Any] = []
    site = Site(Scripted(answers, seen))
    site.log = lambda request: None
    port = await listen(reactor, site)
    ports.append(port)
    return Upstream(port.getHost().port, port, seen)


@pytest_twisted.async_yield_fixture()
async def upstreams(reactor: Any) -> Any:
    """Factory fixture: `await upstreams(answers)` -> a scripted JSON upstream."""
    ports: list[Any] = []

    async def start(answers: dict[str, Any]) -> Upstream:
        return await _scripted(reactor, answers, ports)

    yield start
    for port in ports:
        await maybeDeferred(port.stopListening)


class RawServer(Protocol):
    """An upstream scripted by a function of the bytes received (faults, odd framing)."""

    def __init__(self, script: Callable[[RawServer, bytes], None], log: list[bytes]) -> None:
        self.script = script
        self.log = log
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self.log.append(data)
        self.script(self, data)


@pytest_twisted.async_yield_fixture()
async def raw_upstream(reactor: Any) -> Any:
    """Factory fixture: `await raw_upstream(script)` -> Upstream with `requests` = bytes seen."""
    ports: list[Any] = []

    async def start(script: Callable[[RawServer, bytes], None]) -> Upstream:
        log: list[bytes] = []
        port = await listen(reactor, Factory.forProtocol(lambda: RawServer(script, log)))
        ports.append(port)
        return Upstream(port.getHost().port, port, log)  # type: ignore[arg-type]

    yield start
    for port in ports:
        await port.stopListening()


def free_port() -> int:
    """A port with nothing listening (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@dataclass
class RunningGateway:
    gateway: Gateway
    port: int
    clock: Clock | None
    log: list[dict[str, Any]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _ListWriter:
    """Access-log observer capturing records for assertions."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __call__(self, event: dict[str, Any]) -> None:
        if "access" in event:
            record = event["access"]
            json.loads(record.json_line())  # every record renders as valid JSON
            self.records.append(record.as_dict())

    def start(self) -> None: ...
    def stop(self) -> None: ...


def with_defaults(yaml_text: str) -> str:
    """Dedented, with a loopback listener on a free port and no access log unless it says."""
    text = textwrap.dedent(yaml_text)
    if "listen:" not in text:
        text = 'listen: [{endpoint: "tcp:0:interface=127.0.0.1"}]\naccess_log: "off"\n' + text
    return text


class GatewayRunner:
    """Starts gateways in the test reactor and keeps every txgateway log line (formatted);
    see `running_gateways` for the teardown."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.started: list[Gateway] = []
        self.crashes: list[dict[str, Any]] = []
        self.lines: list[str] = []

    def observe(self, event: dict[str, Any]) -> None:
        if not str(event.get("log_namespace", "")).startswith("txgateway"):
            return
        if "log_failure" in event:
            self.crashes.append(event)
        self.lines.append(formatEvent(event))

    async def start(self, config: Config, clock: Clock | None = None, access_log: Any = None) -> tuple[Gateway, int]:
        """Start a Gateway from `config` (access records to `access_log` if given) -> (gateway, port)."""
        gw = Gateway(config, self.reactor, clock)
        if access_log is not None:
            gw.access_log.observer = access_log.observer
        gw.startService()
        self.started.append(gw)
        port = await gw.listeners[0]._waitingForPort
        return gw, port.getHost().port


@contextlib.asynccontextmanager
async def running_gateways(reactor: Any) -> AsyncIterator[GatewayRunner]:
    """A GatewayRunner; on exit every gateway it started stops (no drain wait), and any
    traceback a gateway logged meanwhile fails the test: bad input must never crash."""
    from twisted.logger import globalLogPublisher
    runner = GatewayRunner(reactor)
    globalLogPublisher.addObserver(runner.observe)
    yield runner
    for gw in runner.started:
        gw.config = dataclasses.replace(gw.config, drain_timeout=0.0)
        await gw.stopService()
    globalLogPublisher.removeObserver(runner.observe)
    assert not runner.crashes, [e["log_failure"].getTraceback() for e in runner.crashes]


@pytest_twisted.async_yield_fixture()
async def gateway(reactor: Any) -> Any:
    """Factory fixture: `await gateway(yaml_text, clock=None)` -> RunningGateway on a free port.

    Any traceback the gateway logs during the test fails it: bad input must never crash.
    """
    from txgateway.ops.accesslog import AccessLog
    async with running_gateways(reactor) as runner:
        async def start(yaml_text: str, clock: Clock | None = None) -> RunningGateway:
            config = parse_config(with_defaults(yaml_text), "test.yaml")
            records: list[dict[str, Any]] = []
            gw, port = await runner.start(config, clock, AccessLog(_ListWriter(records)))
            return RunningGateway(gw, port, clock, records)

        yield start


def raw_request(port: int, data: bytes | list[bytes], read_timeout: float = 3.0,
                pause: float = 0.0, half_close: bool = False) -> bytes:
    """Send raw bytes (optionally in pieces) and read until the server closes or goes quiet."""
    import time
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        pieces = data if isinstance(data, list) else [data]
        for piece in pieces:
            s.sendall(piece)
            if pause:
                time.sleep(pause)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        except ConnectionResetError:
            chunks.append(b"<RESET>")
        return b"".join(chunks)


def read_to_end(sock: Any) -> bytes:
    """Everything a (blocking) socket receives until the peer closes, resets or goes quiet; closes it."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    return b"".join(chunks)


async def raw(port: int, data: bytes | list[bytes], **kw: Any) -> bytes:
    """`raw_request` in a thread, so the reactor keeps running meanwhile."""
    return await deferToThread(raw_request, port, data, **kw)


async def get_closing(port: int, path: bytes) -> Response:
    """One `GET path` on a connection the client closes after it: its one response."""
    (response,) = parse_responses(await raw(port, b"GET %s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % path))
    return response


async def until(reactor: Any, condition: Callable[[], Any], bound: float = 5.0) -> None:
    """Wait (at most `bound` seconds) for a state the gateway reaches on its own, such as
    bytes from a client socket having arrived before a test clock is advanced."""
    from twisted.internet.task import deferLater
    for _ in range(int(bound / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not reached in time")


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes) -> list[Response]:
    """Split raw bytes into HTTP/1.1 responses (Content-Length or chunked framing)."""
    out = []
    while data.startswith(b"HTTP/"):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(x.strip() for x in line.decode("latin-1").split(":", 1)) for line in lines[1:]]
        resp = Response(status, headers, b"")  # type: ignore[arg-type]
        length = resp.header("content-length")
        if status == 100:
            data = rest
            continue
        if status in (204, 304):                 # never a body (RFC 9110 6.4.1)
            data = rest
        elif length is not None:
            resp.body, data = rest[:int(length)], rest[int(length):]
        elif (resp.header("transfer-encoding") or "").lower() == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    rest = rest.partition(b"\r\n")[2]
                    break
                body += rest[:size]
                rest = rest[size + 2:]
            resp.body, data = body, rest
        else:
            resp.body, data = rest, b""
        out.append(resp)
    return out


def assert_envelope(resp: Response, status: int, code: str) -> dict[str, Any]:
    """The gateway's JSON error envelope, exactly."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("content-type") == "application/json"
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["code"] == code and err["status"] == status
    assert err["correlation_id"] == resp.header("x-correlation-id")
    assert isinstance(err["message"], str) and err["message"]
    return err


def simple_config(upstream_url: str, extra_route: str = "", upstream_extra: str = "", top: str = "") -> str:
    return textwrap.dedent(top) + textwrap.dedent(f"""
    upstreams:
      users: {{targets: ["{upstream_url}"], connect_timeout: 1s, timeout: 2s{upstream_extra}}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """) + extra_route


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port (tests.redisproc), stopped at teardown."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_sentinel_setup() -> Iterator[SentinelSetup]:
    """A real master, its replica and a Sentinel watching them (tests.redisproc), all stopped at teardown."""
    setup = start_sentinel_setup()
    yield setup
    setup.stop()
