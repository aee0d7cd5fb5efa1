"""The `txgateway` command: tools around the daemon (the daemon itself runs under twistd)."""

from __future__ import annotations

import argparse
import sys

from txgateway.config import ConfigError, load_config

__all__ = ["main"]


def check_config(path: str) -> int:
    """Validate like `nginx -t`: every problem on stderr, exit status 0 or 1."""
    try:
        config = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: {len(e.problems)} error(s), configuration rejected", file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams, "
          f"{len(config.listen)} listeners)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="txgateway",
        description="txgateway tools. Run the gateway itself with: twistd -n txgateway --config FILE")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a config file and exit (0 = valid)")
    check.add_argument("file", help="path to the YAML config file")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
