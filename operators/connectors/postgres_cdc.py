"""PostgreSQL change data capture: a consistent snapshot of some tables,
then every insert, update and delete, as a changelog stream
(``pip install 'sluiceway[postgres]'``; the server needs ``wal_level=logical``
and the ``wal2json`` output plugin, Debian's ``postgresql-15-wal2json``).

**How it reads.** A logical replication slot keeps the server's WAL from
the slot's position on. The source reads it with
``pg_logical_slot_peek_changes`` (``wal2json``, format 2), which decodes
without consuming, so a planned range is decoded again byte for byte on a
replay; and it moves the slot with ``pg_replication_slot_advance`` only
after a checkpoint that covers the changes completed, so a crash loses
nothing and the server does not keep WAL forever. (The SQL functions, not
the streaming replication protocol: the job plans ranges and reads them
again on replay, which is what peek-then-advance does, over an ordinary
connection; the streaming protocol pushes changes once and would need its
own feedback loop and a connection held across epochs.)

**Offsets.** One partition. The snapshot's rows are offsets ``0 .. S-1``;
a transaction that commits at ``lsn`` (the end of its commit record) is
the offset ``S + lsn - L0``, where ``L0`` is the slot's position when the
snapshot was taken: every change of a transaction carries its commit's
offset, and transactions come in commit order. An epoch planned up to the
server's flushed WAL position holds only transactions whose commit is
already flushed, so every read of the range decodes the same ones.

**The seam.** The snapshot is taken after the slot exists, in one
``REPEATABLE READ`` transaction over all the tables, and its
``pg_current_snapshot()`` is recorded: a streamed transaction the snapshot
already saw (committed before it) is skipped, and one it did not see is
kept. No change is lost or repeated between the two. The snapshot is
written to the job's checkpoint storage (``sources/<step>/snapshot/``), so
a replay of it reads the same rows and the database is read once.

**The stream.** Each row has the table's columns, then ``_table``
(``schema.table``), ``_op`` (``insert``, ``update``, ``delete``; a
snapshot row is an ``insert``) and ``_lsn`` (the commit's LSN, ``0/0`` for
the snapshot). A delete carries the key columns (the table's replica
identity) and nulls. An update that changes the key is a ``delete`` of the
old key, then an ``insert``; with ``updates="retract"`` (the table needs
``REPLICA IDENTITY FULL``) every update is the old row as a ``delete``,
then the new row as an ``insert``, and a delete carries the whole old row:
what sums and counts need to take a changed row back. A column added while the job runs appears
from the first change that has it (earlier epochs do not have the column).
Unchanged TOASTed values (large text) in an update come as null unless the
table has ``REPLICA IDENTITY FULL``.

>>> arrow_type("numeric(10,2)"), arrow_type("timestamp with time zone"), arrow_type("character varying(20)")
(Decimal128Type(decimal128(10, 2)), TimestampType(timestamp[us, tz=UTC]), DataType(string))
>>> format_lsn(parse_lsn("16/B374D848"))
'16/B374D848'
"""

from __future__ import annotations

import datetime
import decimal
import json
import posixpath
import re
import time

import pyarrow as pa

from sluiceway.operators.connectors import requires
from sluiceway.operators.connectors.codec import ServerDeadline, call_server
from sluiceway.operators.errors import FlowDefinitionError, SourceError
from sluiceway.operators.sources import Lag, Source, dead_letter

_OPTIONS = ["format-version", "2", "include-transaction", "true", "include-types", "true"]
_SNAPSHOT_CHUNK = 50_000  # rows per snapshot file
_WAL_BYTES_PER_CHANGE = 1024  # an epoch capped at N changes reads up to N * this many bytes of WAL
META = [("_table", pa.string()), ("_op", pa.string()), ("_lsn", pa.string())]


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def arrow_type(pg_type: str) -> pa.DataType:
    """The Arrow type for a PostgreSQL type as ``format_type`` (and wal2json) names it."""
    t = pg_type.lower()
    if t in ("smallint", "integer", "bigint", "oid"):
        return pa.int64()
    if t in ("real", "double precision"):
        return pa.float64()
    match = re.fullmatch(r"numeric\((\d+),(\d+)\)", t)
    if match:
        return pa.decimal128(int(match.group(1)), int(match.group(2)))
    if t == "numeric":
        return pa.float64()
    if t == "boolean":
        return pa.bool_()
    if t.startswith("timestamp") and "with time zone" in t:
        return pa.timestamp("us", "UTC")
    if t.startswith("timestamp"):
        return pa.timestamp("us")
    if t == "date":
        return pa.date32()
    return pa.string()


