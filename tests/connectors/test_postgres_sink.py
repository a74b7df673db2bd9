"""PostgresSink against a real PostgreSQL server: prepared transactions
invisible until committed, commits that may repeat, aborts of what never
completed; and a job on Ray through a task kill, exactly-once."""

import psycopg
import pyarrow as pa
import pytest

from sluiceway.operators.errors import SinkError
from sluiceway.operators.sinks import SinkContext


pytestmark = pytest.mark.timeout(180)


def _rows(dsn, sql):
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def _prepared(dsn):
    return sorted(r[0] for r in _rows(dsn, "SELECT gid FROM pg_prepared_xacts"))


def test_prepared_rows_appear_once_committed_and_aborts_roll_back(postgres_dsn):
    from sluiceway.operators.connectors.postgres import PostgresSink

    sink = PostgresSink(postgres_dsn, "t_upsert", mode="upsert", key=["k"], create_table=True)
    w0 = sink.open(SinkContext("out", 0, 2, "unit", attempt="f1g0"))
    w1 = sink.open(SinkContext("out", 1, 2, "unit", attempt="f1g0"))
    first = [w0.precommit(1, pa.table({"k": [1, 2, 1], "v": ["a", "b", "c"]})),
             w1.precommit(1, pa.table({"k": [3], "v": ["d"]}))]
    assert _rows(postgres_dsn, "SELECT count(*) FROM t_upsert") == [(0,)]  # prepared: invisible
    sink.commit(1, first)
    sink.commit(1, first)  # again, as after a failure: harmless
    assert _rows(postgres_dsn, "SELECT k, v FROM t_upsert ORDER BY k") == [(1, "c"), (2, "b"), (3, "d")]
    w0.precommit(2, pa.table({"k": [1], "v": ["never"]}))  # an epoch that never completed
    assert len(_prepared(postgres_dsn)) == 1
    sink.abort(1, SinkContext("out", -1, 0, "unit"))
    assert _prepared(postgres_dsn) == []
    assert _rows(postgres_dsn, "SELECT v FROM t_upsert WHERE k = 1") == [("c",)]
    with pytest.raises(SinkError, match="needs key"):
        PostgresSink(postgres_dsn, "x", mode="upsert")


@pytest.mark.usefixtures("ray_cluster")
def test_a_job_into_postgres_through_a_task_kill_is_exactly_once(postgres_dsn, tmp_path):
    from sluiceway.jobs import run
    from sluiceway.jobs.examples import clicks as example
    from sluiceway.jobs.testing import TaskKiller, compare_exactly_once
    from sluiceway.operators.connectors.postgres import PostgresSink

    rows = 6000
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=rows, rows_per_second=2000)
    flow.graph.steps["clicks_out"].sink = PostgresSink(postgres_dsn, "clicks", create_table=True)
    flow.graph.steps["totals_out"].sink = PostgresSink(postgres_dsn, "totals", mode="upsert", key=["user_id"],
                                                       create_table=True)
    killer = TaskKiller("by_user[1]", after_epoch=3)
    summary = run(flow, str(tmp_path / "ckpt"), trigger_s=0.5, checkpoint_every=2, on_event=killer)
    assert killer.killed.is_set() and summary["restarts"] == 1, summary["failures"]
    with psycopg.connect(postgres_dsn) as conn:
        clicks = conn.execute("SELECT event_id, user_id, cents, dollars FROM clicks").fetchall()
        totals = conn.execute("SELECT user_id, event_id_count, cents_sum FROM totals").fetchall()
    got = pa.table({c: [r[i] for r in clicks] for i, c in enumerate(["event_id", "user_id", "cents", "dollars"])})
    verdict = compare_exactly_once(got, example.expected_clicks(rows))
    assert verdict.exactly_once, verdict.line()
    got = pa.table({c: [r[i] for r in totals] for i, c in enumerate(["user_id", "event_id_count", "cents_sum"])})
    verdict = compare_exactly_once(got, example.expected_totals(rows))
    assert verdict.exactly_once, verdict.line()
    assert _prepared(postgres_dsn) == []


def test_a_server_without_prepared_transactions_is_named_in_one_line(start_postgres):
    from sluiceway.operators.connectors.postgres import PostgresSink

    with start_postgres(max_prepared_transactions=0) as server:
        dsn = server.dsn
        sink = PostgresSink(dsn, "t", create_table=True)
        with pytest.raises(SinkError, match="set max_prepared_transactions") as err:
            sink.open(SinkContext("out", 0, 1, "unit", attempt="f1g0")).precommit(1, pa.table({"x": [1]}))
        assert str(err.value).startswith("PostgreSQL refused PREPARE TRANSACTION (prepared transactions are disabled)")
        assert _rows(dsn, "SELECT count(*) FROM t") == [(0,)]


