"""``PostgresSink``: rows into a PostgreSQL table, exactly once, by
PostgreSQL's own two-phase commit (``psycopg``).

- **Pre-commit** (each task): one transaction per (epoch, subtask) loads the
  epoch's rows with ``COPY ... FROM STDIN (FORMAT csv)`` (pyarrow writes the
  CSV: no Python per row), inserts them (``append``) or upserts them by key
  (``upsert``: ``INSERT ... ON CONFLICT (key) DO UPDATE``, the last row of a
  key in the epoch winning; a changelog's ``_op = 'delete'`` deletes the
  key: a table sunk here stays an exact copy), and ends with ``PREPARE TRANSACTION`` under the
  name ``sluiceway:<job>:<step>:<epoch>:<subtask>:<attempt>``. The rows are
  durable and invisible.
- **Commit** (the coordinator): ``COMMIT PREPARED`` for each of the epoch's
  names. A name PostgreSQL no longer knows was committed before (only abort
  rolls back, and never an epoch of the commit log): committing twice is
  harmless.
- **Abort** (start and recovery, after the commit log's epochs were committed
  again): ``ROLLBACK PREPARED`` for every prepared transaction of the job and
  step still in ``pg_prepared_xacts``: none of them belongs to a committed
  epoch.

The server must allow prepared transactions (``max_prepared_transactions`` >
0, at least the number of sink subtasks times two epochs in flight).

A server that cannot be reached is waited for: connecting is retried with a
growing backoff for ``connect_deadline_s`` (default: the run's storage
deadline, ``--storage-deadline``, 120 s unless set), and the job reports
that it waits (a ``storage_waiting`` event naming the server) instead of
failing. Ctrl-C stops a job that waits at once.
Before its first rows, each writer checks that the table exists and has
every column of the stream: a table that does not fit stops the job with
the columns named, before anything is written.

**Owner** (``claim``, when a run starts): the bookkeeping table
``sluiceway_sink_owners`` (made in the connection's current schema on first
use) holds, per table, the job, job id and sink step that write it. Another
job, another sink step of this job, or this job under other checkpoints (its
checkpoint history was deleted: appending again would duplicate) is refused
in one line before anything is written or rolled back: two runs of one job
and step would roll back each other's prepared transactions. A record keeps
the table's oid (from the claim, or from the first writer once it made the
table): when that table was dropped since (it is gone, or another has its
name) the record protects nothing and is replaced. To hand a table over,
``DELETE FROM sluiceway_sink_owners WHERE target = '<schema>.<table>'``. A
table without a record is claimed as it is: its rows carry no epochs, so
nothing tells whose they are.
"""

from __future__ import annotations

import io
import re

import pyarrow as pa
import pyarrow.csv as pacsv

from sluiceway.operators.errors import FlowValidationError, SinkError, SinkOwnershipError
from sluiceway.operators.connectors import requires
from sluiceway.operators.connectors.codec import ServerDeadline, call_server
from sluiceway.operators.sink_guard import owner_refusal
from sluiceway.operators.sinks import Sink, SinkContext, SinkOwner, SinkWriter

MODES = ("append", "upsert")
_PG_TYPES = [
    (pa.types.is_boolean, "boolean"),
    (pa.types.is_integer, "bigint"),
    (pa.types.is_floating, "double precision"),
    (pa.types.is_decimal, "numeric"),
    (pa.types.is_timestamp, "timestamptz"),
    (pa.types.is_date, "date"),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "text"),
    (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "bytea"),
]


def _psycopg():
    return requires("psycopg", "PostgresSink", "postgres")


def gid_prefix(job: str, step: str) -> str:
    return f"sluiceway:{job}:{step}:"


def gid_epoch(gid: str, prefix: str) -> int | None:
    """The epoch in a prepared transaction's name, or None if it is not ours.

    >>> gid_epoch("sluiceway:clicks:out:12:0:f1g0", "sluiceway:clicks:out:")
    12
    """
    if not gid.startswith(prefix):
        return None
    head = gid[len(prefix):].split(":", 1)[0]
    return int(head) if head.isdigit() else None


def column_type(t: pa.DataType) -> str:
    """The PostgreSQL type a new table gets for an Arrow type.

    >>> column_type(pa.int32()), column_type(pa.string()), column_type(pa.float64())
    ('bigint', 'text', 'double precision')
    """
    for test, name in _PG_TYPES:
        if test(t):
            return name
    raise SinkError(f"PostgresSink cannot create a column for Arrow type {t}; create the table yourself")


