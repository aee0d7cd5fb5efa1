"""The suite tests the hot path as it ships: compiled by mypyc, from the current sources.

An in-place build shadows its .py files, so an edit made after the last `make compile` would
leave the tests (and the daemon) running the old code without a word. TXGATEWAY_PURE=1
runs everything uncompiled instead.
"""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compiled_modules() -> list[str]:
    """setup.py's COMPILED list, as module names."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    paths = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMPILED")
    return [path.removesuffix(".py").replace("/", ".") for path in paths]


@pytest.mark.parametrize("name", compiled_modules())
def test_hot_path_module_is_compiled_from_its_current_source(name: str) -> None:
    module = importlib.import_module(name)
    source = ROOT / (name.replace(".", "/") + ".py")
    if os.environ.get("TXGATEWAY_PURE"):
        assert module.__file__ == str(source)
        return
    assert module.__file__.endswith(".so"), f"{name} is not compiled: run `make compile`"
    assert Path(module.__file__).stat().st_mtime >= source.stat().st_mtime, (
        f"{module.__file__} is older than {source}: run `make compile`")
