"""`edgeproxy run|check|certs`: parse arguments, load the config, call in. Nothing else."""

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
    certs = commands.add_parser("certs", help="TLS certificates for the edge")
    kinds = certs.add_subparsers(dest="kind", required=True)
    self_signed = kinds.add_parser(
        "self-signed", help="write a development certificate and key (DIR/server.crt, .key)"
    )
    self_signed.add_argument(
        "--name",
        action="append",
        required=True,
        help="a host name or IP address the certificate is for (repeat for more)",
    )
    self_signed.add_argument("--dir", type=Path, default=Path("certs"), help="default: certs")
    self_signed.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    self_signed.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def _certs(args: argparse.Namespace) -> int:
    from edgeproxy.edge.certs import self_signed

    try:
        certificate, key = self_signed(args.name, args.dir, args.days, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 1
    print(f"{certificate}\n{key}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "certs":
        return _certs(args)
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
