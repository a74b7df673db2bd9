"""``sluiceway cdc``: the replication slots of change data capture.

A ``PostgresCDCSource`` creates its slot when missing and never drops it:
a slot keeps the server's WAL from its position on, so a job that is gone
for good should have its slot dropped, by this command (``drop-slot``).
``slots`` lists the server's logical slots and how much WAL each keeps.
Both take ``--dsn`` (env ``SLUICEWAY_PG_DSN``).
"""

from __future__ import annotations

import json

from sluiceway.jobs.cli.common import UsageError, env


def register(sub) -> None:
    g = sub.add_parser("cdc", help="PostgreSQL change data capture: list and drop replication slots")
    cmds = g.add_subparsers(dest="cdc_command", required=True)

    def command(name: str, help: str, func):
        p = cmds.add_parser(name, help=help)
        p.add_argument("--dsn", default=env("SLUICEWAY_PG_DSN", None),
                       help="the PostgreSQL server (a libpq DSN or URL; env SLUICEWAY_PG_DSN)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
        return p

    command("slots", "list the logical replication slots and the WAL each keeps", cmd_slots)
    p = command("drop-slot", "drop a replication slot (the server then frees the WAL it kept)", cmd_drop_slot)
    p.add_argument("slot")


def _dsn(args) -> str:
    if not args.dsn:
        raise UsageError("--dsn is required (or set SLUICEWAY_PG_DSN), e.g. --dsn 'host=127.0.0.1 user=postgres'")
    return args.dsn


def _connect_error(exc: Exception, dsn: str) -> UsageError:
    return UsageError(f"cannot connect to PostgreSQL ({str(exc).splitlines()[0]}); check --dsn {dsn!r}")


def cmd_slots(args) -> int:
    from sluiceway.operators.connectors.postgres_cdc import slots

    dsn = _dsn(args)
    try:
        found = slots(dsn)
    except Exception as exc:  # noqa: BLE001 - psycopg's connection errors, said in one line
        if type(exc).__name__ == "OperationalError":
            raise _connect_error(exc, dsn) from None
        raise
    if args.json:
        print(json.dumps(found))
        return 0
    print(f"{'slot':<24} {'plugin':<10} {'active':<6} {'confirmed':<14} wal kept")
    for s in found:
        print(f"{s['slot']:<24} {s['plugin']:<10} {str(s['active']).lower():<6} {s['confirmed'] or '-':<14} "
              f"{(s['wal_kept_bytes'] or 0):,} bytes")
    return 0


def cmd_drop_slot(args) -> int:
    from sluiceway.operators.connectors.postgres_cdc import drop_slot

    dsn = _dsn(args)
    try:
        dropped = drop_slot(dsn, args.slot)
    except Exception as exc:  # noqa: BLE001
        if type(exc).__name__ == "OperationalError":
            raise _connect_error(exc, dsn) from None
        if type(exc).__name__ == "ObjectInUse":
            raise UsageError(f"replication slot {args.slot!r} is in use by a running job: stop the job first") \
                from None
        raise
    if not dropped:
        print(f"sluiceway: error: no replication slot {args.slot!r} on that server (`sluiceway cdc slots` lists them)",
              file=__import__("sys").stderr)
        return 1
    print(json.dumps({"dropped": args.slot}) if args.json else f"dropped replication slot {args.slot!r}")
    return 0
