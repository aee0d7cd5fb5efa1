"""The configuration through the admin listener (issue 17 part 7): GET /config, PUT /config,
POST /config/check, against a gateway started from a real file in the test reactor, with
real sockets on both listeners."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.conftest import free_port, running_gateways
from tests.integration.test_admin import TOKEN, TOKEN_ENV, call
from tests.integration.test_lifecycle import write_config
from tests.integration.test_workers import Supervised, connect, get, upstream
from txgateway.config.reader import ConfigError
from txgateway.config.schema import load_config, parse_config

ADMIN = f'admin: {{endpoint: "tcp:0:interface=127.0.0.1", token_env: {TOKEN_ENV}, config_api: true}}'


def gateway_yaml(url: str, routes: str = "  - {prefix: /api/users, upstream: users, rewrite_prefix: /users}\n") -> str:
    return (f'listen: [{{endpoint: "tcp:0:interface=127.0.0.1"}}]\naccess_log: "off"\n{ADMIN}\n'
            f'upstreams:\n  users: {{targets: ["{url}"]}}\nroutes:\n{routes}')


WITH_ORDERS = ("  - {prefix: /api/users, upstream: users, rewrite_prefix: /users}\n"
               "  - {prefix: /api/orders, upstream: users, rewrite_prefix: /orders}\n")


@pytest_twisted.async_yield_fixture()
async def from_file(reactor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Factory: `await from_file(text)` writes tmp_path/gateway.yaml (unless text is None:
    as it is now) and starts a gateway from it -> (gateway, data port, admin port).
    Tracebacks logged fail the test."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    async with running_gateways(reactor) as runner:
        async def start(text: str | None) -> tuple[Any, int, int]:
            if text is not None:
                (tmp_path / "gateway.yaml").write_text(text)
            gw, port = await runner.start(load_config(str(tmp_path / "gateway.yaml")))
            admin = await gw.admin._waitingForPort
            return gw, port, admin.getHost().port
        yield start


async def path_of(port: int, path: str) -> str:
    r = await call(port, path)
    assert r.status == 200, (path, r.status, r.body)
    return str(r.json()["path"])


@pytest_twisted.ensureDeferred
async def test_a_good_put_is_served_by_the_next_request_kept_on_disk_and_survives_a_restart(
        from_file, echo, tmp_path):
    file = tmp_path / "gateway.yaml"
    old = gateway_yaml(echo.url)
    _, port, admin = await from_file(old)
    assert (await call(port, "/api/orders/1")).status == 404

    new = gateway_yaml(echo.url, WITH_ORDERS)
    r = await call(admin, "/config", "PUT", token=TOKEN, body=new.encode())
    assert r.status == 200, r.body
    assert r.json() == {"applied": True, "file": str(file), "previous": f"{file}.prev"}
    assert await path_of(port, "/api/orders/7") == "/orders/7"          # the very next request
    assert file.read_text() == new and Path(f"{file}.prev").read_text() == old
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]   # no temp file left behind

    got = (await call(admin, "/config", token=TOKEN)).json()
    assert got["file"] == str(file) and [r["prefix"] for r in got["config"]["routes"]] == ["/api/users", "/api/orders"]

    _, port2, _ = await from_file(None)                                   # a restart reads the file
    assert await path_of(port2, "/api/orders/8") == "/orders/8"


@pytest_twisted.ensureDeferred
async def test_a_json_body_is_a_configuration_too(from_file, echo, tmp_path):
    _, port, admin = await from_file(gateway_yaml(echo.url))
    doc = {"listen": [{"endpoint": "tcp:0:interface=127.0.0.1"}], "access_log": "off",
           "admin": {"endpoint": "tcp:0:interface=127.0.0.1", "token_env": TOKEN_ENV, "config_api": True},
           "upstreams": {"users": {"targets": [echo.url]}},
           "routes": [{"prefix": "/api/json", "upstream": "users", "rewrite_prefix": "/j"}]}
    r = await call(admin, "/config", "PUT", token=TOKEN, headers=[("Content-Type", "application/json")],
                   body=json.dumps(doc, indent=1).encode())
    assert r.status == 200, r.body
    assert await path_of(port, "/api/json/1") == "/j/1"
    assert (await call(port, "/api/users/1")).status == 404


@pytest_twisted.ensureDeferred
async def test_a_bad_body_changes_nothing_and_names_line_and_key(from_file, echo, tmp_path):
    file = tmp_path / "gateway.yaml"
    old = gateway_yaml(echo.url)
    _, port, admin = await from_file(old)
    bad = gateway_yaml(echo.url, "  - {prefix: /api/orders, upstream: nope}\n").replace(
        'targets: ["', 'timeout: soon, targets: ["')
    for path, method in (("/config", "PUT"), ("/config/check", "POST")):
        r = await call(admin, path, method, token=TOKEN, body=bad.encode())
        assert r.status == 422, r.body
        body = r.json()
        assert body["error"] == "invalid configuration; nothing was applied"
        found = {(p["line"], p["path"]) for p in body["problems"]}
        assert found == {(5, "upstreams.users.timeout"), (7, "routes[0].upstream")}, body
        assert all(p["file"] == str(file) and p["message"] for p in body["problems"])
        assert file.read_text() == old and not Path(f"{file}.prev").exists()
        assert await path_of(port, "/api/users/3") == "/users/3"          # the old config serves on
        assert (await call(port, "/api/orders/3")).status == 404

    for body_bytes, what in ((b"", "the file is empty"), (b"routes: [\n", "YAML"), (b"\xff\xfe", "not UTF-8")):
        r = await call(admin, "/config", "PUT", token=TOKEN, body=body_bytes)
        assert r.status == 422 and what in json.dumps(r.json()), (what, r.body)
    assert file.read_text() == old
    assert await path_of(port, "/api/users/4") == "/users/4"


@pytest_twisted.ensureDeferred
async def test_check_validates_without_applying(from_file, echo, tmp_path):
    file = tmp_path / "gateway.yaml"
    old = gateway_yaml(echo.url)
    _, port, admin = await from_file(old)
    r = await call(admin, "/config/check", "POST", token=TOKEN, body=gateway_yaml(echo.url, WITH_ORDERS).encode())
    assert r.status == 200 and r.json() == {"valid": True, "file": str(file)}, r.body
    assert file.read_text() == old and (await call(port, "/api/orders/1")).status == 404


@pytest_twisted.ensureDeferred
async def test_a_refused_reload_restores_the_file(from_file, echo, tmp_path):
    """Valid as a file, but a reload refuses it (a Redis-backed limiter added: that needs a
    restart): 422, the file goes back to what it was and the old config serves on."""
    file = tmp_path / "gateway.yaml"
    old = gateway_yaml(echo.url)
    _, port, admin = await from_file(old)
    redis = ('redis: {url: "redis://127.0.0.1:1"}\n'
             "rate_limits: {backend: redis, tiers: {free: {rate: 5/second}}, default_tier: free}\n")
    r = await call(admin, "/config", "PUT", token=TOKEN, body=(redis + gateway_yaml(echo.url, WITH_ORDERS)).encode())
    assert r.status == 422, r.body
    (problem,) = r.json()["problems"]
    assert "redis" in problem["message"].lower() and problem["file"] == str(file), problem
    assert file.read_text() == old
    assert await path_of(port, "/api/users/5") == "/users/5"
    assert (await call(port, "/api/orders/5")).status == 404


@pytest_twisted.ensureDeferred
async def test_a_file_that_cannot_be_written_changes_nothing(from_file, echo, tmp_path):
    """The previous version cannot be kept (here `<file>.prev` is a directory; a read-only
    /etc/txgateway fails the same way): 500, the file and the running config unchanged."""
    file = tmp_path / "gateway.yaml"
    old = gateway_yaml(echo.url)
    _, port, admin = await from_file(old)
    Path(f"{file}.prev").mkdir()
    r = await call(admin, "/config", "PUT", token=TOKEN, body=gateway_yaml(echo.url, WITH_ORDERS).encode())
    assert r.status == 500 and r.json()["error"].endswith("; nothing was applied"), r.body
    assert file.read_text() == old and not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert (await call(port, "/api/orders/1")).status == 404
    assert await path_of(port, "/api/users/2") == "/users/2"


@pytest_twisted.ensureDeferred
async def test_the_token_is_required_and_secrets_are_redacted(from_file, echo, tmp_path):
    file = tmp_path / "gateway.yaml"
    old = gateway_yaml(echo.url).replace(
        "rewrite_prefix: /users}",
        "rewrite_prefix: /users, request_headers: {set: {Authorization: Bearer upstream-secret-123}}}")
    _, port, admin = await from_file(old)
    for path, method in (("/config", "GET"), ("/config", "PUT"), ("/config/check", "POST")):
        for token in (None, "wrong-token-0123456789abcdef"):
            r = await call(admin, path, method, token=token, body=b"routes: []\n")
            assert r.status == 401 and r.header("www-authenticate") == 'Bearer realm="txgateway-admin"', r.status
    assert file.read_text() == old
    r = await call(admin, "/config", token=TOKEN)
    assert "upstream-secret-123" not in r.body.decode()
    route = r.json()["config"]["routes"][0]
    assert route["request_headers"]["set"]["Authorization"] == "<redacted>"
    assert r.json()["config"]["admin"]["token_env"] == TOKEN_ENV            # a variable's name is no secret
    r = await call(admin, "/config/check", token=TOKEN)
    assert r.status == 405 and r.header("allow") == "POST"
    assert (await call(admin, "/nope", token=TOKEN)).json()["paths"][-2:] == ["/config", "/config/check"]
    assert await path_of(port, "/api/users/1") == "/users/1"


def test_config_api_needs_a_token_even_on_loopback():
    text = gateway_yaml("http://127.0.0.1:1").replace(f", token_env: {TOKEN_ENV}", "")
    with pytest.raises(ConfigError) as e:
        parse_config(text, "g.yaml", environ={})
    (problem,) = e.value.problems
    assert (problem.line, problem.path) == (3, "admin.config_api") and "token_env" in problem.message


@pytest_twisted.ensureDeferred
async def test_without_config_api_put_is_refused(from_file, echo, tmp_path):
    _, port, admin = await from_file(gateway_yaml(echo.url).replace(", config_api: true", ""))
    r = await call(admin, "/config", "PUT", token=TOKEN, body=b"routes: []\n")
    assert r.status == 405 and r.header("allow") == "GET, HEAD"
    assert (await call(admin, "/config", token=TOKEN)).status == 404
    assert await path_of(port, "/api/users/1") == "/users/1"


def test_with_two_workers_every_worker_applies_a_put(tmp_path, monkeypatch):
    """`--workers 2`: the admin listener lives in worker 0; after it applied the body it sends
    SIGHUP to the parent, which has every worker reload the file just written."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)          # the daemon inherits the environment
    admin_port = free_port()
    admin = f'admin: {{endpoint: "tcp:{admin_port}:interface=127.0.0.1", token_env: {TOKEN_ENV}, config_api: true}}\n'
    with upstream() as up:
        port = free_port()
        config = write_config(tmp_path, port, up.url, admin)
        daemon = Supervised(tmp_path, config, "--workers", "2")
        try:
            workers = daemon.wait_ready(port)
            daemon.wait_for_port(admin_port)
            new = config.read_text().replace(
                "routes:\n", "routes:\n  - {prefix: /api/added, upstream: users, rewrite_prefix: /users}\n")
            conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
            conn.request("PUT", "/config", body=new.encode(), headers={"Authorization": f"Bearer {TOKEN}"})
            response = conn.getresponse()
            assert response.status == 200, response.read()
            conn.close()
            # worker 0 reloads itself, then once more on the forwarded SIGHUP; worker 1 once
            daemon.wait_until("3 reloads", lambda: len(re.findall(r"reload: .* applied", daemon.output)) >= 3,
                              timeout=10)
            for _ in range(20):                    # whichever worker takes the connection serves it
                c = connect(port)
                try:
                    assert get(c, "/api/added/1") == 200
                finally:
                    c.close()
            assert config.read_text() == new and daemon.workers() == workers
            assert "Traceback" not in daemon.output, daemon.output
        finally:
            daemon.kill()
