"""``sluiceway log``: the durable log's topics from the command line.

``create``, ``produce`` (JSON lines from a file or stdin), ``tail``,
``describe``, ``compact`` and ``topics``; every command takes ``--log-dir``
(env ``SLUICEWAY_LOG_DIR``, default ``./.sluiceway-log``).
"""

from __future__ import annotations

import json
import os
import select
import stat
import sys
import time

from sluiceway.jobs.cli.common import UsageError, env, json_arg, nonnegative_int, positive_int, seconds_or_duration
from sluiceway.operators.connectors import DEFAULT_LOG_DIR
from sluiceway.operators.errors import SourceError

_OFFSET = "__offset"
CLI_DEADLINE_S = 5.0  # a command answers within seconds; a job waits longer


def open_log(args):
    from sluiceway.checkpoint.storage import StorageRetry
    from sluiceway.operators.connectors.log import Log

    return Log(args.log_dir, retry=StorageRetry(deadline_s=CLI_DEADLINE_S))


def register(sub) -> None:
    g = sub.add_parser("log", help="topics of the durable log: create, produce, tail, describe, compact")
    cmds = g.add_subparsers(dest="log_command", required=True)

    def command(name: str, help: str, func):
        p = cmds.add_parser(name, help=help)
        p.add_argument("--log-dir", default=env("SLUICEWAY_LOG_DIR", DEFAULT_LOG_DIR),
                       help=f"the log folder: a path or fsspec URL (env SLUICEWAY_LOG_DIR; default {DEFAULT_LOG_DIR})")
        p.set_defaults(func=func)
        return p

    p = command("create", "create a topic", cmd_create)
    p.add_argument("topic")
    p.add_argument("--partitions", type=positive_int, required=True, help="number of partitions (fixed)")
    p.add_argument("--key", help="column producers partition by, and compaction keeps the latest of")
    p.add_argument("--retention-age", type=seconds_or_duration, metavar="DURATION",
                   help="delete segments older than this (e.g. 3600, 90m, 7d); default: keep")
    p.add_argument("--retention-bytes", type=positive_int, metavar="BYTES",
                   help="keep at most this many bytes per partition; default: keep")
    p.add_argument("--tombstone-delay", type=seconds_or_duration, default=24 * 3600.0, metavar="DURATION",
                   help="compaction keeps a deleted key's tombstone this long (default 1d)")

    p = command("produce", "append JSON lines (one record per line) from FILE or stdin", cmd_produce)
    p.add_argument("topic")
    p.add_argument("file", nargs="?", help="a file of JSON lines; default: stdin")
    p.add_argument("--key", help="partition by this column (default: the topic's key; else round-robin)")
    p.add_argument("--batch-rows", type=positive_int, default=10_000,
                   help="records per appended segment at most (default 10000)")
    p.add_argument("--linger", type=seconds_or_duration, default=0.5, metavar="SECONDS",
                   help="append what stdin gave after this long without a new line (default 0.5)")

    p = command("tail", "print a topic's newest records as JSON lines", cmd_tail)
    p.add_argument("topic")
    p.add_argument("-n", "--records", type=nonnegative_int, default=10, help="records per partition (default 10)")
    p.add_argument("--partition", type=nonnegative_int, help="only this partition")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records until interrupted")

    p = command("describe", "partitions, offsets, segment sizes and each reading job's lag", cmd_describe)
    p.add_argument("topic")
    json_arg(p, "the description")

    p = command("compact", "keep the latest record per key in closed segments", cmd_compact)
    p.add_argument("topic")
    p.add_argument("--key", help="compact by this column (default: the topic's key)")

    command("topics", "list the topics", cmd_topics)


def cmd_create(args) -> int:
    from sluiceway.operators.connectors.log import TopicConfig

    config = TopicConfig(args.topic, args.partitions, key=args.key, retention_age_s=args.retention_age,
                         retention_bytes=args.retention_bytes, tombstone_delay_s=args.tombstone_delay)
    log = open_log(args)
    log.create_topic(config)
    extra = f", key {args.key}" if args.key else ""
    print(f"created topic {args.topic} with {args.partitions} partition(s){extra} in {log.url}")
    return 0


def _lines(stream, linger_s: float):
    """``(line_number, text)`` pairs, and ``None`` whenever ``linger_s`` passes
    without a new line on a pipe or terminal (time to append what we have)."""
    fd = stream.fileno()
    interactive = not stat.S_ISREG(os.fstat(fd).st_mode)  # a pipe or terminal: lines arrive over time
    pending, number = b"", 0
    while True:
        if interactive:
            ready, _, _ = select.select([fd], [], [], linger_s)
            if not ready:
                yield None
                continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            number += 1
            yield number, raw
    if pending.strip():
        yield number + 1, pending


