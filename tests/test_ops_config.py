"""The operations sections, `admin:` and `manhole:`: their values, and every validation error
with the exact file:line: key.path: message that check-config prints."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key

from tests.configcheck import BASE, config_errors, unwritable
from txgateway.config.schema import ConfigError, parse_config
from txgateway.ops.config import AdminConfig, ManholeConfig
from txgateway.service.cli import main

# BASE (tests.configcheck) is lines 1-8; the section under test starts at line 9, its first key
# (block style) at line 10.
TOKEN = "adm1n-t0ken-0123456789abcdef"     # tests only, never a real secret
ADMIN_KEYS = "allowed_hosts, config_api, endpoint, token_env"
MANHOLE_KEYS = "authorized_keys, endpoint, host_key"
MISSING_KEYS = "c.yaml:9: manhole.authorized_keys: missing (required): a file path"
MISSING_HOST_KEY = "c.yaml:9: manhole.host_key: missing (required): a file path"


def config(section: str, env: dict[str, str] | None = None):
    return parse_config(BASE + textwrap.dedent(section), "c.yaml", {} if env is None else env)


def errors(section: str, env: dict[str, str] | None = None) -> list[str]:
    return config_errors(BASE + textwrap.dedent(section), environ={} if env is None else env)


def openssh_public_key(comment: str = "ops@example") -> bytes:
    return Key(ed25519.Ed25519PrivateKey.generate()).public().toString("OPENSSH", comment=comment)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    """An authorized_keys file with one ed25519 key, a comment and a blank line."""
    path = tmp_path / "authorized_keys"
    path.write_bytes(b"# operators of the gateway\n\n" + openssh_public_key() + b"\n")
    return path


def manhole(keys: Path | str, host_key: Path | str, extra: str = "") -> str:
    """A block-style manhole section: authorized_keys on line 10, host_key on line 11."""
    return f"manhole:\n  authorized_keys: {keys}\n  host_key: {host_key}\n{extra}"


# --- admin: values --------------------------------------------------------------------------

def test_no_admin_and_no_manhole_section():
    c = config("")
    assert (c.admin, c.manhole) == (None, None)


def test_admin_defaults_to_loopback_port_9901_without_a_token():
    assert config("admin: {}\n").admin == AdminConfig(endpoint="tcp:9901:interface=127.0.0.1", token=None)


def test_admin_endpoint():
    c = config('admin:\n  endpoint: "tcp:19901:interface=\\\\:\\\\:1"\n')
    assert c.admin == AdminConfig(endpoint="tcp:19901:interface=\\:\\:1", token=None)


def test_an_admin_endpoint_twisted_cannot_read_is_an_error():
    assert errors('admin:\n  endpoint: "tcp:19901:interface=::1"\n') == [
        'c.yaml:10: admin.endpoint: expected "tcp:PORT[:interface=ADDRESS][:backlog=N]", got '
        '"tcp:19901:interface=::1": "interface" given twice; an IPv6 address needs its colons escaped: '
        'interface=\\:\\:1']


def test_admin_token_from_the_environment_is_kept_out_of_reprs():
    c = config("admin:\n  token_env: ADMIN_TOKEN\n", {"ADMIN_TOKEN": TOKEN})
    assert c.admin == AdminConfig(endpoint="tcp:9901:interface=127.0.0.1", token=TOKEN)
    assert TOKEN not in repr(c.admin) and TOKEN not in repr(c)


def test_an_admin_token_of_exactly_16_characters_is_enough():
    assert config("admin: {token_env: ADMIN_TOKEN}\n", {"ADMIN_TOKEN": "x" * 16}).admin.token == "x" * 16


def test_without_an_explicit_environment_the_process_environment_is_read(monkeypatch):
    monkeypatch.setenv("TXGATEWAY_TEST_ADMIN_TOKEN", TOKEN)
    c = parse_config(BASE + "admin: {token_env: TXGATEWAY_TEST_ADMIN_TOKEN}\n", "c.yaml")
    assert c.admin.token == TOKEN
    monkeypatch.delenv("TXGATEWAY_TEST_ADMIN_TOKEN")
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "admin: {token_env: TXGATEWAY_TEST_ADMIN_TOKEN}\n", "c.yaml")
    assert str(info.value) == ("c.yaml:9: admin.token_env: environment variable TXGATEWAY_TEST_ADMIN_TOKEN must "
                               "hold a token of at least 16 characters (it is not set)")


# --- admin: errors --------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "message"), [
    ({}, "environment variable ADMIN_TOKEN must hold a token of at least 16 characters (it is not set)"),
    ({"ADMIN_TOKEN": ""}, "environment variable ADMIN_TOKEN must hold a token of at least 16 characters (it is not set)"),
    ({"ADMIN_TOKEN": "s3cret-15-chars"}, "environment variable ADMIN_TOKEN must hold a token of at least 16 characters"),
    ({"OTHER": TOKEN}, "environment variable ADMIN_TOKEN must hold a token of at least 16 characters (it is not set)"),
])
def test_admin_token_variable_unset_empty_or_too_short(env, message):
    assert errors('admin:\n  endpoint: "tcp:9901"\n  token_env: ADMIN_TOKEN\n', env) == [
        f"c.yaml:11: admin.token_env: {message}"]


def test_a_too_short_token_is_never_shown():
    short = "s3cret-15-chars"
    assert len(short) == 15
    (problem,) = errors("admin: {token_env: ADMIN_TOKEN}\n", {"ADMIN_TOKEN": short})
    assert short not in problem and "s3cret" not in problem


@pytest.mark.parametrize(("section", "expected"), [
    ("admin:\n", ["c.yaml:9: admin: expected a mapping, got ''"]),
    ("admin: [tcp:9901]\n", ["c.yaml:9: admin: expected a mapping, got a list"]),
    ("admin:\n  endpoint: 9901\n", ["c.yaml:10: admin.endpoint: expected a string, got 9901"]),
    ("admin:\n  endpoint: [tcp:9901]\n", ["c.yaml:10: admin.endpoint: expected a single value, got a list"]),
    ("admin:\n  token_env: [ADMIN_TOKEN]\n", ["c.yaml:10: admin.token_env: expected a single value, got a list"]),
    ("admin:\n  token_env: null\n", ["c.yaml:10: admin.token_env: expected a string, got None"]),
])
def test_admin_wrong_types(section, expected):
    assert errors(section, {"ADMIN_TOKEN": TOKEN}) == expected


def test_admin_unknown_keys_do_not_echo_their_values():
    """A token written into the file instead of an environment variable is refused, not shown."""
    problems = errors(f'admin:\n  endpoint: "tcp:9901:interface=127.0.0.1"\n  token: {TOKEN}\n  port: 9901\n')
    assert problems == [
        f"c.yaml:11: admin.token: unknown key (expected one of: {ADMIN_KEYS})",
        f"c.yaml:12: admin.port: unknown key (expected one of: {ADMIN_KEYS})",
    ]
    assert not any(TOKEN in p for p in problems)


@pytest.mark.parametrize("endpoint, shown", [
    ("tcp:9901", "tcp:9901"),
    ("tcp:9901:interface=0.0.0.0", "tcp:9901:interface=0.0.0.0"),
    ("tcp6:9901:interface=\\\\:\\\\:", "tcp6:9901:interface=\\:\\:"),
    ("tcp:9901:interface=10.1.2.3", "tcp:9901:interface=10.1.2.3"),
    ("tcp:9901:interface=gw.example", "tcp:9901:interface=gw.example"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
])
def test_an_admin_listener_off_loopback_without_a_token_is_refused(endpoint, shown):
    """/status and /metrics (everything the gateway knows) open to the network: a config
    error at check-config and at start, naming the key."""
    assert errors(f'admin:\n  endpoint: "{endpoint}"\n') == [
        f'c.yaml:10: admin.endpoint: "{shown}" is reachable from other hosts and there is no admin.token_env: '
        "/status and /metrics would be open to them; set token_env, or listen on 127.0.0.1"]
    assert config(f'admin:\n  endpoint: "{endpoint}"\n  token_env: ADMIN_TOKEN\n',
                  {"ADMIN_TOKEN": TOKEN}).admin.token == TOKEN


@pytest.mark.parametrize("endpoint", ["tcp:9901:interface=127.0.0.1", "tcp:9901:interface=127.8.9.10",
                                      "tcp6:9901:interface=\\\\:\\\\:1", "tcp:9901:interface=localhost",
                                      "unix:/run/txgateway/admin.sock"])
def test_an_admin_listener_on_loopback_needs_no_token(endpoint):
    assert config(f'admin:\n  endpoint: "{endpoint}"\n').admin.token is None


def test_admin_allowed_hosts_are_lower_case_names_without_port():
    c = config("admin:\n  allowed_hosts: [GW-Admin.Internal., status.example]\n")
    assert c.admin.allowed_hosts == ("gw-admin.internal", "status.example")


@pytest.mark.parametrize(("value", "expected"), [
    ("gw.example", "c.yaml:10: admin.allowed_hosts: expected a list, got 'gw.example'"),
    ("[gw.example:9901]", 'c.yaml:10: admin.allowed_hosts[0]: expected a host name like "gw-admin.internal" '
                          "(no port), got 'gw.example:9901'"),
    ('["a b"]', 'c.yaml:10: admin.allowed_hosts[0]: expected a host name like "gw-admin.internal" (no port), '
                "got 'a b'"),
    ("[[x]]", "c.yaml:10: admin.allowed_hosts[0]: expected a single value, got a list"),
])
def test_admin_allowed_hosts_errors(value, expected):
    assert errors(f"admin:\n  allowed_hosts: {value}\n") == [expected]


def test_admin_duplicate_key():
    assert errors('admin:\n  endpoint: "tcp:9901:interface=127.0.0.1"\n  endpoint: "tcp:9902"\n') == [
        "c.yaml:11: admin.endpoint: duplicate key"]


# --- manhole: values ------------------------------------------------------------------------

def test_manhole_with_a_valid_key_file_and_the_default_endpoint(tmp_path, keys_file):
    c = config(manhole(keys_file, tmp_path / "host_key"))
    assert c.manhole == ManholeConfig(authorized_keys=str(keys_file), host_key=str(tmp_path / "host_key"),
                                      endpoint="tcp:2222:interface=127.0.0.1")
    assert not (tmp_path / "host_key").exists()     # created on first start, not by checking the config


def test_manhole_endpoint(tmp_path, keys_file):
    c = config(manhole(keys_file, tmp_path / "host_key", '  endpoint: "tcp6:2200:interface=\\\\:\\\\:1"\n'))
    assert c.manhole.endpoint == "tcp6:2200:interface=\\:\\:1"


def test_a_manhole_endpoint_twisted_cannot_read_is_an_error(tmp_path, keys_file):
    assert errors(manhole(keys_file, tmp_path / "host_key", '  endpoint: "tcp:ssh"\n')) == [
        'c.yaml:12: manhole.endpoint: expected "tcp:PORT[:interface=ADDRESS][:backlog=N]", got "tcp:ssh": '
        '"ssh" is not a number']


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_manhole_accepts_a_public_key_made_by_ssh_keygen(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@example", "-f", str(tmp_path / "k")],
                   check=True, capture_output=True, timeout=30)
    c = config(manhole(tmp_path / "k.pub", tmp_path / "host_key"))
    assert c.manhole.authorized_keys == str(tmp_path / "k.pub")


def test_manhole_accepts_an_existing_host_key(tmp_path, keys_file):
    host_key = tmp_path / "host_key"
    host_key.write_bytes(Key(ed25519.Ed25519PrivateKey.generate()).toString("OPENSSH"))
    host_key.chmod(0o600)
    assert config(manhole(keys_file, host_key)).manhole.host_key == str(host_key)


# --- manhole: StrictModes (issue 21 item 3) ----------------------------------------------------

def strict(where: Path, verb: str, mode: int, directory: bool = False) -> str:
    fix = "chmod 600" if verb == "readable" else "chmod go-w"
    return (f"{'its directory ' if directory else ''}{where} is {verb} by group or others (mode {mode:04o}); "
            f"the Manhole refuses it as OpenSSH's StrictModes does: {fix} {where}")


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646, 0o620])
def test_a_group_or_world_writable_authorized_keys_is_refused(tmp_path, keys_file, mode):
    keys_file.chmod(mode)
    assert errors(manhole(keys_file, tmp_path / "host_key")) == [
        f"c.yaml:10: manhole.authorized_keys: {strict(keys_file, 'writable', mode)}"]


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_authorized_keys_in_a_writable_directory_is_refused(tmp_path, mode):
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    keys = keys_dir / "authorized_keys"
    keys.write_bytes(openssh_public_key() + b"\n")
    keys.chmod(0o644)
    keys_dir.chmod(mode)
    assert errors(manhole(keys, tmp_path / "host_key")) == [
        f"c.yaml:10: manhole.authorized_keys: {strict(keys_dir, 'writable', mode, directory=True)}"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_host_key_readable_by_others_is_refused(tmp_path, keys_file, mode):
    host_key = tmp_path / "host_key"
    host_key.write_bytes(Key(ed25519.Ed25519PrivateKey.generate()).toString("OPENSSH"))
    host_key.chmod(mode)
    verb = "writable" if mode & 0o022 else "readable"
    assert errors(manhole(keys_file, host_key)) == [f"c.yaml:11: manhole.host_key: {strict(host_key, verb, mode)}"]


def test_a_host_key_still_to_be_made_in_a_world_writable_directory_is_refused(tmp_path, keys_file):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    assert errors(manhole(keys_file, state / "host_key")) == [
        f"c.yaml:11: manhole.host_key: {strict(state, 'writable', 0o777, directory=True)}"]


def test_check_config_and_start_refuse_the_attacks_files(tmp_path, keys_file, capsys):
    """The review's setup: authorized_keys 0666, the host key 0644, its directory 0777."""
    keys_file.chmod(0o666)
    state = tmp_path / "state"
    state.mkdir()
    host_key = state / "host_key"
    host_key.write_bytes(Key(ed25519.Ed25519PrivateKey.generate()).toString("OPENSSH"))
    host_key.chmod(0o644)
    state.chmod(0o777)
    path = tmp_path / "gw.yaml"
    path.write_text(BASE + manhole(keys_file, host_key))
    assert main(["check-config", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"{path}:10: manhole.authorized_keys: {strict(keys_file, 'writable', 0o666)}\n"
        f"{path}:11: manhole.host_key: {strict(host_key, 'readable', 0o644)}\n"
        f"{path}: 2 error(s), configuration rejected\n")
    host_key.chmod(0o600)
    keys_file.chmod(0o644)
    assert main(["check-config", str(path)]) == 1
    assert f"manhole.host_key: {strict(state, 'writable', 0o777, directory=True)}" in capsys.readouterr().err


def test_owner_only_modes_are_accepted(tmp_path, keys_file):
    keys_file.chmod(0o644)                 # readable by all is fine: these are public keys
    host_key = tmp_path / "host_key"
    host_key.write_bytes(Key(ed25519.Ed25519PrivateKey.generate()).toString("OPENSSH"))
    host_key.chmod(0o400)
    assert config(manhole(keys_file, host_key)).manhole.host_key == str(host_key)


def test_manhole_paths_relative_to_the_config_files_directory(tmp_path, keys_file, monkeypatch):
    monkeypatch.chdir("/")
    text = BASE + manhole("authorized_keys", "manhole_host_key")
    assert parse_config(text, str(tmp_path / "c.yaml"), {}).manhole == ManholeConfig(
        authorized_keys=str(keys_file), host_key=str(tmp_path / "manhole_host_key"))
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + manhole("authorized_keys", "state/manhole_host_key"), str(tmp_path / "c.yaml"), {})
    assert str(info.value) == (f"{tmp_path}/c.yaml:11: manhole.host_key: cannot create "
                               f"{tmp_path}/state/manhole_host_key (made on first start): "
                               f"directory {tmp_path}/state does not exist")


