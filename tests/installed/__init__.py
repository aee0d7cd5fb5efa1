"""The txgateway install that the tests run as subprocesses: `twistd`, the `txgateway` command.

`make test` builds the wheel the way `pip install .` builds it (in build isolation), installs it
in a fresh venv outside the checkout and names that venv's bin directory in TXGATEWAY_TEST_BIN
and the wheel in TXGATEWAY_TEST_WHEEL: the daemon's tests then run what users install. Without
them (pytest run directly) the subprocesses run this checkout's venv.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["BIN", "PYTHON", "TWISTD", "TXGATEWAY", "WHEEL"]

BIN = Path(os.environ.get("TXGATEWAY_TEST_BIN") or Path(sys.executable).parent)
WHEEL = Path(os.environ["TXGATEWAY_TEST_WHEEL"]) if os.environ.get("TXGATEWAY_TEST_WHEEL") else None
PYTHON = BIN / "python"
TWISTD = BIN / "twistd"
TXGATEWAY = BIN / "txgateway"