def cmd_produce(args) -> int:
    import pyarrow as pa

    try:
        source = open(args.file, "rb") if args.file else sys.stdin.buffer
    except OSError as exc:
        raise UsageError(f"cannot read {args.file!r}: {exc.strerror or exc}; give a file of JSON lines, or none "
                         "to read them from stdin") from None
    try:
        topic = open_log(args).topic(args.topic)
    except BaseException:
        if args.file:
            source.close()
        raise
    name = args.file or "stdin"
    rows: list[dict] = []
    first_line = None
    produced = appended = 0

    def flush() -> None:
        nonlocal rows, produced, appended, first_line
        if not rows:
            return
        schema = topic.schema()
        try:
            table = pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
            raise SourceError(
                f"lines {first_line}..{first_line + len(rows) - 1} of {name} do not fit topic {args.topic!r}: "
                f"{str(exc).splitlines()[0]} ({produced} records before them were appended; these were not)"
            ) from None
        topic.append(table, key=args.key)
        produced += len(rows)
        appended += 1
        rows, first_line = [], None

    try:
        for item in _lines(source, args.linger):
            if item is None:
                flush()
                continue
            number, raw = item
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:
                flush()
                raise SourceError(f"line {number} of {name} is not JSON ({exc}); the {produced} records "
                                  "before it were appended, nothing after it") from None
            if not isinstance(record, dict):
                flush()
                raise SourceError(f"line {number} of {name} is a JSON {type(record).__name__}, not an object; "
                                  f"the {produced} records before it were appended, nothing after it")
            if first_line is None:
                first_line = number
            rows.append(record)
            if len(rows) >= args.batch_rows:
                flush()
        flush()
    finally:
        if args.file:
            source.close()
    print(f"produced {produced} records to {args.topic} in {appended} append(s)", file=sys.stderr)
    return 0


def _print_records(table, partition: int) -> None:
    for row in table.to_pylist():
        offset = row.pop(_OFFSET)
        print(json.dumps({"partition": partition, "offset": offset, **row}, default=str), flush=True)


def cmd_tail(args) -> int:
    topic = open_log(args).topic(args.topic)
    partitions = [args.partition] if args.partition is not None else list(range(topic.config.partitions))
    positions = {}
    for p in partitions:
        first, end = topic.offsets(p)
        start = max(first, end - args.records)
        table, _ = topic.read_with_dead_letters(p, start, end, with_offsets=True)
        _print_records(table, p)
        positions[p] = end
    while args.follow:
        time.sleep(0.5)
        for p in partitions:
            first, end = topic.offsets(p)
            if end > positions[p]:
                table, _ = topic.read_with_dead_letters(p, max(first, positions[p]), end, with_offsets=True)
                _print_records(table, p)
                positions[p] = end
    return 0


def describe_text(doc: dict) -> str:
    cfg = doc["config"]
    lines = [f"topic {doc['topic']} in {doc['log']}: {cfg['partitions']} partition(s)"
             + (f", key {cfg['key']}" if cfg["key"] else "")
             + (f", retention {cfg['retention_age_s']:g} s" if cfg["retention_age_s"] else "")
             + (f", retention {cfg['retention_bytes']} bytes/partition" if cfg["retention_bytes"] else "")]
    lines.append(f"columns: {', '.join(doc['columns']) if doc['columns'] else '(none yet: nothing produced)'}")
    lines.append(f"{'partition':>9}  {'first':>10}  {'end':>10}  {'records':>10}  {'segments':>8}  {'bytes':>12}")
    for p in doc["partitions"]:
        lines.append(f"{p['partition']:>9}  {p['first_offset']:>10}  {p['end_offset']:>10}  "
                     f"{p['end_offset'] - p['first_offset']:>10}  {p['segments']:>8}  {p['bytes']:>12}")
        for path in p["unreadable_segments"]:
            lines.append(f"{'':>9}  unreadable segment: {path}")
    if not doc["consumers"]:
        lines.append("no job has read this topic yet")
    for job, c in doc["consumers"].items():
        age = f", {time.time() - c['updated_at']:.0f} s ago" if c.get("updated_at") else ""
        per = ", ".join(f"p{p}: {lag}" for p, lag in c["lag"].items())
        lines.append(f"job {job}: lag {c['total_lag']} records ({per}) as of its last checkpoint{age}")
    return "\n".join(lines)


def cmd_describe(args) -> int:
    doc = open_log(args).topic(args.topic).describe()
    print(json.dumps(doc, indent=1) if args.json else describe_text(doc))
    return 0


def cmd_compact(args) -> int:
    topic = open_log(args).topic(args.topic)
    report = topic.compact(key=args.key)
    if not report:
        print(f"topic {args.topic} has no records yet: nothing to compact")
    for p, r in report.items():
        if r.get("skipped"):
            print(f"partition {p}: skipped ({r['skipped']})")
        else:
            print(f"partition {p}: {r['records_before']} -> {r['records_after']} records "
                  f"in closed segments ({r['segments_merged']} merged into one)")
    return 0


def cmd_topics(args) -> int:
    log = open_log(args)
    names = log.topics()
    if not names:
        print(f"no topics in {log.url}; create one with: sluiceway log create TOPIC --partitions N", file=sys.stderr)
    for name in names:
        topic = log.topic(name)
        records = sum(end - first for first, end in (topic.offsets(p) for p in range(topic.config.partitions)))
        print(f"{name}\t{topic.config.partitions} partition(s)\t{records} records")
    return 0