def test_manhole_keys_are_read_once_at_load_so_a_later_file_does_not_matter(tmp_path, keys_file):
    c = config(manhole(keys_file, tmp_path / "host_key"))
    keys_file.unlink()
    assert c.manhole.authorized_keys == str(keys_file)


# --- manhole: errors ------------------------------------------------------------------------

@pytest.mark.parametrize("section", ["manhole: {}\n", 'manhole: {endpoint: "tcp:2222"}\n'])
def test_manhole_needs_authorized_keys_and_host_key(section):
    assert errors(section) == [MISSING_KEYS, MISSING_HOST_KEY]


def test_manhole_missing_authorized_keys_only(tmp_path):
    assert errors(f"manhole: {{host_key: {tmp_path}/host_key}}\n") == [MISSING_KEYS]


def test_manhole_missing_host_key_only(keys_file):
    assert errors(f"manhole: {{authorized_keys: {keys_file}}}\n") == [MISSING_HOST_KEY]


def test_manhole_authorized_keys_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    assert errors(manhole(missing, tmp_path / "host_key")) == [
        f"c.yaml:10: manhole.authorized_keys: cannot read {missing}: No such file or directory"]


def test_manhole_authorized_keys_that_is_a_directory(tmp_path):
    assert errors(manhole(tmp_path, tmp_path / "host_key")) == [
        f"c.yaml:10: manhole.authorized_keys: cannot read {tmp_path}: Is a directory"]


