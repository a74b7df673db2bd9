"""The contract every sink keeps, against the real systems: an epoch
committed twice is there once; an aborted pre-commit leaves nothing
visible; handles are JSON data (they go through a JSON round trip here, as
they do through the commit log)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pyarrow as pa
import pytest

from sluiceway.operators.sinks import DeltaSink, ParquetSink, PostgresSink, SinkContext, read_committed


def batch(keys, value):
    return pa.table({"k": pa.array(keys, pa.int64()), "v": pa.array([value] * len(keys), pa.string())})


def delta_rows(url):
    import deltalake

    try:
        return deltalake.DeltaTable(url).to_pyarrow_table().to_pylist()
    except deltalake.exceptions.TableNotFoundError:
        return []


def postgres_rows(dsn, table):
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            return []
        return [{"k": k, "v": v} for k, v in conn.execute(f"SELECT k, v FROM {table}").fetchall()]


def prepared(dsn):
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'sluiceway:%'")]


CASES = ["parquet", "parquet-s3", "delta", "delta-s3", "delta-merge", "postgres", "postgres-upsert"]
UPSERTS = {"delta-merge", "postgres-upsert"}


@pytest.fixture(params=CASES)
def sink_case(request, tmp_path):
    """``(name, sink, visible)``: a fresh sink and a function listing what readers see."""
    name = request.param
    if name.endswith("-s3"):
        root = request.getfixturevalue("s3_bucket") + "/out"
    else:
        root = str(tmp_path / "out")
    if name.startswith("parquet"):
        sink = ParquetSink(root)
        return name, sink, lambda: read_committed(root).to_pylist()
    if name.startswith("delta"):
        sink = DeltaSink(root, mode="merge", key=["k"]) if name == "delta-merge" else DeltaSink(root)
        return name, sink, lambda: delta_rows(root)
    dsn = request.getfixturevalue("postgres_dsn")
    table = f"contract_{uuid.uuid4().hex[:8]}"
    if name == "postgres-upsert":
        sink = PostgresSink(dsn, table, mode="upsert", key=["k"], create_table=True)
    else:
        sink = PostgresSink(dsn, table, create_table=True)
    return name, sink, lambda: postgres_rows(dsn, table)


def context(subtask: int, attempt: str = "f1g0") -> SinkContext:
    return SinkContext("out", subtask, 2, "contract", attempt)


def ordered(rows):
    return sorted(rows, key=lambda r: (r["k"], r["v"]))


def test_sink_contract(sink_case):
    name, sink, visible = sink_case
    writers = [sink.open(context(0)), sink.open(context(1))]
    handles = [writers[0].precommit(1, batch([1, 2], "a")), writers[1].precommit(1, batch([3], "a"))]
    assert visible() == []  # pre-committed: durable, not visible
    handles = json.loads(json.dumps(handles))  # handles are data, as the commit log keeps them
    sink.commit(1, handles)
    sink.commit(1, handles)  # a replayed commit
    expected = [{"k": 1, "v": "a"}, {"k": 2, "v": "a"}, {"k": 3, "v": "a"}]
    assert ordered(visible()) == expected

    writers[0].precommit(2, batch([1, 4], "lost"))  # epoch 2 never completes ...
    sink.abort(1, SinkContext("out", -1, 0, "contract", "f1"))  # ... and recovery aborts it
    assert ordered(visible()) == expected

    retry = [sink.open(context(0, "f2g0")), sink.open(context(1, "f2g0"))]  # the replay of epoch 2
    handles = [retry[0].precommit(2, batch([1, 4], "b")), retry[1].precommit(2, None)]
    sink.commit(2, json.loads(json.dumps(handles)))
    sink.commit(2, json.loads(json.dumps(handles)))
    if name in UPSERTS:
        expected = [{"k": 1, "v": "b"}, {"k": 2, "v": "a"}, {"k": 3, "v": "a"}, {"k": 4, "v": "b"}]
    else:
        expected = ordered(expected + [{"k": 1, "v": "b"}, {"k": 4, "v": "b"}])
    assert ordered(visible()) == expected
    if name.startswith("postgres"):
        assert prepared(sink.dsn) == []
