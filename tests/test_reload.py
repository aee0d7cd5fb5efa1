"""What a reload may change: `keep_restart_only_settings` on configs from parse_config.

Settings bound to things made once at start (sockets, the Redis link, the log file, the JWKS
fetcher, the kind of bucket store) are reported by name and keep their running value; the
rest of the new file (routes, upstreams, tiers, header rules, ...) passes through untouched.
"""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key

from txgateway.config.schema import Config, parse_config
from txgateway.service.reload import ReloadRefused, keep_restart_only_settings

UPSTREAMS = """\
upstreams:
  users: {targets: ["http://127.0.0.1:3001"], timeout: 5s}
"""
ROUTES = """\
routes:
  - {prefix: /api/users, upstream: users}
"""


def config(*sections: str, upstreams: str = UPSTREAMS, routes: str = ROUTES,
           listen: str = 'listen: [{endpoint: "tcp:8080:interface=127.0.0.1"}]\n') -> Config:
    """A parsed config from YAML sections (each a top-level key, dedented)."""
    text = listen + "".join(textwrap.dedent(s) for s in sections) + upstreams + routes
    return parse_config(text, "gateway.yaml", environ={})


@pytest.fixture
def keys(tmp_path) -> str:
    path = tmp_path / "authorized_keys"
    path.write_bytes(Key(ed25519.Ed25519PrivateKey.generate()).public().toString("openssh") + b"\n")
    return str(path)


def test_the_same_file_changes_nothing():
    running = config('access_log: "off"\n', "drain_timeout: 3s\n")
    merged, changed = keep_restart_only_settings(running, config('access_log: "off"\n', "drain_timeout: 3s\n"))
    assert changed == []
    assert merged == running


def restart_only_change(setting: str, keys: str) -> tuple[Config, Config]:
    """(running, new): the same file but for `setting`, and the new one adds a route."""
    manhole = f'manhole: {{authorized_keys: "{keys}", host_key: "{keys}.host", endpoint: "tcp:%d:interface=127.0.0.1"}}\n'
    old_section, new_section = {
        "listen": ("", ""),
        "admin": ('admin: {endpoint: "tcp:9901:interface=127.0.0.1"}\n', 'admin: {endpoint: "tcp:9902:interface=127.0.0.1"}\n'),
        "manhole": (manhole % 2222, manhole % 2223),
        "redis": ('redis: {url: "redis://127.0.0.1:6379"}\n', 'redis: {url: "redis://127.0.0.1:6380/1"}\n'),
        "access_log": ('access_log: "-"\n', 'access_log: "off"\n'),
        "drain_timeout": ("drain_timeout: 5s\n", "drain_timeout: 30s\n"),
    }[setting]
    listen = {"listen": 'listen: [{endpoint: "tcp:8081:interface=127.0.0.1"}]\n'} if setting == "listen" else {}
    return config(old_section), config(new_section, routes=ROUTES + "  - {prefix: /api/orders, upstream: users}\n", **listen)


@pytest.mark.parametrize("setting", ["listen", "admin", "manhole", "redis", "access_log", "drain_timeout"])
def test_each_restart_only_setting_is_reported_and_keeps_its_running_value(keys, setting):
    running, new = restart_only_change(setting, keys)
    assert getattr(new, setting) != getattr(running, setting)

    merged, changed = keep_restart_only_settings(running, new)

    assert changed == [setting]
    assert getattr(merged, setting) == getattr(running, setting)
    assert [r.prefix for r in merged.routes] == ["/api/users", "/api/orders"]   # the rest: the new file
    assert merged == dataclasses.replace(new, **{setting: getattr(running, setting)})


def test_several_restart_only_settings_changed_at_once_are_all_reported():
    running = config('admin: {endpoint: "tcp:9901:interface=127.0.0.1"}\n', 'access_log: "-"\n', "drain_timeout: 5s\n")
    new = config('admin: {endpoint: "tcp:9902:interface=127.0.0.1"}\n', 'access_log: "off"\n', "drain_timeout: 1s\n",
                 listen='listen: [{endpoint: "tcp:8081"}]\n')
    merged, changed = keep_restart_only_settings(running, new)
    assert sorted(changed) == ["access_log", "admin", "drain_timeout", "listen"]
    assert (merged.listen, merged.admin, merged.access_log, merged.drain_timeout) == (
        running.listen, running.admin, running.access_log, running.drain_timeout)


def test_a_restart_only_section_added_or_removed_is_a_change_too():
    plain = config()
    with_admin = config('admin: {endpoint: "tcp:9901:interface=127.0.0.1"}\n')
    merged, changed = keep_restart_only_settings(plain, with_admin)
    assert changed == ["admin"] and merged.admin is None
    merged, changed = keep_restart_only_settings(with_admin, plain)
    assert changed == ["admin"] and merged.admin == with_admin.admin


