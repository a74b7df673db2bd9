"""Faults at each step of PostgreSQL's two-phase commit, injected on purpose:
a task dies after PREPARE TRANSACTION and before its acknowledgement; the
coordinator dies after the manifest and the commit log and before COMMIT
PREPARED; a run ends with prepared transactions open. After each, the table
equals the independent computation exactly and no sluiceway transaction is
left in ``pg_prepared_xacts``."""

from __future__ import annotations

import os

import psycopg
import pyarrow as pa
import pytest

from sluiceway.cluster.errors import JobFailedError
from sluiceway.jobs import run
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import compare_exactly_once
from sluiceway.operators.connectors.postgres import PostgresSink, _PostgresWriter
from sluiceway.operators.errors import FlowValidationError

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]

ROWS = 4000
COLUMNS = ["user_id", "event_id_count", "cents_sum"]


class FaultyWriter(_PostgresWriter):
    def precommit(self, epoch, table):
        handle = super().precommit(epoch, table)
        sink = self.sink
        if (sink.fault in ("task", "run") and epoch == sink.fault_epoch and self.context.subtask == 0
                and not os.path.exists(sink.flag)):
            open(sink.flag, "w").close()
            if sink.fault == "task":
                os._exit(1)  # prepared, never acknowledged
            if sink.fault == "run":
                raise FlowValidationError(self.context.step, "sink", "the run ends here, prepared transactions open")
        return handle


class FaultyPostgresSink(PostgresSink):
    """A PostgresSink that fails once, at ``fault`` ("task", "coordinator" or
    "run"), in epoch ``fault_epoch``; ``flag`` (a file) says it already did."""

    def __init__(self, dsn, table, fault, fault_epoch, flag):
        super().__init__(dsn, table, mode="upsert", key=["user_id"], create_table=True)
        self.fault, self.fault_epoch, self.flag = fault, fault_epoch, flag

    def open(self, context):
        return FaultyWriter(self, context)

    def commit(self, epoch, handles):
        if self.fault == "coordinator" and epoch == self.fault_epoch and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os._exit(1)  # the manifest and the commit log hold the epoch; COMMIT PREPARED never ran
        super().commit(epoch, handles)


def table_rows(dsn, table):
    with psycopg.connect(dsn) as conn:
        got = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {table}").fetchall()
    return pa.table({c: [r[i] for r in got] for i, c in enumerate(COLUMNS)})


def prepared(dsn):
    with psycopg.connect(dsn) as conn:
        return [g for (g,) in conn.execute("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'sluiceway:%'")]


def flow_with(sink, tmp_path):
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=ROWS, rows_per_second=1000)
    flow.graph.steps["totals_out"].sink = sink
    return flow


@pytest.mark.parametrize("fault", ["task", "coordinator", "run"])
def test_a_fault_in_two_phase_commit_leaves_the_table_exact(fault, postgres_dsn, tmp_path):
    table = f"totals_{fault}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    flag = str(tmp_path / "failed-once")
    sink = FaultyPostgresSink(postgres_dsn, table, fault, 4, flag)
    ckpt = str(tmp_path / "ckpt")
    options = dict(trigger_s=0.5, checkpoint_every=2, lease_ttl_s=5.0)
    if fault == "task":
        summary = run(flow_with(sink, tmp_path), ckpt, **options)
        assert summary["restarts"] == 1, summary["failures"]
    else:
        with pytest.raises(Exception) as err:  # the first run ends in the middle of the protocol
            run(flow_with(sink, tmp_path), ckpt, **options)
        if fault == "run":
            assert isinstance(err.value, JobFailedError)
            assert prepared(postgres_dsn), "the failed run should leave its prepared transactions behind"
        summary = run(flow_with(sink, tmp_path), ckpt, **options)  # restarted from storage
    assert os.path.exists(flag) and summary["stopped"] == "idle"
    verdict = compare_exactly_once(table_rows(postgres_dsn, table), example.expected_totals(ROWS))
    assert verdict.exactly_once, verdict.line()
    assert prepared(postgres_dsn) == []
