"""Sinks that know their owner, against the real systems: a sink records
the job, job id and sink step that write it when a run starts
(``Sink.claim``), and refuses, in one line naming the owner and the fix,
another job, another sink step of the job, or the job under other
checkpoints, before anything is written or deleted. Every case runs on each
sink that keeps bookkeeping between runs."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pyarrow as pa
import pytest

from sluiceway.operators.connectors.postgres import server_name
from sluiceway.operators.errors import FlowDefinitionError, SinkOwnershipError
from sluiceway.operators.sinks import (
    DeltaSink,
    ParquetSink,
    PostgresSink,
    RedisSink,
    SinkContext,
    SinkOwner,
    check_sink_locations,
    read_committed,
)

pytestmark = pytest.mark.timeout(120)

A = SinkOwner("a", "id-a", "out", "file:///ckpt/a", fresh=True)
A_AGAIN = SinkOwner("a", "id-a", "out", "file:///ckpt/a", fresh=False)
A_OTHER_STEP = SinkOwner("a", "id-a", "out2", "file:///ckpt/a", fresh=False)
A_NEW_HISTORY = SinkOwner("a", "id-a2", "out", "file:///ckpt/a2", fresh=True)
B = SinkOwner("b", "id-b", "out", "file:///ckpt/b", fresh=True)


class Case:
    """A sink, where its messages say it is, and what readers see of it."""

    def __init__(self, name, sink, where, noun, visible):
        self.name, self.sink, self.where, self.noun, self.visible = name, sink, where, noun, visible
        self.start_over = f"point the sink at a new {noun} (or delete this one)"
        if name == "redis":
            self.start_over = (f"delete the keys {sink.prefix}*, sluiceway:sink:a:out:* and "
                               f"sluiceway:owner:{sink.prefix}")

    def write(self, owner: SinkOwner, epoch: int, keys: list[int]) -> None:
        """One epoch of ``owner``'s, pre-committed and committed (by one subtask)."""
        writer = self.sink.open(SinkContext(owner.step, 0, 1, owner.job, f"f{epoch}g0"))
        handle = writer.precommit(epoch, pa.table({"k": pa.array(keys, pa.int64())}))
        self.sink.commit(epoch, [handle])


@pytest.fixture(params=["parquet", "parquet-s3", "delta", "postgres", "redis"])
def case(request, tmp_path):
    name = request.param
    if name.startswith("parquet") or name == "delta":
        root = request.getfixturevalue("s3_bucket") + "/out" if name.endswith("-s3") else str(tmp_path / "out")
        address = root if name.endswith("-s3") else f"file://{root}"
        if name == "delta":
            return Case(name, DeltaSink(root), f"DeltaSink table {address}", "table",
                        lambda: sorted(r["k"] for r in _delta_rows(root)))
        return Case(name, ParquetSink(root), f"ParquetSink folder {address}", "folder",
                    lambda: sorted(read_committed(root).to_pydict().get("k", [])))
    if name == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        table = f"owned_{uuid.uuid4().hex[:8]}"
        return Case(name, PostgresSink(dsn, table, create_table=True),
                    f"PostgresSink table 'public.{table}' in {server_name(dsn)}", "table",
                    lambda: _postgres_keys(dsn, table))
    import redis

    url = request.getfixturevalue("redis_server").url
    prefix = f"owned_{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(url)
    port = client.connection_pool.connection_kwargs["port"]
    for marker in [*client.scan_iter("sluiceway:sink:a:*"), *client.scan_iter("sluiceway:sink:b:*")]:
        client.delete(marker)  # the markers of earlier tests' jobs 'a' and 'b' (they are per job and step)
    return Case(name, RedisSink(url, key="k", prefix=prefix, mode="set"),
                f"RedisSink key prefix {prefix!r} in Redis at 127.0.0.1:{port}",
                "key prefix", lambda: sorted(int(k.decode()[len(prefix):]) for k in client.scan_iter(f"{prefix}*")))


def _delta_rows(url):
    import deltalake

    try:
        return deltalake.DeltaTable(url).to_pyarrow_table().to_pylist()
    except deltalake.exceptions.TableNotFoundError:
        return []


def _postgres_keys(dsn, table):
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            return []
        return sorted(r[0] for r in conn.execute(f"SELECT k FROM {table}"))


def refusal(sink, owner) -> str:
    with pytest.raises(SinkOwnershipError) as err:
        sink.claim(owner)
    return str(err.value).splitlines()[0]


def test_the_job_that_owns_a_sink_claims_it_again(case):
    case.sink.claim(A)
    case.write(A, 1, [1, 2])
    case.sink.claim(A_AGAIN)  # the job restarted, or resumed from its checkpoints
    case.sink.claim(A)
    case.write(A, 2, [3])
    assert case.visible() == [1, 2, 3]


def test_another_job_is_refused_before_it_writes(case):
    case.sink.claim(A)
    case.write(A, 1, [1, 2])
    assert refusal(case.sink, B) == (f"{case.where} belongs to job 'a' (sink step 'out'); job 'b' cannot write "
                                     f"there: give this sink its own {case.noun}")
    assert refusal(case.sink, SinkOwner("b", "id-b", "out", "file:///ckpt/b", fresh=False)).startswith(
        f"{case.where} belongs to job 'a'")
    case.sink.claim(A_AGAIN)  # the owner is still the owner
    assert case.visible() == [1, 2]


def test_a_second_sink_step_of_the_job_is_refused(case):
    case.sink.claim(A)
    assert refusal(case.sink, A_OTHER_STEP).startswith(
        f"{case.where} belongs to sink step 'out' of job 'a'; its sink step 'out2' cannot write there too: "
        f"give each sink its own {case.noun}")


