"""The operations sections: `admin:` (/healthz, /readyz, /status, /metrics, the status page)
and `manhole:` (a Python console over SSH)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

from txgateway._yamlreader import Reader, _Invalid

__all__ = ["AdminConfig", "ManholeConfig", "parse_admin", "parse_manhole"]


@dataclass(frozen=True)
class AdminConfig:
    endpoint: str = "tcp:9901:interface=127.0.0.1"
    token: str | None = field(default=None, repr=False)   # bearer token for all but /healthz and /readyz


def parse_admin(r: Reader, node: yaml.Node, environ: Mapping[str, str] | None) -> AdminConfig:
    path = "admin"
    f = r.mapping(node, path, {"endpoint": "", "token_env": ""})
    before = len(r.problems)
    values: dict[str, str] = {}
    if "endpoint" in f:
        values["endpoint"] = r.attempt(lambda: r.string(f["endpoint"], f"{path}.endpoint"), AdminConfig.endpoint)
    if "token_env" in f:
        name = r.attempt(lambda: r.string(f["token_env"], f"{path}.token_env"), "")
        token = (os.environ if environ is None else environ).get(name, "") if name else ""
        if name and len(token) < 16:
            r.fail(f["token_env"], f"{path}.token_env",
                   f"environment variable {name} must hold a token of at least 16 characters"
                   + (" (it is not set)" if not token else ""))
        values["token"] = token
    if len(r.problems) != before:
        raise _Invalid()
    return AdminConfig(**values)


@dataclass(frozen=True)
class ManholeConfig:
    authorized_keys: str
    host_key: str
    endpoint: str = "tcp:2222:interface=127.0.0.1"


def parse_manhole(r: Reader, node: yaml.Node) -> ManholeConfig:
    """authorized_keys must be readable now and hold at least one key; host_key is created
    on first start when missing, so only its directory must exist."""
    from twisted.conch.checkers import readAuthorizedKeyFile

    path = "manhole"
    f = r.mapping(node, path, {"endpoint": "", "authorized_keys": "", "host_key": ""})
    before = len(r.problems)
    for key in ("authorized_keys", "host_key"):
        if key not in f:
            r.fail(node, f"{path}.{key}", "missing (required): a file path")
    values = {key: r.attempt(lambda: r.string(f[key], f"{path}.{key}"), "") for key in f}
    keys_path = values.get("authorized_keys")
    if keys_path:
        try:
            with open(keys_path, "rb") as keys_file:
                count = len(list(readAuthorizedKeyFile(keys_file)))
        except OSError as e:
            r.fail(f["authorized_keys"], f"{path}.authorized_keys", f"cannot read {keys_path}: {e.strerror}")
        else:
            if count == 0:
                r.fail(f["authorized_keys"], f"{path}.authorized_keys", f"{keys_path} holds no usable public key")
    host_key = values.get("host_key")
    if host_key and not os.path.exists(host_key) and not os.path.isdir(os.path.dirname(os.path.abspath(host_key)) or "."):
        r.fail(f["host_key"], f"{path}.host_key", f"directory of {host_key} does not exist (the key is created there)")
    if len(r.problems) != before:
        raise _Invalid()
    return ManholeConfig(**values)
