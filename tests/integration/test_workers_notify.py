"""`--workers 2` under systemd (Type=notify, NotifyAccess=main): the parent, the unit's main
process, sends READY=1 and STOPPING=1; the workers send nothing (they do not see NOTIFY_SOCKET).

Before, the workers inherited NOTIFY_SOCKET and each sent READY=1 (and STOPPING=1) from its
own PID, which systemd drops under NotifyAccess=main, while the parent sent nothing: the unit's
start timed out. The sender of each datagram is read from the kernel (SO_PASSCRED: the
SCM_CREDENTIALS of each message), not from the gateway.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.integration.test_lifecycle import START_TIMEOUT, STOP_TIMEOUT, assert_clean_shutdown
from tests.integration.test_workers import two_workers

QUIET = 2.0              # seconds in which no further message may arrive
UCRED = struct.Struct("iII")     # struct ucred: pid, uid, gid


@contextlib.contextmanager
def notify_socket() -> Iterator[socket.socket]:
    """A unix datagram socket passing each sender's credentials; bound in a short directory
    (sun_path is limited to 108 bytes; pytest's tmp_path may be longer)."""
    with tempfile.TemporaryDirectory(prefix="gwnotify") as directory:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(str(Path(directory) / "notify"))
            yield sock
        finally:
            sock.close()


def receive(sock: socket.socket, timeout: float) -> tuple[int | None, bytes] | None:
    """(sender pid, message) of the next datagram within `timeout` s, or None."""
    sock.settimeout(timeout)
    try:
        message, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
    except TimeoutError:
        return None
    pid = None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = UCRED.unpack(data[:UCRED.size])[0]
    return pid, message


def all_within(sock: socket.socket, seconds: float) -> list[tuple[int | None, bytes]]:
    """Every datagram arriving in the next `seconds` s."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        got = receive(sock, left)
        if got is not None:
            out.append(got)
    return out


def test_the_parent_alone_notifies_ready_and_stopping(tmp_path, monkeypatch):
    with notify_socket() as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", sock.getsockname())
        with two_workers(tmp_path) as (_, daemon, port, _):
            parent = daemon.proc.pid
            first = receive(sock, START_TIMEOUT)
            assert first is not None, f"no READY=1 within {START_TIMEOUT}s:\n{daemon.output}"
            workers = daemon.wait_ready(port)
            assert parent not in workers
            assert first == (parent, b"READY=1"), (first, parent, workers)
            # Both workers are listening now: nothing else says READY=1.
            assert all_within(sock, QUIET) == [], workers

            daemon.proc.send_signal(signal.SIGTERM)
            stopping = receive(sock, STOP_TIMEOUT)
            assert stopping == (parent, b"STOPPING=1"), (stopping, parent, workers)
            assert_clean_shutdown(daemon, daemon.wait(STOP_TIMEOUT))
            assert all_within(sock, 0.2) == [], workers            # the workers said nothing either

