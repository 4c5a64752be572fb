"""`edgeproxy run|check`: parse arguments, load the config, call in. Nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeproxy import __version__
from edgeproxy.config import ConfigError, find_config, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeproxy", description="A Docker registry mirror with its own TLS edge."
    )
    parser.add_argument("--version", action="version", version=f"edgeproxy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        help="the proxy.toml to use (default: ./proxy.toml, then /etc/edgeproxy/proxy.toml)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", parents=[common], help="serve, with the config given")
    commands.add_parser("check", parents=[common], help="validate the config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = find_config(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(f"{path}: ok")
        return 0
    from edgeproxy.server import configure_logging, run

    configure_logging()
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
