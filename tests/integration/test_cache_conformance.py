"""The public HTTP cache suite (bench/cache-tests.sh): every required test must pass."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                    reason="node and npm are needed (make system-deps installs them)")
def test_the_public_cache_suite_passes_every_required_test(tmp_path):
    env = {**os.environ, "RUN": str(tmp_path), "ORIGIN_PORT": str(free_port()), "GW_PORT": str(free_port()),
           "TWISTD": str(Path(sys.executable).parent / "twistd")}
    run = subprocess.run(["bash", str(ROOT / "bench" / "cache-tests.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    found = re.search(r"^txgateway\s+required (\d+)/(\d+)\s+optimal (\d+)/(\d+)", run.stdout, re.M)
    assert found is not None, run.stdout
    required, total, optimal, _ = (int(g) for g in found.groups())
    assert (required, total) == (37, 37), run.stdout
    assert optimal >= 160, run.stdout
