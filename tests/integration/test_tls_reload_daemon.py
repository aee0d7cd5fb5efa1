"""Certificates reload on SIGHUP in a real twistd: new handshakes get the renewed certificate,
the process keeps running and keeps its connections (issue 6)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port
from tests.integration.test_lifecycle import STOP_TIMEOUT, Daemon, assert_clean_shutdown
from tests.test_tls_config import CertAuthority

WAIT = 10.0


def served_serial(port: int) -> int | None:
    """The serial number of the certificate the gateway presents for SNI a.test."""
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "a.test"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT, check=False)
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", proc.stdout, re.S)
    if pem is None:
        return None
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.group(0), capture_output=True,
                         timeout=WAIT, check=True).stdout.decode()
    return int(out.strip().split("=", 1)[1], 16)


def test_sighup_serves_the_renewed_certificate(tmp_path: Path) -> None:
    ca = CertAuthority()
    first = ca.issue(tmp_path, "a", "a.test", ("a.test",), serial=1001)
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"""\
listen:
  - endpoint: "tcp:{port}:interface=127.0.0.1"
    tls:
      certificates: [{{cert: {first.cert}, key: {first.key}}}]
access_log: "off"
upstreams:
  users: {{targets: ["http://127.0.0.1:9"]}}
routes:
  - {{prefix: /api/users, upstream: users}}
""")
    daemon = Daemon(tmp_path, config)
    try:
        daemon.wait_for_port(port)
        assert served_serial(port) == 1001
        ca.issue(tmp_path, "a", "a.test", ("a.test",), serial=2002)      # renewed in place
        assert served_serial(port) == 1001                               # until told
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while served_serial(port) != 2002:
            assert time.monotonic() < deadline, daemon.output
            assert daemon.proc.poll() is None, daemon.output
            time.sleep(0.1)
        assert "reload: " in daemon.output and "applied" in daemon.output
        daemon.proc.send_signal(signal.SIGTERM)
        assert_clean_shutdown(daemon, daemon.wait(STOP_TIMEOUT))
    finally:
        daemon.kill()