@pytest.mark.parametrize("content", [
    b"",
    b"# only comments here\n\n   \n# ssh-ed25519 would go here\n",
], ids=["empty", "only-comments"])
def test_manhole_authorized_keys_without_a_usable_key(tmp_path, content):
    path = tmp_path / "authorized_keys"
    path.write_bytes(content)
    assert errors(manhole(path, tmp_path / "host_key")) == [
        f"c.yaml:10: manhole.authorized_keys: {path} holds no usable public key"]


def test_manhole_authorized_keys_naming_the_private_key_by_mistake(tmp_path):
    private = tmp_path / "id_ed25519"
    private.write_bytes(Key(ed25519.Ed25519PrivateKey.generate()).toString("OPENSSH"))
    assert errors(manhole(private, tmp_path / "host_key")) == [
        f"c.yaml:10: manhole.authorized_keys: {private} line 1 is not an OpenSSH public key"]


def test_manhole_host_key_whose_directory_does_not_exist(tmp_path, keys_file):
    host_key = tmp_path / "missing" / "host_key"
    assert errors(manhole(keys_file, host_key)) == [
        f"c.yaml:11: manhole.host_key: cannot create {host_key} (made on first start): "
        f"directory {host_key.parent} does not exist"]


def test_manhole_host_key_in_a_directory_that_cannot_be_written(tmp_path, keys_file):
    directory = unwritable(tmp_path, "dir")
    assert errors(manhole(keys_file, directory / "host_key")) == [
        f"c.yaml:11: manhole.host_key: cannot create {directory}/host_key (made on first start): "
        f"directory {directory} is not writable"]


