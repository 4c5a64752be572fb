"""`edgeproxy run|check|certs|service`: parse arguments, load the config, call in."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

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
    service = commands.add_parser("service", help="run under systemd")
    actions = service.add_subparsers(dest="action", required=True)
    install = actions.add_parser(
        "install", parents=[common], help="write the systemd unit for this installation"
    )
    install.add_argument("--dir", type=Path, default=Path("/etc/systemd/system"))
    install.add_argument("--user", default="edgeproxy", help="the unprivileged user to run as")
    return parser


def _service(args: argparse.Namespace) -> int:
    from edgeproxy.service.unit import install, render

    path = find_config(args.config).absolute()
    options: dict[str, Any] = {"config": path, "user": args.user}
    if path.exists():  # its cache root, access log and drain time shape the unit
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(f"edgeproxy: {exc}", file=sys.stderr)
            return 1
        options.update(root=config.mirror.root, shutdown_timeout=config.shutdown_timeout)
        if config.edge is not None and config.edge.access_log not in ("-", "off"):
            options["log_dir"] = Path(config.edge.access_log).parent
    executable = Path(sys.executable).parent / "edgeproxy"
    if not executable.exists():
        executable = Path(shutil.which("edgeproxy") or "/usr/local/bin/edgeproxy")
    try:
        unit = install(args.dir, render(executable, **options))
    except OSError as exc:
        print(f"edgeproxy: cannot write the unit in {args.dir}: {exc.strerror}", file=sys.stderr)
        return 1
    print(unit)
    return 0


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
    if args.command == "service":
        return _service(args)
    path = find_config(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(f"{path}: ok")
        return 0
    from edgeproxy.logs import configure_logging
    from edgeproxy.server import run_worker
    from edgeproxy.service.master import run

    configure_logging()
    return run(path, config, run_worker)


if __name__ == "__main__":
    sys.exit(main())
