"""The build compiles what the checkout type-checks, or refuses to build.

mypyc lays out a compiled class from the types it sees. Built where Twisted could not be
imported (pip's isolated build environment once held only setuptools and mypy), HTTP1Factory
was compiled as if `Factory` were an unknown type: without the instance dict that Twisted's
Factory gives its subclasses, so the first `providedBy()` on it read past the object and the
installed daemon crashed when it bound a port. Now every import must resolve (setup.cfg [mypy])
and the build environment holds every runtime dependency (pyproject.toml).
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.test_compiled import compiled_modules

ROOT = Path(__file__).resolve().parent.parent


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=! ;]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for line in requirements if line.strip()}


def test_the_build_environment_holds_every_runtime_dependency() -> None:
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(ROOT / "setup.cfg")
    runtime = requirement_names(setup_cfg["options"]["install_requires"].splitlines())
    build = requirement_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"])
    assert runtime - build == set(), "pyproject.toml [build-system] requires lacks runtime dependencies"
    assert {"mypy", "types-pyyaml"} <= build


def test_the_wheel_lists_every_package_of_the_checkout() -> None:
    """setup.cfg names its packages one by one: a new subpackage left out installs a wheel
    whose first import fails (the checkout, on sys.path, never notices)."""
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(ROOT / "setup.cfg")
    listed = {line.strip() for line in setup_cfg["options"]["packages"].splitlines() if line.strip()}
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "txgateway").rglob("__init__.py")}
    assert found - listed == set(), "setup.cfg [options] packages lacks these"


def test_a_build_that_cannot_see_a_dependency_fails_instead_of_compiling_other_code() -> None:
    """mypy run as the build runs it, but blind to installed packages (as an isolated build
    environment without them would be): it must stop on the unresolved imports."""
    paths = [str(ROOT / (name.replace(".", "/") + ".py")) for name in compiled_modules()]
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-site-packages", "--no-incremental",
                             "--config-file", str(ROOT / "setup.cfg"), *paths],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 1, result.stdout
    assert 'Cannot find implementation or library stub for module named "twisted.internet.protocol"' in result.stdout


def test_the_checkout_type_checks_with_every_import_resolved() -> None:
    paths = [str(ROOT / (name.replace(".", "/") + ".py")) for name in compiled_modules()]
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg"), *paths],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stdout


def test_make_tests_the_pythons_that_setup_cfg_and_the_readme_declare() -> None:
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(ROOT / "setup.cfg")
    declared = re.findall(r"^Programming Language :: Python :: (3\.\d+)$", setup_cfg["metadata"]["classifiers"],
                          re.MULTILINE)
    supported = re.findall(r"^SUPPORTED = (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert supported == [" ".join(declared)]
    *first, last = declared
    assert f"txgateway supports CPython {', '.join(first)} and {last}." in (ROOT / "README.md").read_text()