def _server(dsn: str) -> tuple[str, int, str]:
    """A DSN's host, port and database."""
    fields = dict(re.findall(r"(\w+)=(\S+)", dsn))
    if "://" in dsn:
        from urllib.parse import urlsplit

        url = urlsplit(dsn)
        fields = {"host": url.hostname or "localhost", "port": url.port or 5432, "dbname": url.path.lstrip("/")}
    return (fields.get("host", "localhost"), int(fields.get("port", 5432)),
            fields.get("dbname") or fields.get("user") or "postgres")


def server_name(dsn: str) -> str:
    """Where a DSN points, without its password, for messages.

    >>> server_name("host=db.internal port=5433 user=app password=secret dbname=shop")
    'PostgreSQL at db.internal:5433 (database shop)'
    """
    host, port, dbname = _server(dsn)
    return f"PostgreSQL at {host}:{port} (database {dbname})"


OWNERS = "sluiceway_sink_owners"  # the bookkeeping table: who writes each table (see the module doc)
_TARGET = "COALESCE(NULLIF(%s, ''), current_schema()) || '.' || %s"  # a table's name, schema-qualified


def connect(dsn: str, deadline_s: float, on_wait=None, autocommit: bool = False):
    """A connection, retrying with backoff while the server cannot be reached
    (``on_wait`` hears "waiting" and "resumed"); past ``deadline_s`` a
    :class:`SinkError` naming the server and the cause."""
    psycopg = _psycopg()
    return call_server("connect to", server_name(dsn),
                       lambda: psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10), deadline_s, on_wait,
                       retry_on=psycopg.OperationalError, error=SinkError, address="DSN")


def _gid_statement(verb: str, gid: str):
    """``PREPARE TRANSACTION 'gid'`` and friends take no bind parameters: quote the name."""
    from psycopg import sql

    return sql.SQL(verb + " {}").format(sql.Literal(gid))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table_ident(table: str) -> str:
    return ".".join(_ident(part) for part in table.split("."))


