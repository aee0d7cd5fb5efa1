"""README.md is right as written: every config snippet passes `txgateway check-config`, completed
the way the README says (its sections in place of etc/txgateway.yaml's, its upstreams beside
the example's, the files it names made where it names them), and every command runs the
tools from the venv."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key

from tests.installed import TXGATEWAY
from tests.test_config import TOP_KEYS
from tests.test_tls_config import CertAuthority

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "etc" / "txgateway.yaml"
SECTIONS = set(TOP_KEYS.split(", "))


def code_blocks() -> list[tuple[int, str, str]]:
    """(first line number, section heading, dedented text) of each indented code block."""
    blocks: list[tuple[int, str, str]] = []
    heading, current, start, previous = "", [], 0, ""
    lines = README.read_text().splitlines()
    for number, line in enumerate([*lines, ""], 1):
        if line.startswith("#") and not current:
            heading = line.lstrip("# ")
        indented = line.startswith("    ") and line.strip()
        if indented and (current or not previous.strip()):
            if not current:
                start = number
            current.append(line)
        elif current and not line.strip() and number < len(lines) and lines[number].startswith("    "):
            current.append(line)                     # a blank line inside the block
        elif current:
            indent = min(len(x) - len(x.lstrip()) for x in current if x.strip())
            blocks.append((start, heading, "\n".join(x[indent:] for x in current) + "\n"))
            current = []
        previous = line
    return blocks


def is_config(text: str) -> bool:
    first = next(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return first.split(":", 1)[0] in SECTIONS and first.split(":", 1)[0] + ":" == first.split()[0]


SNIPPETS = [(line, heading, text) for line, heading, text in code_blocks() if is_config(text)]


def test_the_readme_has_the_snippets_this_test_checks():
    assert [heading for _, heading, _ in SNIPPETS] == [
        "Authentication", "Forward auth (`auth: {forward: ...}`)", "Rate limiting", "Shared limits: `backend: redis` or `hybrid`", "Local answers (`respond:`)",
        "Client addresses (`ip_allow`, `ip_deny`)", "CORS (`cors:`)",
        "Composed endpoints (`compose:`)", "Reshaping JSON (`transform:`)", "TLS",
        "Client certificates (mTLS)", "WebSocket", "Response cache",
        "Upstream resilience: breakers, balancing, health, retries",
        "Upstream errors in the gateway's envelope (`upstream_errors:`)", "Per-route limits",
        "Weighted targets and canary routing (`split:`)", "Tracing (OpenTelemetry)", "Running under systemd",
        "Operating it: admin endpoint, metrics, status page, Manhole"]


def completed(snippet: dict[str, Any]) -> dict[str, Any]:
    """etc/txgateway.yaml with the snippet's sections in place of its own, upstreams by name."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for key, value in snippet.items():
        if key == "upstreams":
            config["upstreams"].update(value)
        else:
            config[key] = value
    return config


def make_files(config: dict[str, Any], directory: Path) -> None:
    """The files the config names, relative to its directory, as their owner would put them there."""
    ca = CertAuthority()

    def place(name: str) -> Path:
        assert not name.startswith("/"), f"{name}: a README snippet names files relative to the config"
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    for listener in config["listen"]:
        for pair in listener.get("tls", {}).get("certificates", []):
            cert, key = place(pair["cert"]), place(pair["key"])
            issued = ca.issue(cert.parent, cert.stem, cert.stem, (cert.stem,))
            Path(issued.key).rename(key)
        if "client_ca" in listener.get("tls", {}):
            ca.write(place(listener["tls"]["client_ca"]))
    for upstream in config["upstreams"].values():
        for name, value in upstream.get("tls", {}).items():
            assert name == "ca", f"upstream tls.{name}: no file made for it here"
            ca.write(place(value))
    if "manhole" in config:
        public = Key(ed25519.Ed25519PrivateKey.generate()).public().toString("OPENSSH")
        place(config["manhole"]["authorized_keys"]).write_bytes(public + b"\n")
        place(config["manhole"]["host_key"])                    # its directory: made on first start
    identities = config.get("auth", {}).get("client_certs", {}).get("file")
    if identities is not None:
        place(identities).write_text('- {id: "spiffe://example.org/billing", role: service, tier: pro}\n')
    keys_file = config.get("auth", {}).get("api_keys", {}).get("file")
    if keys_file is not None:
        entry = subprocess.run([str(TXGATEWAY), "hash-key", "--id", "svc-billing", "--role", "service"],
                               input="k" * 32 + "\n", capture_output=True, text=True, timeout=60, check=True)
        place(keys_file).write_text(entry.stdout)


@pytest.mark.parametrize(("line", "heading", "text"), SNIPPETS, ids=[f"README.md:{s[0]}" for s in SNIPPETS])
def test_a_readme_snippet_passes_check_config(tmp_path, line, heading, text):
    config = completed(yaml.safe_load(text))
    make_files(config, tmp_path)
    path = tmp_path / "txgateway.yaml"
    path.write_text(yaml.safe_dump(config))
    variables = {name: "s3cret-" + 32 * "x" for name in re.findall(r"^\s*\w+_env: (\w+)", text, re.MULTILINE)}
    result = subprocess.run([str(TXGATEWAY), "check-config", str(path)], capture_output=True, text=True,
                            timeout=60, env=variables, cwd="/", check=False)
    assert result.returncode == 0, f"README.md:{line} ({heading}):\n{result.stderr}"


# A command's name where a shell would run it: at the start, after a pipe or `$(`.
_COMMAND = re.compile(r"(?:^|[|(]\s*|&&\s*)(?:\$ )?(twistd|txgateway)(?=\s)")


def test_commands_run_the_tools_from_the_venv():
    bare = [(line, text_line) for line, _, text in code_blocks() for text_line in text.splitlines()
            if _COMMAND.search(text_line.split(" #")[0].strip()) and not text_line.startswith("#")]
    assert bare == []
