"""The `redis:` section: where the shared rate-limit state lives, and how long to wait for it."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import yaml

from txgateway.config.reader import Reader, _Invalid
from txgateway.config.units import parse_duration

__all__ = ["RedisConfig", "parse_redis"]

_URL_FORM = 'a URL like "redis://127.0.0.1:6379/0" or "redis://:PASSWORD@host:6379/0"'


@dataclass(frozen=True)
class RedisConfig:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_master: str | None = None                  # Sentinel: the monitored master's name ...
    sentinel_hosts: tuple[tuple[str, int], ...] = ()    # ... and the sentinels to ask for it
    timeout: float = 0.2                                # every call, connecting included
    pool_size: int = 4

    @property
    def where(self) -> str:
        """For logs and status: where Redis is, never with the password."""
        if self.sentinel_master is not None:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinel_hosts)
            return f"sentinel:{self.sentinel_master}@{hosts}/{self.db}"
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis(r: Reader, node: yaml.Node, environ: Mapping[str, str] | None) -> RedisConfig:
    path = "redis"
    f = r.mapping(node, path, {k: "" for k in ("url", "sentinel", "timeout", "password_env", "pool_size")})
    before = len(r.problems)
    values: dict[str, object] = {}
    if ("url" in f) == ("sentinel" in f):
        raise r.fail(node, path, "expected exactly one of url or sentinel")
    where = _url if "url" in f else _sentinel
    none: dict[str, object] = {}
    values.update(r.attempt(lambda: where(r, f.get("url") or f["sentinel"]), none))
    if "password_env" in f:
        name = r.string(f["password_env"], f"{path}.password_env")
        env = os.environ if environ is None else environ
        if not env.get(name):
            r.fail(f["password_env"], f"{path}.password_env", f"environment variable {name} is not set or empty")
        elif values.get("password"):
            r.fail(f["password_env"], f"{path}.password_env", "the url already has a password; keep one of them")
        else:
            values["password"] = env[name]
    if "timeout" in f:
        timeout = r.attempt(lambda: r.parsed(f["timeout"], f"{path}.timeout", parse_duration), 0.2)
        if not 0.001 <= timeout <= 10.0:
            r.fail(f["timeout"], f"{path}.timeout", f"expected between 1ms and 10s, got {f['timeout'].value}")
        values["timeout"] = timeout
    if "pool_size" in f:
        values["pool_size"] = r.attempt(lambda: r.integer(f["pool_size"], f"{path}.pool_size", 1), 4)
    if len(r.problems) != before:
        raise _Invalid()
    return RedisConfig(**values)  # type: ignore[arg-type]


def _url(r: Reader, node: yaml.Node) -> dict[str, object]:
    url = r.string(node, "redis.url")
    try:
        parts = urlsplit(url)
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        raise r.fail(node, "redis.url", f'expected {_URL_FORM}, got "{_hide_password(url)}"') from None
    if parts.scheme == "rediss":
        raise r.fail(node, "redis.url", "rediss:// (Redis over TLS) is not supported yet; use redis:// on a trusted network")
    db_text = parts.path.lstrip("/") or "0"
    if (parts.scheme != "redis" or not hostname or port == 0 or not re.fullmatch(r"[0-9]{1,5}", db_text)
            or parts.query or parts.fragment):
        raise r.fail(node, "redis.url", f'expected {_URL_FORM}, got "{_hide_password(url)}"')
    return {"host": hostname, "port": port or 6379, "db": int(db_text),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None}


def _sentinel(r: Reader, node: yaml.Node) -> dict[str, object]:
    path = "redis.sentinel"
    f = r.mapping(node, path, {"master": "", "hosts": "", "db": ""})
    for key in ("master", "hosts"):
        if key not in f:
            raise r.fail(node, f"{path}.{key}", "missing (required)")
    master = r.string(f["master"], f"{path}.master")
    if not master:
        raise r.fail(f["master"], f"{path}.master", "expected the name Sentinel monitors the master by, got an empty string")
    hosts: list[tuple[str, int]] = []
    for item_path, item in r.sequence(f["hosts"], f"{path}.hosts"):
        text = r.string(item, item_path)
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise r.fail(item, item_path, f'expected "host:port" of a sentinel, got "{text}"')
        hosts.append((host.strip("[]"), int(port)))
    if not hosts:
        raise r.fail(f["hosts"], f"{path}.hosts", "expected at least one sentinel")
    db = r.integer(f["db"], f"{path}.db") if "db" in f else 0
    return {"sentinel_master": master, "sentinel_hosts": tuple(hosts), "db": db}


def _hide_password(url: str) -> str:
    """Everything between // and the last @ may be a password (even one with / or # in it)."""
    masked, found = re.subn(r"//([^:/@]*):.*@", r"//\1:***@", url)
    return masked if found else re.sub(r"//.*@", "//***@", url)