class _PostgresWriter(SinkWriter):
    def __init__(self, sink: "PostgresSink", context: SinkContext):
        self.sink, self.context = sink, context
        self.checked = False

    def _check_table(self, conn, schema: pa.Schema) -> None:
        """The table exists and has every column of the stream, or the job stops, naming them."""
        sink = self.sink
        schema_name, _, table_name = sink.table.rpartition(".")
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "AND table_schema = COALESCE(NULLIF(%s, ''), current_schema()) ORDER BY ordinal_position",
            [table_name, schema_name]).fetchall()
        have = [r[0] for r in rows]
        step = self.context.step
        if not have:
            raise FlowValidationError(step, "sink", f"PostgreSQL table {sink.table!r} does not exist in "
                                      f"{server_name(sink.dsn)}: create it, or pass create_table=True")
        missing = [c for c in schema.names if c not in have]
        if missing:
            raise FlowValidationError(step, "sink", f"PostgreSQL table {sink.table!r} has no column(s) "
                                      f"{', '.join(missing)} of the stream (table: {', '.join(have)}; stream: "
                                      f"{', '.join(schema.names)}); alter the table or select the columns it has")

    def _record_oid(self, conn) -> None:
        """The owner record of a table made after its claim learns the table's oid: dropped and made again
        (another oid), the table no longer holds what the record speaks for."""
        if conn.execute("SELECT to_regclass(%s)", [OWNERS]).fetchone()[0] is None:
            return  # no run has claimed a table in this database
        schema_name, _, table_name = self.sink.table.rpartition(".")
        conn.execute(f"UPDATE {OWNERS} SET target_oid = to_regclass(%s)::oid WHERE target = {_TARGET} "
                     "AND target_oid IS NULL AND job = %s AND step = %s",
                     [_table_ident(self.sink.table), schema_name, table_name, self.context.job, self.context.step])

    def precommit(self, epoch: int, table: pa.Table | None) -> dict:
        handle = {"subtask": self.context.subtask, "gid": None, "rows": 0}
        if table is None or table.num_rows == 0:
            return handle
        psycopg = _psycopg()
        sink = self.sink
        if sink.key:
            missing = [k for k in sink.key if k not in table.column_names]
            if missing:
                raise SinkError(f"PostgresSink upsert key {missing} is not in the stream's columns {table.column_names}")
        deletes = None
        if sink.mode == "upsert" and "_op" in table.column_names:  # a changelog: upserts and deletes
            from sluiceway.operators.tables import split_changes

            table, deletes = split_changes(table, sink.key, self.context.step)
        if not self.checked:
            if sink.create_table:
                sink.ensure_table(table.schema, self.context.on_wait)
            with connect(sink.dsn, sink.connect_deadline_s, self.context.on_wait) as conn:
                self._check_table(conn, table.schema)
                self._record_oid(conn)
            self.checked = True
        gid = (f"{gid_prefix(self.context.job, self.context.step)}{epoch}:{self.context.subtask}:"
               f"{self.context.attempt}")
        columns = ", ".join(_ident(c) for c in table.column_names)
        target = _table_ident(sink.table)
        data = io.BytesIO()
        pacsv.write_csv(table, data, pacsv.WriteOptions(include_header=False))
        with connect(sink.dsn, sink.connect_deadline_s, self.context.on_wait) as conn:
            if deletes is not None and deletes.num_rows:
                self._delete(conn, target, deletes, epoch)
            if table.num_rows == 0:
                pass
            elif sink.mode == "append":
                with conn.cursor().copy(f"COPY {target} ({columns}) FROM STDIN (FORMAT csv)") as copy:
                    copy.write(data.getvalue())
            else:
                stage = _ident(f"_sluiceway_stage_{epoch}_{self.context.subtask}_{self.context.attempt}")
                keys = ", ".join(_ident(k) for k in sink.key)
                updates = ", ".join(f"{_ident(c)} = EXCLUDED.{_ident(c)}" for c in table.column_names
                                    if c not in sink.key)
                conn.execute(f"CREATE UNLOGGED TABLE {stage} AS SELECT {columns} FROM {target} WITH NO DATA")
                with conn.cursor().copy(f"COPY {stage} ({columns}) FROM STDIN (FORMAT csv)") as copy:
                    copy.write(data.getvalue())
                conflict = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
                conn.execute(f"INSERT INTO {target} ({columns}) SELECT DISTINCT ON ({keys}) {columns} FROM {stage} "
                             f"ORDER BY {keys}, ctid DESC ON CONFLICT ({keys}) {conflict}")
                conn.execute(f"DROP TABLE {stage}")
            try:
                conn.execute(_gid_statement("PREPARE TRANSACTION", gid))
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:
                raise SinkError(
                    f"PostgreSQL refused PREPARE TRANSACTION ({exc.diag.message_primary}): PostgresSink needs "
                    "prepared transactions; set max_prepared_transactions (at least twice the number of sink "
                    "tasks) in postgresql.conf and restart the server"
                ) from None
        return {**handle, "gid": gid, "rows": table.num_rows + (0 if deletes is None else deletes.num_rows)}

    def _delete(self, conn, target: str, keys: pa.Table, epoch: int) -> None:
        """Delete the rows of ``keys`` (the key columns of a changelog's deletes)."""
        stage = _ident(f"_sluiceway_delete_{epoch}_{self.context.subtask}_{self.context.attempt}")
        names = ", ".join(_ident(k) for k in keys.column_names)
        conn.execute(f"CREATE UNLOGGED TABLE {stage} AS SELECT {names} FROM {target} WITH NO DATA")
        data = io.BytesIO()
        pacsv.write_csv(keys, data, pacsv.WriteOptions(include_header=False))
        with conn.cursor().copy(f"COPY {stage} ({names}) FROM STDIN (FORMAT csv)") as copy:
            copy.write(data.getvalue())
        # An earlier epoch's rows of these keys may be in a prepared transaction not yet committed, which a
        # DELETE would not see. Claiming each key first waits for such a transaction, as an upsert does (the
        # unique index makes it wait), and leaves a row of it to delete (so other columns must allow nulls).
        conn.execute(f"INSERT INTO {target} ({names}) SELECT {names} FROM {stage} ON CONFLICT ({names}) DO NOTHING")
        match = " AND ".join(f"{target}.{_ident(k)} = {stage}.{_ident(k)}" for k in keys.column_names)
        conn.execute(f"DELETE FROM {target} USING {stage} WHERE {match}")
        conn.execute(f"DROP TABLE {stage}")


