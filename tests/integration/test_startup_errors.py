"""`twistd txgateway` refusing to start says why in one line, exits non-zero, shows no traceback.

Real twistd subprocesses: a listener (gateway, admin, Manhole; the --workers parent's own
bind) on an address another socket holds, daemonised as well as in the foreground.
"""

from __future__ import annotations

import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key

from tests.integration.test_lifecycle import TWISTD

IN_USE = "Address already in use"


@pytest.fixture
def held() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on for the whole test."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


def config(tmp_path: Path, listen: str, extra: str = "") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(f"""\
        listen:
          - endpoint: "{listen}"
        upstreams:
          users: {{targets: ["http://127.0.0.1:9"]}}
        routes:
          - {{prefix: /api/users, upstream: users}}
        """) + textwrap.dedent(extra))
    return path


def twistd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TWISTD), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, check=False)


def assert_one_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit status 1, `message` said once as a line's end (after twistd's log prefix, if any),
    nothing about it beyond that line, and no traceback."""
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    said = [line for line in out.splitlines() if "cannot listen" in line]
    assert len(said) == 1 and said[0].endswith(f"txgateway: {message}"), out
    assert "Traceback" not in out and "Unhandled" not in out, out


def test_a_gateway_listener_on_an_address_in_use(tmp_path, held):
    endpoint = f"tcp:{held}:interface=127.0.0.1"
    result = twistd(tmp_path, "-n", "txgateway", "--config", str(config(tmp_path, endpoint)))
    assert_one_line(result, f"listen[0] ({endpoint}) cannot listen on 127.0.0.1:{held}: {IN_USE}")
    assert not (tmp_path / "twistd.pid").exists()      # twistd cleaned up as after any failed start


def test_the_admin_listener_on_an_address_in_use(tmp_path, held):
    endpoint = f"tcp:{held}:interface=127.0.0.1"
    path = config(tmp_path, "tcp:0:interface=127.0.0.1", f'admin: {{endpoint: "{endpoint}"}}\n')
    result = twistd(tmp_path, "-n", "--pidfile=", "txgateway", "--config", str(path))
    assert_one_line(result, f"admin ({endpoint}) cannot listen on 127.0.0.1:{held}: {IN_USE}")


def test_the_manhole_listener_on_an_address_in_use(tmp_path, held):
    keys = tmp_path / "authorized_keys"
    keys.write_bytes(Key(ed25519.Ed25519PrivateKey.generate()).public().toString("OPENSSH") + b"\n")
    endpoint = f"tcp:{held}:interface=127.0.0.1"
    path = config(tmp_path, "tcp:0:interface=127.0.0.1", f"""\
        manhole:
          endpoint: "{endpoint}"
          authorized_keys: authorized_keys
          host_key: manhole_host_key
        """)
    result = twistd(tmp_path, "-n", "--pidfile=", "txgateway", "--config", str(path))
    assert_one_line(result, f"manhole ({endpoint}) cannot listen on 127.0.0.1:{held}: {IN_USE}")


def test_the_workers_parent_binding_an_address_in_use(tmp_path, held):
    endpoint = f"tcp:{held}:interface=127.0.0.1"
    result = twistd(tmp_path, "-n", "--pidfile=", "txgateway", "--config", str(config(tmp_path, endpoint)),
                    "--workers", "2")
    assert_one_line(result, f"listen[0] ({endpoint}) cannot listen on 127.0.0.1:{held}: {IN_USE}")
    assert "worker 0 started" not in result.stdout + result.stderr


def test_daemonised_the_start_fails_at_once_and_the_log_has_the_line(tmp_path, held):
    """The daemon's waiting parent is told (twistd's own message, cut at 100 bytes by twistd)
    instead of waiting forever; the log file has the one line; the pid file is gone."""
    endpoint = f"tcp:{held}:interface=127.0.0.1"
    log, pid = tmp_path / "twistd.log", tmp_path / "twistd.pid"
    result = twistd(tmp_path, f"--pidfile={pid}", f"--logfile={log}", "txgateway",
                    "--config", str(config(tmp_path, endpoint)))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"An error has occurred: b'txgateway.transport.endpoints.ListenerError: listen[0] "
                                    f"({endpoint}) cannot"), result.stderr
    # The line is logged before the parent is told, so it is there when the parent has exited.
    assert_one_line(subprocess.CompletedProcess([], 1, log.read_text(), ""),
                    f"listen[0] ({endpoint}) cannot listen on 127.0.0.1:{held}: {IN_USE}")
    # twistd removes the pid file after telling the parent: wait (bounded) for the child to do it.
    deadline = time.monotonic() + 10
    while pid.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid.exists()


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one process", "workers"])
def test_a_listener_twisted_cannot_read_is_a_config_error_before_start(tmp_path, workers):
    path = config(tmp_path, "tcp:notaport")
    result = twistd(tmp_path, "-n", "--pidfile=", "txgateway", "--config", str(path), *workers)
    assert result.returncode == 1
    assert (result.stdout, result.stderr.splitlines()) == ("", [
        f'{path}:2: listen[0].endpoint: expected "tcp:PORT[:interface=ADDRESS][:backlog=N]", got "tcp:notaport": '
        '"notaport" is not a number',
        f"{path}: 1 error(s), configuration rejected",
    ])
