"""The `relay` command: run, check, status, plugins, dlq, import, quarantine.

Every command takes `--config FILE` (default `$RELAY_CONFIG`, else `./relay.yaml`). Exit codes: 0 done,
1 a runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog
import trio

from relay import __version__, admin
from relay.config import Config, load_config
from relay.errors import ConfigError, JournalError, PluginError, RelayError
from relay.logs import configure_logging
from relay.plugins import Registry, load_registry
from relay.yamlfile import read_env_file

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
Command = Callable[[argparse.Namespace], int]
_commands: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        _commands[name] = fn
        return fn
    return register


def default_config_path() -> str:
    return os.environ.get("RELAY_CONFIG") or "relay.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="Relay audit-log entries without losing one.")
    parser.add_argument("--version", action="version", version=f"audit-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", "-c", default=None, metavar="FILE",
                       help="configuration file (default: $RELAY_CONFIG, else ./relay.yaml)")
        return p

    add("run", "Run the relay in the foreground until SIGTERM or SIGINT.")
    check = add("check", "Validate the configuration and print every problem at once.")
    check.add_argument("--env-file", metavar="FILE",
                       help="read ${VAR} values from this file instead of the environment (systemd format)")
    check.add_argument("--connect", action="store_true",
                       help="also test each destination's and source's connectivity and credentials")
    status = add("status", "Show each destination's offset, backlog, state and dead letters, and each cursor.")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    plugins = add("plugins", "List the installed source and destination types and their packages.")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    dlq = add("dlq", "Manage dead letters: entries a destination refused.")
    dlq.add_argument("action", choices=["list", "show", "replay", "purge"])
    dlq.add_argument("--destination", "-d", required=True)
    dlq.add_argument("--id", type=int, action="append", dest="ids", metavar="N",
                     help="only this dead letter (repeatable); default all")
    dlq.add_argument("--limit", type=int, default=100, help="list at most this many (default 100)")
    dlq.add_argument("--json", action="store_true")
    imports = add("import", "Import an export file (JSON lines, a JSON array or CSV) once; resumable.")
    imports.add_argument("--source", "-s", required=True, metavar="NAME",
                         help="the source the entries and the resume position are recorded under: a `file` "
                              "source of the configuration (its settings apply), or a new name")
    imports.add_argument("--format", choices=["auto", "jsonl", "json", "csv"], default=None,
                         help="file format (default: the source's setting, else auto-detect)")
    imports.add_argument("file", metavar="FILE", help="the file to import")
    quarantine = add("quarantine", "Inspect input kept because it was invalid.")
    quarantine.add_argument("action", choices=["list", "show"])
    quarantine.add_argument("--source", "-s")
    quarantine.add_argument("--id", type=int, action="append", dest="ids", metavar="N")
    quarantine.add_argument("--limit", type=int, default=100)
    quarantine.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config is None:
        args.config = default_config_path()
    try:
        return _commands[args.command](args)
    except ConfigError as exc:
        print(f"relay: invalid configuration ({len(exc.issues)} problem{'s' * (len(exc.issues) != 1)}):",
              file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    except (PluginError, JournalError, RelayError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def load(args: argparse.Namespace, env: dict[str, str] | None = None) -> tuple[Config, Registry]:
    registry = load_registry()
    return load_config(args.config, registry, env), registry


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    from relay.service import Service

    config, _ = load(args)
    configure_logging(config.log.level, config.log.format)
    service = Service(config)

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
                    async for signum in received:
                        if signum == signal.SIGHUP:
                            structlog.get_logger("relay").warning(
                                "reload_unsupported", hint="restart the service to apply a new configuration")
                            continue
                        structlog.get_logger("relay").info("signal_received", signal=signal.Signals(signum).name)
                        stop.set()
            nursery.start_soon(signals)
            await service.run(stop)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return EXIT_OK


@command("check")
def cmd_check(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.env_file:
        env = {**{k: v for k, v in env.items() if k in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")},
               **read_env_file(args.env_file)}
    config, _ = load(args, env)
    print(f"{args.config}: OK ({len(config.sources)} source(s), {len(config.destinations)} destination(s))")
    if args.connect:
        from relay.connectivity import check_all

        return EXIT_OK if trio.run(check_all, config) else EXIT_FAILURE
    return EXIT_OK


def _state_dir(args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    config, _ = load(args)
    return config.state_dir, {name: d.type for name, d in config.destinations.items()}


@command("status")
def cmd_status(args: argparse.Namespace) -> int:
    state_dir, types = _state_dir(args)
    report = admin.status(state_dir, types)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    journal = report["journal"]
    print(f"journal {journal['path']}: last entry #{journal['last_seq']}, "
          f"{journal['used_bytes'] / 1048576:.1f} MiB used, {journal['quarantined']} quarantined")
    _table(["DESTINATION", "TYPE", "STATE", "OFFSET", "BACKLOG", "DEAD", "LAST SUCCESS", "NEWEST DELIVERED"],
           [[d["name"], d["type"] or "-", d["state"], d["offset"], d["backlog"], d["dead_letters"],
             d["last_success_at"] or "never", d["newest_delivered_occurred_at"] or "-"]
            for d in report["destinations"]])
    for d in report["destinations"]:
        if d["state_reason"]:
            print(f"  {d['name']}: {d['state']} since {d['state_since']}: {d['state_reason']}")
    _table(["SOURCE", "CURSOR", "LAST SUCCESS"],
           [[s["name"], s["cursor"] or "-", s["last_success_at"] or "never"] for s in report["sources"]])
    return EXIT_OK


@command("plugins")
def cmd_plugins(args: argparse.Namespace) -> int:
    registry = load_registry()
    rows = [{"kind": t.kind, "type": t.name, "package": t.package, "class": f"{t.cls.__module__}.{t.cls.__name__}"}
            for t in registry.all()]
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        _table(["KIND", "TYPE", "PACKAGE"], [[r["kind"], r["type"], r["package"]] for r in rows])
    return EXIT_OK


@command("dlq")
def cmd_dlq(args: argparse.Namespace) -> int:
    state_dir, _ = _state_dir(args)
    if args.action == "list":
        rows = admin.dlq_list(state_dir, args.destination, args.limit)
        if args.json:
            print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        else:
            _table(["ID", "SEQ", "SOURCE", "ACTION", "FAILED AT", "REASON"],
                   [[r["id"], r["seq"], r["source"], r["action"], r["failed_at"], r["reason"]] for r in rows])
    elif args.action == "show":
        for dead_id, reason, data in admin.dlq_show(state_dir, args.destination, args.ids):
            print(f"# dead letter {dead_id}: {reason}")
            print(data.decode("utf-8", "replace"))
    elif args.action == "replay":
        count = admin.dlq_replay(state_dir, args.destination, args.ids)
        print(f"{count} dead letter(s) put back in the queue of {args.destination}")
    else:
        count = admin.dlq_purge(state_dir, args.destination, args.ids)
        print(f"{count} dead letter(s) of {args.destination} deleted")
    return EXIT_OK


@command("import")
def cmd_import(args: argparse.Namespace) -> int:
    from relay.importer import import_file

    config, registry = load(args)
    # Progress is drawn on the terminal; only warnings and errors are logged beside it.
    configure_logging("warning" if config.log.level in ("debug", "info") else config.log.level, config.log.format)
    return import_file(config, registry, args.source, Path(args.file), args.format)


@command("quarantine")
def cmd_quarantine(args: argparse.Namespace) -> int:
    state_dir, _ = _state_dir(args)
    if args.action == "list":
        rows = admin.quarantine_list(state_dir, args.source, args.limit)
        if args.json:
            print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        else:
            _table(["ID", "SOURCE", "RECEIVED AT", "BYTES", "REASON"],
                   [[r["id"], r["source"], r["received_at"], r["bytes"], r["reason"]] for r in rows])
    else:
        for item_id, reason, data in admin.quarantine_show(state_dir, args.ids or []):
            print(f"# quarantined {item_id}: {reason}")
            print(data.decode("utf-8", "replace"))
    return EXIT_OK


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(none)")
