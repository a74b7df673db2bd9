"""A table sunk as a changelog keeps a database an exact copy: upserts and
deletes into a real PostgreSQL server and a real Delta table, epoch by
epoch, two tasks writing."""

import random

import psycopg
import pytest

from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.testing import run_local
from sluiceway.operators.sources import ListSource

pytestmark = pytest.mark.timeout(180)


def changelog(n: int, keys: int, seed: int) -> tuple[list[dict], dict]:
    rng, rows, table = random.Random(seed), [], {}
    for i in range(n):
        key, op = rng.randrange(keys), rng.choice(["insert", "update", "delete", None])
        rows.append({"id": key, "v": None if op == "delete" else f"v{i}", "_op": op})
        if op == "delete":
            table.pop(key, None)
        else:
            table[key] = f"v{i}"
    return rows, table


def test_a_table_sunk_into_postgres_and_delta_stays_an_exact_copy(postgres_dsn, tmp_path):
    import deltalake

    from sluiceway.operators.connectors.delta import DeltaSink
    from sluiceway.operators.connectors.postgres import PostgresSink

    rows, final = changelog(500, 60, seed=11)
    flow = Dataflow("table_copy")
    table = flow.source(ListSource(rows)).to_table("id", parallelism=2)
    table.sink(PostgresSink(postgres_dsn, "table_copy", mode="upsert", key=["id"], create_table=True))
    table.sink(DeltaSink(str(tmp_path / "delta"), mode="merge", key="id"))
    run_local(flow, max_records_per_epoch=37)
    with psycopg.connect(postgres_dsn) as conn:
        assert dict(conn.execute("SELECT id, v FROM table_copy").fetchall()) == final
        assert conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)
    delta = deltalake.DeltaTable(str(tmp_path / "delta")).to_pyarrow_table()
    assert delta.column_names == ["id", "v"]
    assert dict(zip(delta.column("id").to_pylist(), delta.column("v").to_pylist())) == final


def test_a_delete_waits_for_the_epoch_in_flight_that_wrote_its_key(postgres_dsn):
    """Epoch 2 is pre-committed while epoch 1 is still only prepared (as on
    Ray, epochs overlap): its delete must not miss epoch 1's row."""
    import threading

    import pyarrow as pa

    from sluiceway.operators.connectors.postgres import PostgresSink
    from sluiceway.operators.sinks import SinkContext

    sink = PostgresSink(postgres_dsn, "in_flight", mode="upsert", key=["id"], create_table=True)
    writer = sink.open(SinkContext("out", 0, 1, "unit", attempt="f1g0"))
    first = writer.precommit(1, pa.table({"id": [1, 2], "v": ["a", "b"], "_op": ["insert", "insert"]}))
    second = {}
    delete = threading.Thread(target=lambda: second.update(h=writer.precommit(
        2, pa.table({"id": [1], "v": [None], "_op": ["delete"]}))))
    delete.start()
    delete.join(1.0)
    assert delete.is_alive(), "the delete did not wait for the epoch that wrote its key"
    sink.commit(1, [first])
    delete.join(30)
    sink.commit(2, [second["h"]])
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT id, v FROM in_flight").fetchall() == [(2, "b")]
