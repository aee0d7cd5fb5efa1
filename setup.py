"""Compiles the request's hot path to C with mypyc; everything else is in setup.cfg.

The modules below run for every proxied request. Compiled, the daemon spends about a third
fewer instructions per request (bench/macro.py; docs/performance.md). They are the same
type-checked Python: `TXGATEWAY_PURE=1 pip install ...` installs them uncompiled, and
`make compile` rebuilds them in place after an edit (an editable install would otherwise
keep importing the old build).
"""

import os
import sys

from setuptools import setup

COMPILED = [
    "txgateway/ops/accesslog.py",
    "txgateway/filters/auth/filter.py",
    "txgateway/core/fastwrite.py",
    "txgateway/transport/tlsbio.py",
    "txgateway/filters/headers.py",
    "txgateway/transport/http1.py",
    "txgateway/transport/h2.py",
    "txgateway/transport/h2headers.py",
    "txgateway/transport/h2frames.py",
    "txgateway/transport/hpackdecode.py",
    "txgateway/core/ids.py",
    "txgateway/core/pipeline.py",
    "txgateway/upstream/proxy.py",
    "txgateway/filters/ratelimit/filter.py",
    "txgateway/core/reactor.py",
    "txgateway/filters/routing.py",
    "txgateway/ops/stats.py",
    "txgateway/core/timeouts.py",
    "txgateway/filters/auth/tokens.py",
    "txgateway/upstream/pool.py",
    "txgateway/upstream/balance.py",
    "txgateway/terminals/compose/composer.py",
    "txgateway/terminals/compose/template.py",
    "txgateway/core/jsonbody.py",
    "txgateway/filters/reshape.py",
    "txgateway/filters/transform.py",
    "txgateway/filters/cache/filter.py",
    "txgateway/filters/cache/rules.py",
    "txgateway/filters/cache/store.py",
    "txgateway/ops/sampling.py",
    "txgateway/core/route.py",
    "txgateway/core/hopbyhop.py",
    "txgateway/ops/spans.py",
    "txgateway/ops/otlp.py",
]


def extensions() -> list:
    if os.environ.get("TXGATEWAY_PURE"):
        return []
    from mypyc.build import mypycify

    try:
        return mypycify(COMPILED, opt_level="3", group_name="txgateway")
    except SystemExit:
        # mypy printed its errors above. An unresolved import is refused on purpose (setup.cfg
        # [mypy]): compiled against a missing base class, the extension would crash at run time.
        sys.exit("txgateway: the mypyc build stopped on the type errors above. If they say "
                 "'Cannot find implementation or library stub', the build environment lacks a "
                 "runtime dependency (pyproject.toml [build-system] requires lists them); "
                 "TXGATEWAY_PURE=1 installs uncompiled.")


setup(ext_modules=extensions())