@pytest.mark.parametrize(("section", "expected"), [
    ("manhole:\n", ["c.yaml:9: manhole: expected a mapping, got ''"]),
    ("manhole: [a, b]\n", ["c.yaml:9: manhole: expected a mapping, got a list"]),
    ("manhole:\n  authorized_keys: 12\n  host_key: [a]\n", [
        "c.yaml:10: manhole.authorized_keys: expected a string, got 12",
        "c.yaml:11: manhole.host_key: expected a single value, got a list"]),
])
def test_manhole_wrong_types(section, expected):
    assert errors(section) == expected


def test_manhole_wrong_endpoint_type_beside_valid_files(tmp_path, keys_file):
    assert errors(manhole(keys_file, tmp_path / "host_key", "  endpoint: 2222\n")) == [
        "c.yaml:12: manhole.endpoint: expected a string, got 2222"]


def test_manhole_unknown_keys(tmp_path, keys_file):
    assert errors(manhole(keys_file, tmp_path / "host_key", "  user: ops\n  password_env: X\n")) == [
        f"c.yaml:12: manhole.user: unknown key (expected one of: {MANHOLE_KEYS})",
        f"c.yaml:13: manhole.password_env: unknown key (expected one of: {MANHOLE_KEYS})",
    ]


# --- several at once ------------------------------------------------------------------------

