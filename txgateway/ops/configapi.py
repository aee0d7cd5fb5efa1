"""The configuration through the admin listener (Kong's DB-less `/config`, declaratively).

`GET /config` shows the running configuration as the file it was read from said it, secrets
redacted; `POST /config/check` validates a body (YAML or JSON: JSON is YAML) exactly as the
file would be validated; `PUT /config` validates it, writes it over the config file
atomically (temp file + rename; the version it replaces is kept as `<file>.prev`) and
reloads as SIGHUP does. An invalid body, or one the reload refuses, changes nothing: the
file is restored and the old configuration keeps serving. Off unless `admin.config_api` is
true, which needs `admin.token_env` (ops/config.py): this rewrites what the gateway runs.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import yaml

from txgateway.config.reader import ConfigError, ConfigProblem
from txgateway.config.schema import parse_config

__all__ = ["MAX_BODY", "apply", "check", "redacted", "running"]

MAX_BODY = 1 << 20                # bytes of a configuration sent to /config
REDACTED = "<redacted>"
# Keys whose value is a secret itself (the *_env and *_file keys only name where one is).
_SECRET_KEY = re.compile(r"secret|password|passwd|token|authorization|cookie|api[-_]?key|private", re.I)
_NAMES_ONLY = re.compile(r"_(env|file|files)$", re.I)


def redacted(value: Any) -> Any:
    """`value` with every secret-looking mapping value replaced (keys naming an environment
    variable or a file are kept: they hold no secret)."""
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(k) and not isinstance(v, (dict, list)) else redacted(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def _secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key)) and not _NAMES_ONLY.search(key)


def running(gateway: Any) -> dict[str, Any]:
    """What GET /config answers: the running configuration's file and content, redacted."""
    config = gateway.config
    return {"file": config.file, "config": redacted(yaml.safe_load(config.source) if config.source else None)}


def problems_body(problems: list[ConfigProblem]) -> dict[str, Any]:
    return {"error": "invalid configuration; nothing was applied",
            "problems": [{"line": p.line, "path": p.path, "message": p.message, "file": p.file,
                          "text": str(p)} for p in problems]}


def _text(body: bytes, file: str) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        line = body.count(b"\n", 0, e.start) + 1
        raise ConfigError([ConfigProblem(file, line, "", f"not UTF-8 text (byte 0x{body[e.start]:02x})")]) from None


def check(gateway: Any, body: bytes) -> str:
    """The body's text if it is a valid configuration for the running file's place (relative
    paths resolve beside that file, as they would in it); raises ConfigError."""
    file = gateway.config.file
    text = _text(body, file)
    parse_config(text, file)
    return text


def apply(gateway: Any, body: bytes) -> dict[str, Any]:
    """Validate, write over the config file (keeping the previous one), reload. Raises
    ConfigError listing what refused it; then the file is as it was."""
    text = check(gateway, body)
    file = gateway.config.file
    previous = file + ".prev"
    _write_atomically(previous, _read(file))
    _write_atomically(file, text.encode("utf-8"))
    problems = gateway.reload_everywhere()
    if problems:
        _write_atomically(file, _read(previous))
        raise ConfigError([ConfigProblem(file, None, "", p) for p in problems])
    return {"applied": True, "file": file, "previous": previous}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_atomically(path: str, data: bytes) -> None:
    """A reader (a restart, a SIGHUP) sees the old file or the new one, never a half-written one."""
    temp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            shutil.copymode(path, temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