@pytest.mark.usefixtures("ray_cluster")
def test_an_unreachable_server_is_waited_for_and_the_job_resumes_exactly_once(start_postgres, tmp_path):
    """The server stops mid-run and comes back 4 s later: the sink waits
    (a storage_waiting event names the server) and the output is exact."""
    import threading

    from sluiceway.jobs import run
    from sluiceway.jobs.examples import clicks as example
    from sluiceway.jobs.testing import compare_exactly_once
    from sluiceway.operators.connectors.postgres import PostgresSink

    rows = 4000
    with start_postgres() as server:
        flow = example.build(output=str(tmp_path / "out"), rows_per_partition=rows, rows_per_second=400)
        flow.graph.steps["totals_out"].sink = PostgresSink(server.dsn, "totals", mode="upsert", key=["user_id"],
                                                           create_table=True)
        events, outage = [], threading.Event()

        def on_event(event):
            events.append(event)
            if event["type"] == "epoch" and event["epoch"] == 2 and not outage.is_set():
                outage.set()
                server.stop()
                threading.Timer(4.0, server.start).start()

        summary = run(flow, str(tmp_path / "ckpt"), trigger_s=0.5, checkpoint_every=2, on_event=on_event)
        assert outage.is_set() and summary["stopped"] == "idle"
        waits = [e for e in events if e["type"] == "storage_waiting"]
        assert waits, [(e["type"], e.get("epoch"), e.get("error")) for e in events]
        assert f"cannot connect to PostgreSQL at 127.0.0.1:{server.port}" in waits[0]["error"]
        with psycopg.connect(server.dsn) as conn:
            got = conn.execute("SELECT user_id, event_id_count, cents_sum FROM totals").fetchall()
        table = pa.table({c: [r[i] for r in got] for i, c in enumerate(["user_id", "event_id_count", "cents_sum"])})
        verdict = compare_exactly_once(table, example.expected_totals(rows))
        assert verdict.exactly_once, verdict.line()
        assert _prepared(server.dsn) == []


@pytest.mark.usefixtures("ray_cluster")
def test_a_table_that_does_not_fit_the_stream_stops_the_job_before_any_row(postgres_dsn, tmp_path):
    from sluiceway.cluster.errors import JobFailedError
    from sluiceway.jobs import run
    from sluiceway.jobs.examples import clicks as example
    from sluiceway.operators.connectors.postgres import PostgresSink

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS narrow")
        conn.execute("CREATE TABLE narrow (event_id bigint, user_id bigint)")
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=2000, rows_per_second=1e9)
    flow.graph.steps["clicks_out"].sink = PostgresSink(postgres_dsn, "narrow")
    with pytest.raises(JobFailedError) as err:
        run(flow, str(tmp_path / "ckpt"), trigger_s=0)
    first = str(err.value).splitlines()[0]
    assert "PostgreSQL table 'narrow' has no column(s) cents, dollars of the stream" in first, first
    assert _rows(postgres_dsn, "SELECT count(*) FROM narrow") == [(0,)]
    assert _prepared(postgres_dsn) == []


def test_a_commit_waiting_for_the_server_says_so_and_names_it(start_postgres):
    """The coordinator's side: COMMIT PREPARED retried while the server is
    down, heard through ``on_wait``; it commits once the server is back."""
    import threading

    from sluiceway.operators.connectors.postgres import PostgresSink

    with start_postgres() as server:
        sink = PostgresSink(server.dsn, "t", create_table=True, connect_deadline_s=60)
        handle = sink.open(SinkContext("out", 0, 1, "unit", attempt="f1g0")).precommit(1, pa.table({"x": [1, 2]}))
        heard = []
        sink.on_wait = lambda kind, message: heard.append((kind, message))
        server.stop()
        threading.Timer(2.0, server.start).start()
        sink.commit(1, [handle])
        assert [k for k, _ in heard] == ["waiting", "resumed"]
        assert heard[0][1].startswith(f"cannot connect to PostgreSQL at 127.0.0.1:{server.port} (database postgres)")
        assert _rows(server.dsn, "SELECT count(*) FROM t") == [(2,)]
        assert _prepared(server.dsn) == []
        import pickle

        assert pickle.loads(pickle.dumps(sink)).on_wait is None  # the listener never travels
