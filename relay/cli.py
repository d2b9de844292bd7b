"""The `relay` command: run, reload, check, status, replay, cursor, plugins, dlq, import, quarantine.

Every command takes `--config FILE` (default `$RELAY_CONFIG`, else `./relay.yaml`). Exit codes: 0 done,
1 a runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog
import trio

from relay import __version__, admin, pidfile
from relay import reload as reloading
from relay.config import Config, load_config
from relay.errors import ConfigError, JournalError, PluginError, RelayError
from relay.logs import configure_logging
from relay.plugins import Registry, load_registry
from relay.process import raise_open_files_limit, tune_garbage_collector
from relay.yamlfile import load_yaml, read_env_file, substitute

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

    add("run", "Run the relay in the foreground until SIGTERM or SIGINT; SIGHUP reloads the configuration.")
    reload = add("reload", "Make the running relay read its configuration again, and report the outcome.")
    reload.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long to wait for the outcome (default 120; a changed destination first "
                             "finishes its batches in flight, up to shutdown_timeout)")
    check = add("check", "Validate the configuration and print every problem at once.")
    check.add_argument("--env-file", metavar="FILE",
                       help="read ${VAR} values from this file instead of the environment (systemd format)")
    check.add_argument("--connect", action="store_true",
                       help="also test each destination's and source's connectivity and credentials")
    status = add("status", "Show each destination's offset, backlog, state and dead letters, and each cursor.")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    replay = add("replay", "Deliver the journal's entries from a time range again, to one destination only.")
    replay.add_argument("--destination", "-d", required=True)
    replay.add_argument("--since", required=True, metavar="TIME",
                        help="entries that occurred at or after TIME: 2024-05-14T09:30:00Z, 2024-05-14 (UTC), "
                             "or an age such as 6h or 2d")
    replay.add_argument("--until", metavar="TIME", help="entries that occurred before TIME (default: now)")
    replay.add_argument("--from-seq", type=int, default=0, metavar="N", help="resume an interrupted replay")
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed, change nothing")
    cursor = add("cursor", "Show or set a source's cursor (where a poller or an import resumes).")
    cursor.add_argument("action", choices=["show", "set"])
    cursor.add_argument("--source", "-s", required=True)
    value = cursor.add_mutually_exclusive_group()
    value.add_argument("--value", help="the new cursor (set)")
    value.add_argument("--clear", action="store_true", help="forget the cursor: the source starts from its "
                                                             "beginning (set)")
    cursor.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    cursor.add_argument("--json", action="store_true", help="print JSON (show)")
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
    from relay.sdnotify import Notifier
    from relay.service import Service

    config, _ = load(args)
    configure_logging(config.log.level, config.log.format)
    raise_open_files_limit()
    tune_garbage_collector()
    service = Service(config, loader=lambda: load(args)[0], notifier=Notifier.from_environment())

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
                    async for signum in received:
                        structlog.get_logger("relay").info("signal_received", signal=signal.Signals(signum).name)
                        if signum == signal.SIGHUP:
                            service.request_reload()
                        else:
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

        results = trio.run(check_all, config)
        _table(["KIND", "NAME", "TYPE", "RESULT", "DETAIL"],
               [[r.kind, r.name, r.type, "ok" if r.ok else "FAILED", r.detail] for r in results])
        failed = sum(not r.ok for r in results)
        if failed:
            print(f"{failed} of {len(results)} check(s) failed", file=sys.stderr)
        return EXIT_FAILURE if failed else EXIT_OK
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
    relay = report["relay"]
    if relay["running"]:
        print(f"relay: running (pid {relay['pid']})")
    else:
        print(f"relay: not running ({relay['holder']}, pid {relay['pid']}, holds the state dir)" if relay["holder"]
              else "relay: not running")
    journal = report["journal"]
    print(f"journal {journal['path']}: last entry #{journal['last_seq']}, "
          f"{journal['used_bytes'] / 1048576:.1f} MiB used, {journal['quarantined']} quarantined")
    _table(["DESTINATION", "TYPE", "STATE", "OFFSET", "BACKLOG", "OLDEST WAITING", "DEAD", "LAST SUCCESS",
            "NEWEST DELIVERED", "LAG"],
           [[d["name"], d["type"] or "-", d["state"], d["offset"], d["backlog"],
             _age(d["oldest_undelivered_age_seconds"]) if d["backlog"] else "-", d["dead_letters"],
             d["last_success_at"] or "never", d["newest_delivered_occurred_at"] or "-", _age(d["lag_seconds"])]
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
    tune_garbage_collector()
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


@command("reload")
def cmd_reload(args: argparse.Namespace) -> int:
    state_dir = _state_dir_leniently(args.config)
    running = pidfile.holder(state_dir)
    if running is None or running.pid is None or running.what != "run":
        print(f"relay: no relay is running with state_dir {state_dir}", file=sys.stderr)
        return EXIT_FAILURE
    before = reloading.read_outcome(state_dir)
    sequence = before.sequence if before is not None and before.pid == running.pid else 0
    os.kill(running.pid, signal.SIGHUP)
    print(f"sent SIGHUP to the relay (pid {running.pid}); waiting for it to reload {args.config}")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        outcome = reloading.read_outcome(state_dir)
        if outcome is not None and outcome.pid == running.pid and outcome.sequence > sequence:
            return _report_reload(outcome)
        time.sleep(0.1)
    print(f"relay: no outcome within {args.timeout:g}s; see the relay's log (reload_applied/reload_rejected)",
          file=sys.stderr)
    return EXIT_FAILURE


def _report_reload(outcome: reloading.Outcome) -> int:
    if outcome.result == "rejected":
        print(f"reload rejected: the relay keeps running on its previous configuration "
              f"({len(outcome.problems)} problem{'s' * (len(outcome.problems) != 1)}):", file=sys.stderr)
        for problem in outcome.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"reload {outcome.result}: {outcome.summary()}")
    for key in outcome.restart_required:
        print(f"  {key} changed: it takes effect at the next restart")
    for problem in outcome.problems:
        print(f"  failed: {problem}", file=sys.stderr)
    return EXIT_OK if outcome.result == "applied" else EXIT_FAILURE


def _state_dir_leniently(config_file: str) -> Path:
    """The state dir named by a config file, even if the rest of the file is invalid (the running relay
    validates it itself, in its own environment, and reports the problems)."""
    try:
        loaded = load_yaml(Path(config_file).read_text(encoding="utf-8"), config_file)
    except OSError as exc:
        raise RelayError(f"cannot read {config_file}: {exc.strerror}") from None
    data = loaded.data if isinstance(loaded.data, dict) else {}
    loaded.data = {"state_dir": data.get("state_dir")}
    substitute(loaded, os.environ, Path(config_file).resolve().parent)
    value = loaded.data["state_dir"]
    if isinstance(value, str) and value:
        return Path(value)
    systemd_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(systemd_dir) if systemd_dir else Path("state")


@command("replay")
def cmd_replay(args: argparse.Namespace) -> int:
    from relay import replay
    from relay.progress import Progress

    config, _ = load(args)
    if args.destination not in config.destinations:
        print(f"relay: no destination {args.destination!r} in {args.config} "
              f"(configured: {', '.join(sorted(config.destinations)) or 'none'})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        since = replay.parse_time(args.since)
        until = replay.parse_time(args.until) if args.until else time.time()
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    plan = replay.plan_replay(config.state_dir, args.destination, since, until, args.from_seq)
    print(f"{plan.entries:,} entries ({plan.bytes / 1048576:.1f} MiB) occurred between {admin.iso(since)} and "
          f"{admin.iso(until)}: {'would be' if args.dry_run else 'to be'} delivered again to {args.destination}")
    if plan.oldest_held is not None and plan.oldest_held > since:
        print(f"  note: the journal holds entries from {admin.iso(plan.oldest_held)} on; older ones were pruned "
              "(journal.retention)")
    if args.dry_run or not plan.entries:
        return EXIT_OK
    with Progress(plan.entries, unit="entries") as progress:
        done = replay.replay(config.state_dir, plan, max_size=config.journal.max_size, progress=progress.update)
    running = pidfile.holder(config.state_dir)
    if running is not None and running.what == "run":
        where = "the running relay sends them within seconds"
    else:
        where = "they are sent when the relay starts"
    print(f"{done:,} entries queued again for {args.destination}; {where}")
    return EXIT_OK


@command("cursor")
def cmd_cursor(args: argparse.Namespace) -> int:
    config, _ = load(args)
    state_dir = config.state_dir
    if args.source not in config.sources:
        print(f"relay: no source {args.source!r} in {args.config} "
              f"(configured: {', '.join(sorted(config.sources)) or 'none'})", file=sys.stderr)
        return EXIT_CONFIG
    current = admin.cursor_show(state_dir, args.source)
    if args.action == "show":
        if current is None:
            print(f"relay: the journal has no cursor for source {args.source!r} (it has not committed one yet)",
                  file=sys.stderr)
            return EXIT_FAILURE
        if args.json:
            print(orjson.dumps(current, option=orjson.OPT_INDENT_2).decode())
        else:
            _table(["SOURCE", "CURSOR", "UPDATED", "LAST SUCCESS"],
                   [[args.source, current["cursor"] if current["cursor"] is not None else "(none)",
                     current["updated_at"] or "-", current["last_success_at"] or "never"]])
        return EXIT_OK
    if args.value is None and not args.clear:
        print("relay: cursor set needs --value VALUE or --clear", file=sys.stderr)
        return EXIT_CONFIG
    old = current["cursor"] if current else None
    new = None if args.clear else args.value
    print(f"source {args.source}: cursor {old!r} -> {new!r}")
    if not args.yes:
        if not sys.stdin.isatty():
            print("relay: not a terminal, so no confirmation can be asked: add --yes", file=sys.stderr)
            return EXIT_CONFIG
        answer = input("The source will resume from the new cursor: entries before it are not fetched again, "
                       "entries after it may be fetched twice (and deduplicated). Set it? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("cursor unchanged")
            return EXIT_FAILURE
    try:
        admin.cursor_set(state_dir, args.source, new)
    except pidfile.StateDirBusy as exc:
        print(f"relay: {exc}.", file=sys.stderr)
        print("  A running source keeps its cursor in memory and would overwrite a new one: stop the relay "
              "(systemctl stop audit-relay), set the cursor, start it again.", file=sys.stderr)
        return EXIT_FAILURE
    print(f"cursor of {args.source} set; the source resumes from it at the next start")
    return EXIT_OK


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    from relay.progress import format_duration

    return format_duration(seconds) if seconds < 86400 else f"{seconds / 86400:.1f}d"


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(none)")
