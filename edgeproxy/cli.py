"""`edgeproxy run|check|certs|service|cache`: parse arguments, load the config, call in."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from edgeproxy import __version__
from edgeproxy.config import DEFAULT_CONFIG_PATHS, Config, ConfigError, find_config, load_config


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
    commands.add_parser(
        "check", parents=[common], help="validate the config and load the files it names"
    )
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
    install.add_argument(
        "--dir",
        type=Path,
        default=Path("/etc/systemd/system"),
        help="where the unit goes (default: /etc/systemd/system)",
    )
    install.add_argument("--user", default="edgeproxy", help="the unprivileged user to run as")
    _cache_parser(commands, common)
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


def _cache_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    cache = commands.add_parser("cache", help="look at, trim, fill or check the cache")
    actions = cache.add_subparsers(dest="action", required=True)
    actions.add_parser("ls", parents=[common], help="repositories, tags, sizes, last pulls")
    actions.add_parser("du", parents=[common], help="bytes per repository and in all")
    prune = actions.add_parser("prune", parents=[common], help="apply [mirror.cache] once")
    prune.add_argument("--dry-run", action="store_true", help="print what would go; keep it")
    warm = actions.add_parser("warm", parents=[common], help="pull images into the cache")
    warm.add_argument("images", nargs="+", metavar="IMAGE", help="[upstream/]name[:tag|@digest]")
    warm.add_argument("--platform", help="only this os/arch[/variant] of an index")
    verify = actions.add_parser("verify", parents=[common], help="re-hash every blob")
    verify.add_argument("--remove", action="store_true", help="remove the corrupt ones")


def _cache(args: argparse.Namespace, config: Config) -> int:
    from edgeproxy import cache_cli

    try:
        with cache_cli.owned_as_the_cache(config.mirror.root):
            return _cache_action(args, config)
    except OSError as exc:  # run by a user who may read the cache, not write it
        print(f"edgeproxy: {exc.filename or config.mirror.root}: {exc.strerror}", file=sys.stderr)
        return 1


def _cache_action(args: argparse.Namespace, config: Config) -> int:
    from edgeproxy import cache_cli

    if args.action == "ls":
        return cache_cli.ls(config)
    if args.action == "du":
        return cache_cli.du(config)
    if args.action == "prune":
        return cache_cli.prune(config, args.dry_run)
    if args.action == "warm":
        return cache_cli.warm(config, args.images, args.platform)
    return cache_cli.verify(config, args.remove)


def _certs(args: argparse.Namespace) -> int:
    from edgeproxy.edge.certs import self_signed

    try:
        certificate, key = self_signed(args.name, args.dir, args.days, force=args.force)
    except (OSError, ValueError, OverflowError) as exc:  # OverflowError: --days past year 9999
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
    if args.config is None and not path.exists():
        tried = " nor ".join(str(default) for default in DEFAULT_CONFIG_PATHS)
        print(
            f"edgeproxy: no config: neither {tried} exists (give one: --config FILE)",
            file=sys.stderr,
        )
        return 1
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        from edgeproxy.mirror.auth import exposed_credentials
        from edgeproxy.preflight import check

        try:
            check(config)
        except ConfigError as exc:
            print(f"edgeproxy: {path}: {exc}", file=sys.stderr)
            return 1
        for warning in exposed_credentials(config.mirror):  # what run logs as [warn]
            print(f"edgeproxy: {path}: warning: {warning}", file=sys.stderr)
        print(f"{path}: ok")
        return 0
    if args.command == "cache":
        return _cache(args, config)
    from edgeproxy.logs import configure_logging
    from edgeproxy.server import run_worker
    from edgeproxy.service.master import run

    configure_logging()
    return run(path, config, run_worker)


if __name__ == "__main__":
    sys.exit(main())