def test_every_admin_and_manhole_error_is_reported_in_one_run(tmp_path):
    """Problems come in line order; the short token is never shown."""
    short = "sh0rt-s3cret"
    section = f"""\
        admin:
          endpoint: 9901
          token_env: ADMIN_TOKEN
          tokn: {TOKEN}
        manhole:
          endpoint: "tcp:2222"
          authorized_keys: {tmp_path}/authorized_keys
          host_key: {tmp_path}/nodir/host_key
          user: ops
        drain_timeout: forever
        """
    problems = errors(section, {"ADMIN_TOKEN": short})
    assert problems == [
        "c.yaml:10: admin.endpoint: expected a string, got 9901",
        "c.yaml:11: admin.token_env: environment variable ADMIN_TOKEN must hold a token of at least 16 characters",
        f"c.yaml:12: admin.tokn: unknown key (expected one of: {ADMIN_KEYS})",
        f"c.yaml:15: manhole.authorized_keys: cannot read {tmp_path}/authorized_keys: No such file or directory",
        f"c.yaml:16: manhole.host_key: cannot create {tmp_path}/nodir/host_key (made on first start): "
        f"directory {tmp_path}/nodir does not exist",
        f"c.yaml:17: manhole.user: unknown key (expected one of: {MANHOLE_KEYS})",
        'c.yaml:18: drain_timeout: expected a duration like "250ms", "5s" or "1m", got "forever"',
    ]
    assert not any(short in p or TOKEN in p for p in problems)