def _value(value, kind: pa.DataType):
    """A value from psycopg (Python types) or wal2json (JSON) for a column of ``kind``."""
    if value is None:
        return None
    if pa.types.is_timestamp(kind) and isinstance(value, str):
        parsed = datetime.datetime.fromisoformat(value.replace(" ", "T"))
        return parsed.astimezone(datetime.timezone.utc) if parsed.tzinfo else parsed
    if pa.types.is_date(kind) and isinstance(value, str):
        return datetime.date.fromisoformat(value)
    if pa.types.is_decimal(kind):
        return decimal.Decimal(str(value))
    if pa.types.is_floating(kind):
        return float(value)
    if pa.types.is_string(kind) and not isinstance(value, str):
        return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return value


def rows_table(rows: list[dict], columns: dict[str, pa.DataType]) -> pa.Table:
    """Rows (column -> value, plus the metadata columns) as a table with
    ``columns`` in order, then ``_table``, ``_op``, ``_lsn``."""
    fields = [pa.field(n, t) for n, t in columns.items()] + [pa.field(n, t) for n, t in META]
    arrays = [pa.array([_value(r.get(f.name), f.type) for r in rows], f.type) for f in fields]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _psycopg():
    return requires("psycopg", "PostgresCDCSource", "postgres")


def _qualified(table: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?", table or ""):
        raise FlowDefinitionError(f"PostgresCDCSource table {table!r} must be 'name' or 'schema.name'")
    return table if "." in table else f"public.{table}"


class _Snapshot:
    """Which transactions a snapshot saw: ``pg_current_snapshot()`` as ``xmin:xmax:xip,...``.

    >>> s = _Snapshot("731:735:732,734")
    >>> [s.saw(x) for x in (730, 732, 733, 735)]
    [True, False, True, False]
    """

    def __init__(self, text: str):
        xmin, xmax, xip = text.split(":")
        self.text, self.xmin, self.xmax = text, int(xmin), int(xmax)
        self.xip = {int(x) for x in xip.split(",") if x}

    def saw(self, xid: int) -> bool:
        full = (self.xmax & ~0xFFFFFFFF) | (xid & 0xFFFFFFFF)  # the 32-bit xid in the snapshot's epoch
        if full > self.xmax + (1 << 31):
            full -= 1 << 32
        return full < self.xmin or (full < self.xmax and full not in self.xip)


class PostgresCDCSource(ServerDeadline, Source):
    """The changes of ``tables`` (``"orders"`` or ``"shop.orders"``) through the
    logical replication slot ``slot``, created with ``wal2json`` when missing
    (and dropped only by ``sluiceway cdc drop-slot``). See the module."""

    kind = "postgres-cdc"

    def __init__(self, dsn: str, tables: list[str] | str, slot: str, *, updates: str = "upsert",
                 connect_deadline_s: float | None = None):
        tables = [tables] if isinstance(tables, str) else list(tables)
        if not tables:
            raise FlowDefinitionError("PostgresCDCSource needs tables=[...]: the tables whose changes to capture")
        if not isinstance(slot, str) or not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise FlowDefinitionError(f"PostgresCDCSource slot {slot!r} must be lower-case letters, digits and "
                                      "'_' (at most 63): PostgreSQL's rule for slot names")
        if updates not in ("upsert", "retract"):
            raise FlowDefinitionError(f"PostgresCDCSource updates= must be 'upsert' or 'retract', got {updates!r}")
        self.dsn, self.tables, self.slot, self.updates = dsn, [_qualified(t) for t in tables], slot, updates
        self.connect_deadline_s = connect_deadline_s
        self._reset()

    def _reset(self) -> None:
        self._storage = self._step = self._doc = self._snapshot = self._on_wait = None

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("_storage", "_step", "_doc", "_snapshot", "_on_wait"):
            state.pop(name)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # --------------------------------------------------------- the server
    def _server(self) -> str:
        from sluiceway.operators.connectors.postgres import server_name

        return server_name(self.dsn)

    def _sql(self, what: str, fn, autocommit: bool = True):
        """``fn(connection)`` on a new connection, retried while the server cannot be reached."""
        psycopg = _psycopg()

        def attempt():
            for wait in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 0.0):
                try:
                    with psycopg.connect(self.dsn, autocommit=autocommit, connect_timeout=10) as conn:
                        return fn(conn)
                except psycopg.errors.ObjectInUse:  # one session at a time may decode from a slot: take turns
                    if not wait:
                        raise
                    time.sleep(wait)

        return call_server(what, self._server(), attempt, self.connect_deadline_s, self._on_wait,
                           retry_on=psycopg.OperationalError)

    # -------------------------------------------------------- bookkeeping
    def bind(self, storage, step: str) -> None:
        """Load the snapshot's record; the first time (on the coordinator, before any
        task), create the slot when missing and take the snapshot."""
        self._storage, self._step, self._on_wait = storage, step, storage.on_wait
        path = storage.source_path(step, "cdc.json")
        doc = storage.read_json(path)
        recorded = doc is not None
        if not recorded:
            doc = self._take_snapshot(storage, step)  # checks the slot it creates or finds
            try:
                storage.create_json(path, doc)
            except FileExistsError:  # another run recorded its snapshot first: use that one
                doc = storage.read_json(path)
        if doc["slot"] != self.slot or doc["tables"] != self.tables:
            raise SourceError(f"PostgresCDCSource: this job's checkpoints captured tables {doc['tables']} through "
                              f"slot {doc['slot']!r}; the flow now names {self.tables} through {self.slot!r}. Use "
                              "a new job name (or checkpoint dir) for other tables or another slot")
        if recorded:  # a slot made for an earlier run must still be there
            self._check_slot(must_exist=True)
        self._doc, self._snapshot = doc, _Snapshot(doc["snapshot"])

    def _check_tables(self, conn) -> None:
        missing = [t for t in self.tables if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is None]
        if missing:
            raise SourceError(f"PostgreSQL table {', '.join(missing)} does not exist at {self._server()}: create it "
                              "or fix tables=[...]")
        if self.updates == "retract":
            partial = [t for t in self.tables if conn.execute(
                "SELECT relreplident FROM pg_class WHERE oid = %s::regclass", (t,)).fetchone()[0] != "f"]
            if partial:
                raise SourceError(f"PostgresCDCSource(updates='retract') needs the old rows of updates and deletes: "
                                  f"ALTER TABLE {partial[0]} REPLICA IDENTITY FULL")

    def _check_slot(self, must_exist: bool) -> None:
        row = self._sql("read the slot on", lambda c: c.execute(
            "SELECT plugin, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,)).fetchone())
        if row is None and must_exist:
            raise SourceError(f"replication slot {self.slot!r} is gone from {self._server()}, so changes since the "
                              "last checkpoint are lost to this job; start it under a new job name to take a new "
                              "snapshot")
        if row is not None and row[0] != "wal2json":
            raise SourceError(f"replication slot {self.slot!r} uses the {row[0]} plugin; PostgresCDCSource needs "
                              f"wal2json: drop it (sluiceway cdc drop-slot) or name another slot")

    def _take_snapshot(self, storage, step: str) -> dict:
        psycopg = _psycopg()

        def create(conn):
            self._check_tables(conn)
            try:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (self.slot,))
            except psycopg.errors.DuplicateObject:
                pass  # made earlier (by this job before a crash, or by you): its position is where we begin
            except psycopg.errors.UndefinedFile as exc:
                raise SourceError(f"PostgreSQL at {self._server()} has no wal2json output plugin: install it "
                                  f"(apt-get install postgresql-15-wal2json): {exc}") from None
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:
                raise SourceError(f"PostgreSQL at {self._server()} cannot do logical decoding: "
                                  f"{str(exc).splitlines()[0]}; set wal_level=logical and restart it") from None

        self._sql("create a slot on", create)
        self._check_slot(must_exist=True)
        l0 = parse_lsn(self._sql("read the slot on", lambda c: c.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,)).fetchone()[0]))

        def snapshot(conn):
            rows, columns, files, keys = [], {}, [], {}
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                seen = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
                for table in self.tables:
                    columns[table] = self._columns(conn, table)
                    keys[table] = [k for (k,) in conn.execute(
                        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                        "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary "
                        "ORDER BY array_position(i.indkey, a.attnum)", (table,)).fetchall()]
                    with conn.cursor(name="sluiceway_snapshot") as cur:
                        cur.execute(f"SELECT * FROM {table}")  # noqa: S608 - a validated identifier
                        names = [d.name for d in cur.description]
                        while True:
                            batch = cur.fetchmany(5000)
                            if not batch:
                                break
                            rows.extend({**dict(zip(names, r)), "_table": table, "_op": "insert", "_lsn": "0/0"}
                                        for r in batch)
                            while len(rows) >= _SNAPSHOT_CHUNK:
                                files.append(self._write_chunk(storage, step, rows[:_SNAPSHOT_CHUNK], columns,
                                                               sum(f["rows"] for f in files)))
                                rows = rows[_SNAPSHOT_CHUNK:]
                if rows:
                    files.append(self._write_chunk(storage, step, rows, columns, sum(f["rows"] for f in files)))
            return seen, files, columns, keys

        seen, files, columns, keys = self._sql("take a snapshot on", snapshot, autocommit=False)
        union = {}
        for table in self.tables:
            for name, pg_type in columns[table].items():
                union.setdefault(name, pg_type)
        return {"slot": self.slot, "tables": self.tables, "l0": l0, "l0_text": format_lsn(l0), "snapshot": seen,
                "rows": sum(f["rows"] for f in files), "files": files, "columns": union, "keys": keys}

    def _columns(self, conn, table: str) -> dict[str, str]:
        return dict(conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (table,)).fetchall())

    def _write_chunk(self, storage, step: str, rows: list[dict], columns: dict, first: int) -> dict:
        union = {}
        for table in self.tables:
            for name, pg_type in columns.get(table, {}).items():
                union.setdefault(name, arrow_type(pg_type))
        table = rows_table(rows, union)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        name = f"{first:012d}.arrow"
        storage.write_bytes(storage.source_path(step, "snapshot", name), sink.getvalue().to_pybytes())
        return {"name": name, "first": first, "rows": table.num_rows}

    # ------------------------------------------------------------ offsets
    def _offset(self, lsn: int) -> int:
        return self._doc["rows"] + lsn - self._doc["l0"]

    def _lsn(self, offset: int) -> int:
        return offset - self._doc["rows"] + self._doc["l0"]

    def partition_count(self) -> int:
        return 1

    def readable(self, partition: int, now: float, started_at: float) -> tuple[int, int]:
        flushed = parse_lsn(self._sql("read the WAL position of", lambda c: c.execute(
            "SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]))
        return 0, max(self._doc["rows"], self._offset(flushed) + 1)

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return self.readable(partition, now, started_at)[1]

    def plan_stop(self, partition: int, start: int, latest: int, cap: int) -> int:
        rows = self._doc["rows"]
        if start < rows:
            return min(rows, start + cap)  # the snapshot first, a capped number of rows at a time
        return min(latest, start + cap * _WAL_BYTES_PER_CHANGE)

    def lag(self, partition: int, start: int, latest: int, now: float) -> Lag:
        """Snapshot rows not yet read, plus an estimate of the changes behind (WAL bytes / 1024)."""
        rows = self._doc["rows"]
        behind = max(0, rows - start) + max(0, latest - max(start, rows)) // _WAL_BYTES_PER_CHANGE
        return Lag(max(behind, 1 if latest > start else 0))

    # -------------------------------------------------------------- reads
    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        return self.read_batch(partition, start, stop)[0]

    def read_batch(self, partition: int, start: int, stop: int) -> tuple[pa.Table, pa.Table | None]:
        parts, dead = [], []
        rows = self._doc["rows"]
        if start < rows:
            parts.append(self._snapshot_rows(start, min(stop, rows)))
        if stop > rows:
            changes, bad = self._changes(max(start, rows), stop)
            if changes is not None:
                parts.append(changes)
            dead.extend(bad)
        parts = [p for p in parts if p.num_rows] or [self._empty()]
        table = pa.concat_tables(parts, promote_options="permissive")
        return table, (pa.concat_tables(dead) if dead else None)

    def _empty(self) -> pa.Table:
        return rows_table([], {name: arrow_type(t) for name, t in self._doc["columns"].items()})

    def _snapshot_rows(self, start: int, stop: int) -> pa.Table:
        out = []
        for f in self._doc["files"]:
            lo, hi = max(start, f["first"]), min(stop, f["first"] + f["rows"])
            if lo >= hi:
                continue
            data = self._storage.read_bytes(self._storage.source_path(self._step, "snapshot", f["name"]))
            if data is None:
                raise SourceError(f"snapshot file {f['name']} of the CDC source is missing from the job's storage")
            out.append(pa.ipc.open_file(pa.py_buffer(data)).read_all().slice(lo - f["first"], hi - lo))
        return pa.concat_tables(out) if out else self._empty()

    def _changes(self, start: int, stop: int) -> tuple[pa.Table | None, list[pa.Table]]:
        """Transactions committed at offsets ``[start, stop)``, in commit order."""
        upto = format_lsn(self._lsn(stop - 1))
        options = [*_OPTIONS, "add-tables", ",".join(self.tables)]
        found = self._sql("read changes from", lambda c: c.execute(
            "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes(%s, %s::pg_lsn, NULL, "
            + ", ".join(["%s"] * len(options)) + ")", (self.slot, upto, *options)).fetchall())
        rows, pending, dead = [], [], []
        columns = {name: arrow_type(t) for name, t in self._doc["columns"].items()}  # then any column added since
        for lsn_text, xid, data in found:
            try:
                change = json.loads(data, parse_float=decimal.Decimal)
            except ValueError as exc:
                offset = self._offset(parse_lsn(lsn_text))
                dead.append(dead_letter(f"postgres-cdc:{self.slot}", 0, offset, offset + 1, lsn_text,
                                        f"wal2json gave what is not JSON: {exc}", data.encode()[:65536]))
                continue
            action = change.get("action")
            if action == "B":
                pending = []
            elif action == "C":
                offset = self._offset(parse_lsn(lsn_text))
                if start <= offset < stop and not self._snapshot.saw(int(xid)):
                    rows.extend({**r, "_lsn": lsn_text} for r in pending)
                pending = []
            elif action in ("I", "U", "D"):
                pending.extend(self._rows(change, columns))
        return (rows_table(rows, columns) if rows else None), dead

    def _rows(self, change: dict, columns: dict[str, pa.DataType]) -> list[dict]:
        table = f"{change['schema']}.{change['table']}"
        for c in change.get("columns", []) + change.get("identity", []):
            columns.setdefault(c["name"], arrow_type(c["type"]))
        new = {c["name"]: c["value"] for c in change.get("columns", [])}
        old = {c["name"]: c["value"] for c in change.get("identity", [])}
        meta = {"_table": table}
        if change["action"] == "I":
            return [{**new, **meta, "_op": "insert"}]
        if change["action"] == "D":
            return [{**old, **meta, "_op": "delete"}]
        keys = self._doc["keys"].get(table) or list(old)  # no primary key: the replica identity's columns
        if old and (self.updates == "retract" or any(new.get(k) != old.get(k) for k in keys if k in old)):
            return [{**old, **meta, "_op": "delete"}, {**new, **meta, "_op": "insert"}]  # the old row out, the new in
        return [{**new, **meta, "_op": "update"}]

    # ------------------------------------------------------------ release
    def checkpointed(self, job: str, next_offsets: dict[int, int]) -> None:
        """Advance the slot past the last transaction the checkpoint covers."""
        stop = next_offsets.get(0, 0)
        if self._doc is None or stop <= self._doc["rows"]:
            return
        upto = format_lsn(self._lsn(stop - 1))
        ends = self._sql("read the slot on", lambda c: c.execute(
            "SELECT lsn::text FROM pg_logical_slot_peek_changes(%s, %s::pg_lsn, NULL, 'format-version', '2', "
            "'filter-tables', '*.*') WHERE data = '{\"action\":\"C\"}'", (self.slot, upto)).fetchall())
        covered = [parse_lsn(e) for (e,) in ends if self._offset(parse_lsn(e)) < stop]
        if covered:
            self._sql("advance the slot on", lambda c: c.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, format_lsn(max(covered)))))

    def describe(self) -> dict:
        return {"kind": self.kind, "partitions": 1, "server": self._server(), "tables": self.tables,
                "slot": self.slot}


def drop_slot(dsn: str, slot: str) -> bool:
    """Drop the replication slot ``slot``; ``False`` if there is none."""
    psycopg = _psycopg()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() is None:
            return False
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        return True


def slots(dsn: str) -> list[dict]:
    """The server's logical replication slots, with how much WAL each keeps."""
    psycopg = _psycopg()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT slot_name, plugin, active, confirmed_flush_lsn::text, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots "
            "WHERE slot_type = 'logical' ORDER BY slot_name").fetchall()
    return [{"slot": s, "plugin": p, "active": a, "confirmed": c, "wal_kept_bytes": w} for s, p, a, c, w in rows]