def test_routes_upstreams_tiers_and_header_rules_pass_through():
    tiers = """\
    rate_limits:
      default_tier: free
      tiers:
        free: {rate: %s}
        pro: {rate: 1000/minute, burst: 50}
    """
    running = config(tiers % "10/minute", upstreams=UPSTREAMS, routes="""\
routes:
  - prefix: /api/users
    upstream: users
    rate_limit: {key: ip}
    response_headers: {set: {X-Version: old}}
""")
    new = config(tiers % "20/minute", "trusted_proxies: [10.0.0.0/8]\n", "limits: {max_body_size: 1MiB}\n",
                 upstreams="""\
upstreams:
  users: {targets: ["http://127.0.0.1:3001", "http://127.0.0.1:3002"], timeout: 2s,
          circuit_breaker: {consecutive_failures: 3}}
  orders: {targets: ["http://127.0.0.1:3003"]}
""", routes="""\
routes:
  - prefix: /api/users
    upstream: users
    rate_limit: {key: ip}
    response_headers: {set: {X-Version: new}, remove: [server]}
    request_headers: {add: {X-From: gateway}}
  - {prefix: /api/orders, upstream: orders, rate_limit: {key: ip, rate: 5/second}}
""")
    merged, changed = keep_restart_only_settings(running, new)
    assert changed == []
    assert merged == new
    assert merged.rate_limits.tiers["free"].rate.count == 20
    assert merged.routes[0].policies["header_rules"].response.set == ((b"X-Version", b"new"),)
    assert set(merged.upstreams) == {"users", "orders"}
    assert merged.upstreams["users"].circuit_breaker is not None


def jwt(url: str, issuer: str = "https://issuer.example") -> str:
    return f"""\
    auth:
      jwt: {{algorithms: [RS256], jwks_url: "{url}", issuer: "{issuer}"}}
    """


def test_a_jwks_url_change_refuses_the_reload():
    """Keeping the old auth section while new routes say auth: required could leave them
    open (a section added through a new URL, kept as None): the reload is refused instead."""
    running = config(jwt("https://a.example/jwks.json"))
    new = config(jwt("https://b.example/jwks.json", issuer="https://other.example"),
                 routes=ROUTES + "  - {prefix: /api/me, upstream: users, auth: required}\n")
    with pytest.raises(ReloadRefused) as info:
        keep_restart_only_settings(running, new)
    assert str(info.value) == ("auth.jwt.jwks_url changed (https://a.example/jwks.json -> "
                               "https://b.example/jwks.json): that needs a restart")


def test_auth_added_through_a_jwks_url_refuses_the_reload():
    with pytest.raises(ReloadRefused):
        keep_restart_only_settings(config(), config(jwt("https://b.example/jwks.json")))


def test_the_jwks_fetchers_timings_are_restart_only_the_rest_of_jwt_reloads():
    """jwks_cooldown, jwks_refresh and jwks_timeout belong to the fetcher made at start."""
    running = config(jwt("https://a.example/jwks.json"))
    new = config(jwt("https://a.example/jwks.json", issuer="https://other.example").replace(
        "issuer:", "jwks_refresh: 1m, jwks_cooldown: 5s, jwks_timeout: 1s, issuer:"))
    merged, changed = keep_restart_only_settings(running, new)
    assert changed == ["auth.jwt.jwks_cooldown", "auth.jwt.jwks_refresh", "auth.jwt.jwks_timeout"]
    assert merged.auth.jwt == dataclasses.replace(new.auth.jwt, jwks_cooldown=30.0, jwks_refresh=300.0,
                                                  jwks_timeout=5.0)
    assert merged.auth.jwt.issuer == "https://other.example"


def test_auth_changes_with_the_same_jwks_url_pass_through():
    running = config(jwt("https://a.example/jwks.json"))
    new = config(jwt("https://a.example/jwks.json", issuer="https://other.example"))
    merged, changed = keep_restart_only_settings(running, new)
    assert changed == []
    assert merged.auth == new.auth and merged.auth.jwt.issuer == "https://other.example"


REDIS = 'redis: {url: "redis://127.0.0.1:6379"}\n'


def limiter(backend: str, rate: str = "10/minute", extra: str = "") -> str:
    return f"rate_limits: {{backend: {backend}, tiers: {{free: {{rate: {rate}}}}}{extra}}}\n"


def test_a_limiter_backend_change_keeps_the_backend_but_takes_the_new_tiers():
    running = config(REDIS, limiter("local"))
    new = config(REDIS, limiter("redis", rate="20/minute", extra=", on_redis_error: deny, instances: 3"))
    merged, changed = keep_restart_only_settings(running, new)
    assert changed == ["rate_limits.backend", "rate_limits.on_redis_error", "rate_limits.instances"]
    limits = merged.rate_limits
    assert (limits.backend, limits.on_redis_error, limits.instances) == ("local", "local", 1)
    assert limits.tiers == new.rate_limits.tiers and limits.tiers["free"].rate.count == 20


def test_hybrid_sync_interval_and_max_buckets_are_restart_only():
    running = config(REDIS, limiter("hybrid", extra=", sync_interval: 100ms"))
    new = config(REDIS, limiter("hybrid", rate="5/second", extra=", sync_interval: 50ms, max_buckets: 500"))
    merged, changed = keep_restart_only_settings(running, new)
    assert changed == ["rate_limits.sync_interval", "rate_limits.max_buckets"]
    assert (merged.rate_limits.sync_interval, merged.rate_limits.max_buckets) == (0.1, 100_000)
    assert merged.rate_limits.tiers["free"].rate.text == "5/second"


def test_a_local_limiter_may_come_and_go():
    plain, local = config(), config(limiter("local"))
    assert keep_restart_only_settings(plain, local) == (local, [])
    assert keep_restart_only_settings(local, plain) == (plain, [])


def test_a_redis_backed_limiter_removed_refuses_the_reload():
    with pytest.raises(ReloadRefused) as info:
        keep_restart_only_settings(config(REDIS, limiter("redis")), config())
    assert str(info.value) == "rate_limits: a Redis-backed limiter added or removed needs a restart"


def test_a_redis_backed_limiter_added_refuses_the_reload():
    """Routes of the new file would be limited by tiers the running gateway does not have."""
    with pytest.raises(ReloadRefused):
        keep_restart_only_settings(config(), config(REDIS, limiter("hybrid")))