def test_a_manhole_error_does_not_hide_the_rest_of_the_config(tmp_path):
    text = BASE.replace("upstream: orders}", "upstream: search}") + f"manhole: {{host_key: {tmp_path}/hk}}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml", {})
    assert [str(p) for p in info.value.problems] == [
        'c.yaml:8: routes[1].upstream: no upstream named "search" (defined: orders, users)',
        MISSING_KEYS,
    ]


# --- known bugs in txgateway/ops/config.py (strict xfail: they turn red once fixed) ----------

def test_an_empty_token_env_name_is_an_error():
    (problem,) = errors('admin: {token_env: ""}\n')
    assert problem.startswith("c.yaml:9: admin.token_env: ")


def test_empty_manhole_paths_are_errors():
    problems = errors('manhole:\n  authorized_keys: ""\n  host_key: ""\n')
    assert [p.split(": ")[:2] for p in problems] == [
        ["c.yaml:10", "manhole.authorized_keys"], ["c.yaml:11", "manhole.host_key"]]


@pytest.mark.parametrize("what", ["directory", "public-key"])
def test_a_host_key_that_exists_but_is_no_private_key_is_an_error(tmp_path, keys_file, what):
    host_key = tmp_path / "hostkeys"
    if what == "directory":
        host_key.mkdir()
    else:
        host_key.write_bytes(openssh_public_key() + b"\n")
        host_key.chmod(0o600)
    (problem,) = errors(manhole(keys_file, host_key))
    assert problem.startswith("c.yaml:11: manhole.host_key: ")


# Lines that twisted.conch's readAuthorizedKeyFile does not skip (it only catches BadKeyError):
# binascii.Error, struct.error, ValueError and IndexError escape from parse_manhole.
MALFORMED_KEY_LINES = {
    "bad-base64": b"ssh-ed25519 not-base64-at-all ops@example",
    "truncated-blob": b"ssh-ed25519 AAAA ops@example",
    "short-ed25519-key": b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAABWFiY2Rl ops@example",
    "type-only": b"ssh-ed25519",
}


@pytest.mark.parametrize("line", MALFORMED_KEY_LINES.values(), ids=MALFORMED_KEY_LINES.keys())
def test_a_malformed_key_line_alone_is_a_config_error_not_a_crash(tmp_path, line):
    path = tmp_path / "authorized_keys"
    path.write_bytes(line + b"\n")
    (problem,) = errors(manhole(path, tmp_path / "host_key"))
    assert problem.startswith(f"c.yaml:10: manhole.authorized_keys: {path} ")


@pytest.mark.parametrize("line", MALFORMED_KEY_LINES.values(), ids=MALFORMED_KEY_LINES.keys())
def test_a_malformed_key_line_beside_a_good_key_is_skipped_or_reported_not_a_crash(tmp_path, keys_file, line):
    keys_file.write_bytes(keys_file.read_bytes() + line + b"\n")
    try:
        c = config(manhole(keys_file, tmp_path / "host_key"))
    except ConfigError as e:
        assert [(p.line, p.path) for p in e.problems] == [(10, "manhole.authorized_keys")]
    else:
        assert c.manhole.authorized_keys == str(keys_file)


def test_check_config_on_a_malformed_authorized_keys_file_answers_without_a_traceback(tmp_path, capsys):
    keys = tmp_path / "authorized_keys"
    keys.write_bytes(MALFORMED_KEY_LINES["bad-base64"] + b"\n")
    path = tmp_path / "gw.yaml"
    path.write_text(BASE + manhole(keys, tmp_path / "host_key"))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:10: manhole.authorized_keys: {keys} ")
    assert err.endswith(f"{path}: 1 error(s), configuration rejected\n")


@pytest.mark.parametrize("content", [
    b"ssh-ed25519 Z2FyYmFnZQ== ops@example\n",     # base64 of "garbage": no key blob
    b"these are not keys\n",
    b"\xff\xfe binary\n",
], ids=["garbage-blob", "prose", "binary"])
def test_manhole_authorized_keys_with_a_line_that_is_no_key_names_the_line(tmp_path, content):
    path = tmp_path / "authorized_keys"
    path.write_bytes(content)
    assert errors(manhole(path, tmp_path / "host_key")) == [
        f"c.yaml:10: manhole.authorized_keys: {path} line 1 is not an OpenSSH public key"]
