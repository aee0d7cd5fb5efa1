"""Compiles the request's hot path to C with mypyc; everything else is in setup.cfg.

The modules below run for every proxied request. Compiled, the daemon spends about a third
fewer instructions per request (bench/macro.py; docs/performance.md). They are the same
type-checked Python: `TXGATEWAY_PURE=1 pip install ...` installs them uncompiled, and
`make compile` rebuilds them in place after an edit (an editable install would otherwise
keep importing the old build).
"""

import os

from setuptools import setup

COMPILED = [
    "txgateway/accesslog.py",
    "txgateway/auth.py",
    "txgateway/fastwrite.py",
    "txgateway/headers.py",
    "txgateway/http1.py",
    "txgateway/pipeline.py",
    "txgateway/proxy.py",
    "txgateway/ratelimit.py",
    "txgateway/reactor.py",
    "txgateway/routing.py",
    "txgateway/stats.py",
    "txgateway/timeouts.py",
    "txgateway/tokens.py",
    "txgateway/upstream.py",
]


def extensions() -> list:
    if os.environ.get("TXGATEWAY_PURE"):
        return []
    from mypyc.build import mypycify

    return mypycify(COMPILED, opt_level="3", group_name="txgateway")


setup(ext_modules=extensions())
