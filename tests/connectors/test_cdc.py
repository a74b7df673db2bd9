"""PostgreSQL change data capture against a real server (``wal_level=logical``,
wal2json): the snapshot and the stream meet with no change lost or repeated;
updates and deletes of one key in one range; a column added mid-run; the
slot never passes a change no checkpoint covers; ranges read again give the
same rows; bad input is a clear error at start."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pyarrow as pa
import pytest

from sluiceway.checkpoint.storage import JobStorage
from sluiceway.operators.connectors.postgres_cdc import PostgresCDCSource, parse_lsn
from sluiceway.operators.errors import FlowDefinitionError, SourceError


def apply_changelog(rows: list[dict], key: str = "id") -> dict:
    """The table a changelog describes, applied in order: key -> row (without metadata)."""
    table = {}
    for r in rows:
        if r["_op"] == "delete":
            table.pop(r[key], None)
        else:
            table[r[key]] = {k: v for k, v in r.items() if not k.startswith("_")}
    return table


def contents(dsn: str, table: str, key: str = "id") -> dict:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(f"SELECT * FROM {table}")
        names = [d.name for d in cur.description]
        return {r[names.index(key)]: dict(zip(names, r)) for r in cur.fetchall()}


def same(changelog: dict, table: dict) -> bool:
    """Equal, where a column the changelog never saw (added later, never set) counts as null."""
    if changelog.keys() != table.keys():
        return False
    return all({k: changelog[i].get(k) for k in table[i]} == table[i] for i in table)


def everything(source) -> list[dict]:
    _, latest = source.readable(0, 0.0, 0.0)
    table, dead = source.read_batch(0, 0, latest)
    assert dead is None
    return table.to_pylist()


@pytest.fixture
def orders(postgres_dsn):
    """A fresh table of orders and a slot name; the slot is dropped afterwards."""
    name, slot = f"orders_{uuid.uuid4().hex[:8]}", f"slot_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2))")
    yield name, slot
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                     (slot,))


def bound(source, tmp_path):
    source.bind(JobStorage(str(tmp_path / "ckpt"), "cdc"), "orders")
    return source


def test_snapshot_then_stream_with_writes_running_during_the_snapshot(postgres_dsn, orders, tmp_path):
    table, slot = orders
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} SELECT i, 'c' || (i % 5), i FROM generate_series(1, 2000) i")
    stop = threading.Event()

    def write():  # inserts, updates and deletes, one transaction each, all through the snapshot
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            i = 2001
            while not stop.is_set():
                conn.execute(f"INSERT INTO {table} VALUES (%s, 'new', 1)", (i,))
                conn.execute(f"UPDATE {table} SET amount = amount + 1 WHERE id = %s", (i % 2000 + 1,))
                conn.execute(f"DELETE FROM {table} WHERE id = %s", (i - 1500,))
                i += 1

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.3)
    source = bound(PostgresCDCSource(postgres_dsn, [table], slot), tmp_path)
    time.sleep(0.3)
    stop.set()
    writer.join()
    rows = everything(source)
    assert source._doc["rows"] > 0 and len(rows) > source._doc["rows"], "writes before, during and after the snapshot"
    assert same(apply_changelog(rows), contents(postgres_dsn, table)), "the changelog applied in order differs"
    again = bound(PostgresCDCSource(postgres_dsn, [table], slot), tmp_path)  # another process, the same record
    assert everything(again) == rows


def test_updates_and_deletes_of_one_key_in_one_range_and_a_column_added(postgres_dsn, orders, tmp_path):
    table, slot = orders
    source = bound(PostgresCDCSource(postgres_dsn, [table], slot), tmp_path)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1, 'a', 1), (2, 'b', 2)")
        conn.execute(f"UPDATE {table} SET amount = 5 WHERE id = 1")
        conn.execute(f"DELETE FROM {table} WHERE id = 1")
        conn.execute(f"INSERT INTO {table} VALUES (1, 'a', 7)")
        conn.execute(f"UPDATE {table} SET id = 3 WHERE id = 2")  # a key that changes: delete 2, insert 3
        conn.execute(f"ALTER TABLE {table} ADD COLUMN note text")
        conn.execute(f"INSERT INTO {table} VALUES (4, 'd', 4, 'hello')")
        conn.execute(f"UPDATE {table} SET note = 'later' WHERE id = 1")
    rows = everything(source)
    assert [(r["_op"], r["id"]) for r in rows] == [("insert", 1), ("insert", 2), ("update", 1), ("delete", 1),
                                                   ("insert", 1), ("delete", 2), ("insert", 3), ("insert", 4),
                                                   ("update", 1)]
    assert rows[-2]["note"] == "hello" and rows[0].get("note") is None
    assert all(parse_lsn(r["_lsn"]) > 0 for r in rows)
    assert same(apply_changelog(rows), contents(postgres_dsn, table))


def test_the_slot_never_passes_a_change_no_checkpoint_covers(postgres_dsn, orders, tmp_path):
    table, slot = orders
    source = bound(PostgresCDCSource(postgres_dsn, [table], slot), tmp_path)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for i in range(30):
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'x', %s)", (i, i))
    _, latest = source.readable(0, 0.0, 0.0)
    pieces, start = [], 0
    while start < latest:  # epochs of a few changes each
        stop = source.plan_stop(0, start, latest, 1)  # about 1 KiB of WAL: a few changes
        pieces.append((start, stop, source.read(0, start, stop)))
        start = stop
    assert len(pieces) > 2 and sum(t.num_rows for *_, t in pieces) == 30
    assert pa.concat_tables([t for *_, t in pieces]).equals(source.read(0, 0, latest))
    middle = len(pieces) // 2
    for start, stop, _ in pieces[:middle]:
        source.checkpointed("cdc", {0: stop})  # checkpoints up to the middle epoch
    left = pa.concat_tables([t for *_, t in pieces[middle:]])
    with psycopg.connect(postgres_dsn) as conn:
        confirmed = parse_lsn(conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                                           "WHERE slot_name = %s", (slot,)).fetchone()[0])
    assert confirmed > 0 and all(parse_lsn(x) > confirmed for x in left.column("_lsn").to_pylist())
    assert source.read(0, pieces[middle][0], latest).equals(left), "a change after the checkpoint was released"
    source.checkpointed("cdc", {0: pieces[middle - 1][1]})  # again after a failure: nothing moves
    assert source.read(0, pieces[middle][0], latest).equals(left)


def test_retract_gives_old_rows_for_sums(postgres_dsn, orders, tmp_path):
    table, slot = orders
    with pytest.raises(SourceError, match=f"REPLICA IDENTITY FULL"):
        bound(PostgresCDCSource(postgres_dsn, [table], slot, updates="retract"), tmp_path)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    source = bound(PostgresCDCSource(postgres_dsn, [table], slot, updates="retract"), tmp_path / "2")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1, 'a', 10), (2, 'a', 5)")
        conn.execute(f"UPDATE {table} SET amount = 12, customer = 'b' WHERE id = 1")
        conn.execute(f"DELETE FROM {table} WHERE id = 2")
    rows = everything(source)
    signed = {}
    for r in rows:
        signed[r["customer"]] = signed.get(r["customer"], 0) + (-1 if r["_op"] == "delete" else 1) * r["amount"]
    assert signed == {"a": 0, "b": 12}


def test_bad_input_is_a_clear_error_at_start(postgres_dsn, orders, tmp_path):
    table, slot = orders
    with pytest.raises(SourceError, match="PostgreSQL table public.no_such_table does not exist"):
        bound(PostgresCDCSource(postgres_dsn, ["no_such_table"], slot), tmp_path)
    with pytest.raises(FlowDefinitionError, match="slot 'Bad-Slot' must be lower-case"):
        PostgresCDCSource(postgres_dsn, [table], "Bad-Slot")
    source = bound(PostgresCDCSource(postgres_dsn, [table], slot), tmp_path)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    with pytest.raises(SourceError, match=f"replication slot '{slot}' is gone"):
        bound(PostgresCDCSource(postgres_dsn, [table], slot), tmp_path)
    assert source._doc["tables"] == [f"public.{table}"]


def test_cli_lists_and_drops_slots(postgres_dsn, orders, tmp_path, capsys):
    from sluiceway.jobs.cli import main

    table, slot = orders
    bound(PostgresCDCSource(postgres_dsn, [table], slot), tmp_path)
    assert main(["cdc", "slots", "--dsn", postgres_dsn]) == 0
    assert slot in capsys.readouterr().out
    assert main(["cdc", "drop-slot", slot, "--dsn", postgres_dsn]) == 0
    assert main(["cdc", "drop-slot", slot, "--dsn", postgres_dsn]) == 1
    assert f"no replication slot '{slot}'" in capsys.readouterr().err
    assert main(["cdc", "slots"]) == 2
    assert capsys.readouterr().err.startswith("sluiceway: error: --dsn is required")