def test_a_sink_step_declared_renamed_takes_its_folder_over(tmp_path):
    sink = ParquetSink(str(tmp_path / "out"))
    sink.claim(A)
    assert refusal(sink, A_OTHER_STEP).endswith("(if 'out2' is 'out' renamed, declare flow.renamed('out', 'out2'))")
    sink.claim(SinkOwner("a", "id-a", "out2", "file:///ckpt/a", fresh=False, previous=("out",)))
    sink.claim(A_OTHER_STEP)  # the record names the new step now
    assert refusal(sink, A).startswith(f"ParquetSink folder {sink.location()} belongs to sink step 'out2'")


def test_the_job_under_other_checkpoints_is_refused(case):
    """The job's checkpoint dir was deleted (or it runs from another): its
    old output would be taken for the new run's, or written again."""
    case.sink.claim(A)
    case.write(A, 1, [1, 2])
    assert refusal(case.sink, A_NEW_HISTORY) == (
        f"{case.where} holds output of job 'a' (sink step 'out') committed under other checkpoints "
        f"(file:///ckpt/a, job id id-a), not the ones at file:///ckpt/a2 (job id id-a2); running on would write "
        f"it again: restore those checkpoints, or {case.start_over} to start over")
    assert case.visible() == [1, 2]


def test_output_written_before_owner_records_is_adopted_by_its_job_and_refused_to_a_new_history(case):
    case.write(A, 1, [1, 2])  # committed by a release that recorded no owner
    case.write(A, 2, [3])
    if case.name == "postgres":  # rows carry no epochs: nothing tells whose they are, so the table is claimed
        case.sink.claim(A_NEW_HISTORY)
        assert case.visible() == [1, 2, 3]
        return
    output = {"delta": "epochs through 2 committed by job 'a' (sink step 'out')",
              "redis": "the markers of job 'a' (sink step 'out') through epoch 2"}.get(case.name,
                                                                                        "2 committed epochs (1 to 2)")
    assert refusal(case.sink, A_NEW_HISTORY) == (
        f"{case.where} already holds {output}, and job 'a' starts with no checkpoints (file:///ckpt/a2 is new); "
        f"running would write that output again: restore the checkpoints that wrote it, or {case.start_over} "
        "to start over")
    case.sink.claim(A_AGAIN)  # the job that wrote it, with its checkpoints: adopted, and recorded
    assert refusal(case.sink, A_NEW_HISTORY).startswith(f"{case.where} holds output of job 'a'")
    case.write(A, 3, [4])
    assert case.visible() == [1, 2, 3, 4]


def test_of_two_jobs_claiming_at_once_one_wins(case):
    owners = [SinkOwner(f"job{i}", f"id{i}", "out", "file:///ckpt", fresh=True) for i in range(2)]
    results, start = [], threading.Barrier(2)

    def claim(owner):
        start.wait()
        try:
            case.sink.claim(owner)
            results.append("claimed")
        except SinkOwnershipError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=claim, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("claimed") == 1, results
    loser = next(r for r in results if r != "claimed")
    assert loser.startswith(f"{case.where} belongs to job 'job"), loser


def test_a_postgres_owner_record_of_a_dropped_table_is_replaced(postgres_dsn):
    table = f"dropped_{uuid.uuid4().hex[:8]}"
    sink = PostgresSink(postgres_dsn, table, create_table=True)
    sink.claim(A)
    writer = sink.open(SinkContext("out", 0, 1, "a", "f1g0"))
    sink.commit(1, [writer.precommit(1, pa.table({"k": [1]}))])
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"CREATE TABLE {table} (k bigint)")  # made again by hand: nothing of job a's is left in it
    sink.claim(B)
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT job, job_id, step FROM sluiceway_sink_owners WHERE target = %s",
                            (f"public.{table}",)).fetchall() == [("b", "id-b", "out")]


def test_two_sink_steps_of_one_flow_on_one_place_are_refused_before_the_run(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(FlowDefinitionError) as err:
        check_sink_locations({"clicks_out": ParquetSink(out), "totals_out": ParquetSink(out + "/")})
    assert str(err.value) == (f"sink steps 'clicks_out' (ParquetSink) and 'totals_out' (ParquetSink) both write "
                              f"file://{out}; give each sink its own folder")
    with pytest.raises(FlowDefinitionError) as err:
        check_sink_locations({"a": DeltaSink(out), "b": ParquetSink(out + "/clicks")})
    assert str(err.value) == (f"sink steps 'a' (DeltaSink) and 'b' (ParquetSink) write file://{out} and "
                              f"file://{out}/clicks, one folder inside the other; give each sink a folder of its "
                              "own, outside the other's")
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=shop"
    with pytest.raises(FlowDefinitionError) as err:
        check_sink_locations({"a": PostgresSink(dsn, "totals"), "b": PostgresSink(dsn + " password=x", "totals")})
    assert str(err.value) == ("sink steps 'a' (PostgresSink) and 'b' (PostgresSink) both write "
                              "postgresql://127.0.0.1:5432/shop/totals; give each sink its own table")
    check_sink_locations({"a": ParquetSink(out + "/clicks"), "b": ParquetSink(out + "/clicks2"),
                          "c": PostgresSink(dsn, "totals"), "d": PostgresSink(dsn, "clicks"),
                          "e": RedisSink("redis://127.0.0.1:6379", key="k", prefix="x:"),
                          "f": RedisSink("redis://127.0.0.1:6379", key="k", prefix="y:")})


def test_a_refusal_crosses_processes_whole(tmp_path):
    import pickle

    sink = ParquetSink(str(tmp_path / "out"))
    sink.claim(A)
    with pytest.raises(SinkOwnershipError) as err:
        sink.claim(B)
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is SinkOwnershipError and str(again) == str(err.value)
