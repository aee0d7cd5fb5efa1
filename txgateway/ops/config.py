"""The operations sections: `admin:` (/healthz, /readyz, /status, /metrics, the status page)
and `manhole:` (a Python console over SSH)."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from txgateway.config.reader import Reader, _Invalid, cannot_write
from txgateway.transport.endpoints import tcp_address

__all__ = ["AdminConfig", "ManholeConfig", "parse_admin", "parse_manhole"]


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


@dataclass(frozen=True)
class AdminConfig:
    endpoint: str = "tcp:9901:interface=127.0.0.1"
    token: str | None = field(default=None, repr=False)   # bearer token for all but /healthz and /readyz
    allowed_hosts: tuple[str, ...] = ()    # Host names answered besides localhost and IP addresses
    config_api: bool = False               # PUT /config and POST /config/check (ops/configapi.py)


def _loopback_only(endpoint: str) -> bool:
    """Whether a listener on `endpoint` is reachable from this host only (unix sockets are)."""
    address = tcp_address(endpoint)
    if address is None:
        return not endpoint.startswith("systemd:")     # a systemd socket may be on any interface
    if address.interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.interface).is_loopback
    except ValueError:
        return False                                   # a host name: whatever it resolves to


def parse_admin(r: Reader, node: yaml.Node, environ: Mapping[str, str] | None) -> AdminConfig:
    """`admin.endpoint` off loopback needs `token_env`: /status and /metrics would be open to
    every host that can reach it. `config_api` needs it anywhere: on loopback too, any local
    user could otherwise rewrite what the gateway runs."""
    path = "admin"
    f = r.mapping(node, path, {"endpoint": "", "token_env": "", "allowed_hosts": "", "config_api": ""})
    before = len(r.problems)
    values: dict[str, Any] = {}
    if "endpoint" in f:
        values["endpoint"] = r.attempt(lambda: r.endpoint(f["endpoint"], f"{path}.endpoint"), AdminConfig.endpoint)
    if "allowed_hosts" in f:
        values["allowed_hosts"] = tuple(r.attempt(lambda: _host_names(r, f["allowed_hosts"], f"{path}.allowed_hosts"), []))
    if "token_env" in f:
        name = r.attempt(lambda: r.string(f["token_env"], f"{path}.token_env"), None)
        token = (os.environ if environ is None else environ).get(name, "") if name else ""
        if name is None:
            pass                                   # not a string: reported already
        elif not name:
            r.fail(f["token_env"], f"{path}.token_env", "expected the name of an environment variable, got an empty string")
        elif len(token) < 16:
            r.fail(f["token_env"], f"{path}.token_env",
                   f"environment variable {name} must hold a token of at least 16 characters"
                   + (" (it is not set)" if not token else ""))
        values["token"] = token
    if "config_api" in f:
        values["config_api"] = r.attempt(lambda: r.boolean(f["config_api"], f"{path}.config_api"), False)
        if values["config_api"] and "token_env" not in f:
            r.fail(f["config_api"], f"{path}.config_api",
                   "PUT /config rewrites the running configuration: it needs admin.token_env (a bearer token)")
    endpoint = values.get("endpoint", AdminConfig.endpoint)
    if "token_env" not in f and not _loopback_only(endpoint):
        r.fail(f.get("endpoint", node), f"{path}.endpoint",
               f'"{endpoint}" is reachable from other hosts and there is no admin.token_env: /status '
               "and /metrics would be open to them; set token_env, or listen on 127.0.0.1")
    if len(r.problems) != before:
        raise _Invalid()
    return AdminConfig(**values)


def _host_names(r: Reader, node: yaml.Node, path: str) -> list[str]:
    names = []
    for item_path, item in r.sequence(node, path):
        name = r.string(item, item_path).lower().rstrip(".")
        if not _HOST_NAME.match(name):
            raise r.fail(item, item_path, f'expected a host name like "gw-admin.internal" (no port), got {name!r}')
        names.append(name)
    return names


@dataclass(frozen=True)
class ManholeConfig:
    authorized_keys: str
    host_key: str
    endpoint: str = "tcp:2222:interface=127.0.0.1"


def read_authorized_keys(path: str) -> list[Any]:
    """The public keys of an OpenSSH authorized_keys file (conch Key objects). Raises OSError,
    or ValueError naming the first line that is not a public key (conch's own reader lets
    some malformed lines escape as binascii/struct errors)."""
    from twisted.conch.ssh.keys import Key
    keys = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                key = Key.fromString(line)
            except Exception:
                raise ValueError(f"{path} line {number} is not an OpenSSH public key") from None
            if not key.isPublic():
                raise ValueError(f"{path} line {number} is a private key; authorized_keys takes public keys")
            keys.append(key)
    return keys


def unsafe_mode(path: str, private: bool) -> str | None:
    """Why OpenSSH's StrictModes would refuse `path` (None: it would not): a file or directory
    that group or others can write (anyone able to write authorized_keys gets a Python console
    inside the gateway), or a private key they can read. The file is checked if it is one, its
    directory always."""
    checks = [(os.path.dirname(os.path.abspath(path)), "its directory ", stat.S_IWGRP | stat.S_IWOTH, "writable")]
    if os.path.isfile(path):
        checks.insert(0, (path, "", stat.S_IWGRP | stat.S_IWOTH, "writable"))
        if private:
            checks.insert(1, (path, "", stat.S_IRWXG | stat.S_IRWXO, "readable"))
    for where, what, bits, verb in checks:
        try:
            mode = os.stat(where).st_mode
        except OSError:
            continue                   # reported by the checks that read the file
        if mode & bits:
            fix = "chmod 600" if verb == "readable" else "chmod go-w"
            return (f"{what}{where} is {verb} by group or others (mode {stat.S_IMODE(mode):04o}); "
                    f"the Manhole refuses it as OpenSSH's StrictModes does: {fix} {where}")
    return None


def parse_manhole(r: Reader, node: yaml.Node) -> ManholeConfig:
    """authorized_keys must be readable now and hold at least one key; host_key is created
    on first start when missing, so only its directory must exist (an existing one must be
    a private key). Neither may be writable by group or others, nor the host key readable
    by them (`unsafe_mode`)."""
    from twisted.conch.ssh.keys import Key

    path = "manhole"
    f = r.mapping(node, path, {"endpoint": "", "authorized_keys": "", "host_key": ""})
    before = len(r.problems)
    for key in ("authorized_keys", "host_key"):
        if key not in f:
            r.fail(node, f"{path}.{key}", "missing (required): a file path")
    readers = {"endpoint": r.endpoint, "authorized_keys": r.file_path, "host_key": r.file_path}
    read = {key: r.attempt(lambda: readers[key](f[key], f"{path}.{key}"), None) for key in f}
    values = {key: value for key, value in read.items() if value is not None}
    for key, private in (("authorized_keys", False), ("host_key", True)):
        problem = unsafe_mode(values[key], private) if values.get(key) else None
        if problem:
            r.fail(f[key], f"{path}.{key}", problem)
    keys_path = values.get("authorized_keys")
    if keys_path:
        try:
            count = len(read_authorized_keys(keys_path))
        except OSError as e:
            r.fail(f["authorized_keys"], f"{path}.authorized_keys", f"cannot read {keys_path}: {e.strerror}")
        except ValueError as e:
            r.fail(f["authorized_keys"], f"{path}.authorized_keys", str(e))
        else:
            if count == 0:
                r.fail(f["authorized_keys"], f"{path}.authorized_keys", f"{keys_path} holds no usable public key")
    host_key = values.get("host_key")
    if host_key and os.path.exists(host_key):
        try:
            usable = not Key.fromFile(host_key).isPublic()
        except Exception:
            usable = False
        if not usable:
            r.fail(f["host_key"], f"{path}.host_key", f"{host_key} exists but is not a private key file")
    elif host_key and cannot_write(host_key):
        r.fail(f["host_key"], f"{path}.host_key",
               f"cannot create {host_key} (made on first start): {cannot_write(host_key)}")
    if len(r.problems) != before:
        raise _Invalid()
    return ManholeConfig(**values)  # type: ignore[arg-type]