class PostgresSink(ServerDeadline, Sink):
    """Rows of each epoch into PostgreSQL table ``table`` (``schema.table``
    allowed), visible per epoch, exactly once. ``mode="upsert"`` needs
    ``key`` (the table's primary key or a unique constraint on it), and
    takes a changelog too (``_op``: a delete removes the key's row; the
    table's other columns must then allow nulls, see ``_delete``);
    ``create_table=True`` creates a missing table from the stream's schema."""

    kind = "postgres"

    def __init__(self, dsn: str, table: str, mode: str = "append", key: list[str] | None = None,
                 create_table: bool = False, connect_deadline_s: float | None = None):
        if mode not in MODES:
            raise SinkError(f"PostgresSink mode {mode!r} is not one of {MODES}")
        if mode == "upsert" and not key:
            raise SinkError("PostgresSink mode 'upsert' needs key=[columns] (a primary key or unique constraint)")
        self.dsn, self.table, self.mode = dsn, table, mode
        self.key = list(key or [])
        self.create_table = create_table
        self.connect_deadline_s = connect_deadline_s  # None: the run's storage deadline (ServerDeadline)

    def open(self, context: SinkContext) -> SinkWriter:
        return _PostgresWriter(self, context)

    def ensure_table(self, schema: pa.Schema, on_wait=None) -> None:
        columns = [f"{_ident(f.name)} {column_type(f.type)}" for f in schema]
        if self.key:
            columns.append(f"PRIMARY KEY ({', '.join(_ident(k) for k in self.key)})")
        with connect(self.dsn, self.connect_deadline_s, on_wait) as conn:
            # Subtasks create it at once; CREATE TABLE IF NOT EXISTS alone races in the catalog.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"sluiceway:create:{self.table}"])
            conn.execute(f"CREATE TABLE IF NOT EXISTS {_table_ident(self.table)} ({', '.join(columns)})")

    def commit(self, epoch: int, handles: list[dict]) -> None:
        gids = [h["gid"] for h in sorted(handles, key=lambda h: h["subtask"]) if h.get("gid")]
        if not gids:
            return
        with connect(self.dsn, self.connect_deadline_s, self.on_wait, autocommit=True) as conn:
            prepared = {row[0] for row in conn.execute("SELECT gid FROM pg_prepared_xacts WHERE gid = ANY(%s)",
                                                       [gids])}
            for gid in gids:
                if gid in prepared:  # otherwise committed before
                    conn.execute(_gid_statement("COMMIT PREPARED", gid))

    def claim(self, owner: SinkOwner) -> None:
        """Record ``owner`` in ``sluiceway_sink_owners``, or refuse it (see the module doc)."""
        psycopg = _psycopg()
        schema_name, _, table_name = self.table.rpartition(".")
        with connect(self.dsn, self.connect_deadline_s, self.on_wait) as conn:  # one transaction
            try:
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('sluiceway:owners'))")  # claims one at a time
                conn.execute(f"CREATE TABLE IF NOT EXISTS {OWNERS} (target text PRIMARY KEY, target_oid oid, "
                             "job text NOT NULL, job_id text NOT NULL, step text NOT NULL, checkpoints text NOT NULL, "
                             "created_at timestamptz NOT NULL DEFAULT now())")
            except psycopg.errors.InsufficientPrivilege as exc:
                raise SinkError(f"PostgresSink cannot keep its owner records in {OWNERS} in {server_name(self.dsn)} "
                                f"({exc.diag.message_primary}): let the job's user create tables in its schema, or "
                                f"create {OWNERS} for it (see sluiceway.operators.connectors.postgres)") from None
            target, oid = conn.execute(f"SELECT {_TARGET}, to_regclass(%s)::oid",
                                       [schema_name, table_name, _table_ident(self.table)]).fetchone()
            row = conn.execute(f"SELECT job, job_id, step, checkpoints, target_oid FROM {OWNERS} WHERE target = %s",
                               [target]).fetchone()
            if row is not None and row[4] is not None and row[4] != oid:
                conn.execute(f"DELETE FROM {OWNERS} WHERE target = %s", [target])  # its table was dropped
                row = None
            if row is None:
                conn.execute(f"INSERT INTO {OWNERS} (target, target_oid, job, job_id, step, checkpoints) "
                             "VALUES (%s, %s, %s, %s, %s, %s)",
                             [target, oid, owner.job, owner.job_id, owner.step, owner.checkpoints])
                return
            found = {"job": row[0], "job_id": row[1], "step": row[2], "checkpoints": row[3]}
            refusal = owner_refusal(f"PostgresSink table {target!r} in {server_name(self.dsn)}", "table", found, owner)
            if refusal is not None:
                raise SinkOwnershipError(refusal)
            if row[4] is None and oid is not None:
                conn.execute(f"UPDATE {OWNERS} SET target_oid = %s WHERE target = %s", [oid, target])

    def location(self) -> str:
        host, port, dbname = _server(self.dsn)
        return f"postgresql://{host}:{port}/{dbname}/{self.table}"

    def abort(self, after_epoch: int, context: SinkContext) -> None:
        prefix = gid_prefix(context.job, context.step)
        with connect(self.dsn, self.connect_deadline_s, context.on_wait, autocommit=True) as conn:
            rows = conn.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
                                "AND starts_with(gid, %s)", [prefix]).fetchall()
            for (gid,) in rows:
                if gid_epoch(gid, prefix) is not None:
                    conn.execute(_gid_statement("ROLLBACK PREPARED", gid))

    def describe(self) -> dict:
        return {"kind": self.kind, "table": self.table, "mode": self.mode, "key": self.key}
