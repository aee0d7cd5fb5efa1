"""`txgateway check-config` as users run it, and the `twistd txgateway` plugin and options."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.python import usage

from txgateway.config import Config

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "txgateway.yaml"
BIN = Path(sys.executable).parent
TXGATEWAY = BIN / "txgateway"
NOT_YET = "not supported yet in this version of txgateway; remove it or upgrade"

BROKEN = """\
listen:
  - endpoint: "tcp:8080"
admin: {endpoint: "tcp:9901"}
upstreams:
  users: {targets: ["http://127.0.0.1:3001"], timeout: 5}
routes:
  - prefix: /api/users
    upstream: users
  - prefix: /api/orders
    upstrem: orders
  - prefix: /api/search
    upstream: search
"""


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TXGATEWAY), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def test_check_config_accepts_the_example():
    result = run("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{EXAMPLE}: OK (4 routes, 3 upstreams, 1 listeners)\n"
    assert result.stderr == ""


def test_check_config_with_a_relative_path(tmp_path):
    (tmp_path / "gw.yaml").write_text(EXAMPLE.read_text())
    result = run("check-config", "gw.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gw.yaml: OK")


def test_check_config_reports_every_error_with_file_line_and_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:3: admin: {NOT_YET}",
        f'{path}:5: upstreams.users.timeout: expected a duration like "250ms", "5s" or "1m", got "5"',
        (f"{path}:10: routes[1].upstrem: unknown key (expected one of: auth, cache, host, methods, prefix, "
         "rate_limit, request_headers, response_headers, rewrite_prefix, roles, security_headers, upstream)"),
        f"{path}:9: routes[1].upstream: missing (required)",
        f'{path}:12: routes[2].upstream: no upstream named "search" (defined: users)',
        f"{path}: 5 error(s), configuration rejected",
    ]


def test_check_config_on_invalid_yaml(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("listen:\n  - endpoint: x\n routes: []\n")
    result = run("check-config", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:3: invalid YAML: ")
    assert lines[-1] == f"{path}: 1 error(s), configuration rejected"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", [
    "listen: [{endpoint: x}]\nupstreams: {}\nroutes: []\naccess_log: !!python/name:os.system ''\n",
    "listen: [{endpoint: x}]\nupstreams: {}\nroutes: []\ndrain_timeout: 10\n",
    "listen: [{endpoint: x}]\nupstreams: {}\nroutes: []\ndrain_timeout: 2024-13-45\n",
])
def test_check_config_never_shows_a_traceback(tmp_path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith(f"{path}:4: ")


def test_check_config_on_a_directory_and_on_binary(tmp_path):
    result = run("check-config", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"{tmp_path}: cannot read config: Is a directory"
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"listen: []\n\xff\xfe\n")
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"{path}:2: cannot read config: not UTF-8 text (byte 0xff)"
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: cannot read config: No such file or directory",
        f"{path}: 1 error(s), configuration rejected",
    ]


def test_usage_errors():
    result = run()
    assert result.returncode == 2
    assert "usage: txgateway" in result.stderr
    result = run("check-config")
    assert result.returncode == 2
    assert "file" in result.stderr


def test_main_in_process(tmp_path, capsys):
    from txgateway.cli import main
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert "OK" in capsys.readouterr().out
    path = tmp_path / "b.yaml"
    path.write_text(BROKEN)
    assert main(["check-config", str(path)]) == 1
    assert f"{path}:3: admin: " in capsys.readouterr().err


# --- the twistd plugin --------------------------------------------------------------------

def test_twistd_plugin_is_discoverable():
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "txgateway" in makers
    maker = makers["txgateway"]
    assert maker.description
    from txgateway import tap
    assert maker.options is tap.Options
    assert maker.makeService == tap.makeService


def test_twistd_lists_the_plugin():
    result = subprocess.run([str(BIN / "twistd"), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert any(line.split()[:1] == ["txgateway"] for line in result.stdout.splitlines())


def options(*args: str):
    from txgateway.tap import Options
    opts = Options()
    opts.parseOptions(list(args))
    return opts


def test_options_require_config_or_demo():
    with pytest.raises(usage.UsageError, match=r"^--config FILE is required \(or --demo to try txgateway out\)$"):
        options()


def test_options_demo_and_config_exclude_each_other():
    with pytest.raises(usage.UsageError, match=r"^--demo and --config exclude each other$"):
        options("--demo", "--config", str(EXAMPLE))


def test_options_with_a_valid_config():
    opts = options("--config", str(EXAMPLE))
    assert isinstance(opts["loaded"], Config)
    assert opts["loaded"].file == str(EXAMPLE)
    assert options("-c", str(EXAMPLE))["config"] == str(EXAMPLE)
    assert options("--demo")["demo"]


def test_options_with_an_invalid_config_name_the_file_line_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        listen: [{endpoint: "tcp:8080"}]
        upstreams:
          users: {targets: ["http://127.0.0.1:3001"]}
        routes:
          - {prefix: /api/users, upstream: users}
          - {prefix: /api/x, upstream: nowhere}
        """))
    with pytest.raises(usage.UsageError) as info:
        options("--config", str(path))
    assert str(info.value) == (
        f'invalid config:\n{path}:6: routes[1].upstream: no upstream named "nowhere" (defined: users)')


def test_options_with_a_missing_config(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(usage.UsageError) as info:
        options("--config", str(path))
    assert str(info.value) == f"invalid config:\n{path}: cannot read config: No such file or directory"
