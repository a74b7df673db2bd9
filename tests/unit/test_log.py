"""The durable log: producers, retention, compaction, readers, and the log
source in a flow (in process; on Ray in tests/integration)."""

from __future__ import annotations

import multiprocessing
import os

import pyarrow as pa
import pytest

from sluiceway.cluster.epochs import plan_epoch
from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.testing import CollectSink, run_local
from sluiceway.operators.connectors.log import Log, LogSource, TopicConfig
from sluiceway.operators.errors import FlowDefinitionError, SourceError


def rows(n, start=0, users=7):
    return pa.table({"user": [f"u{(start + i) % users}" for i in range(n)], "n": list(range(start, start + n))})


def test_offsets_are_gapless_and_reads_replay_exactly(tmp_path):
    topic = Log(str(tmp_path)).create_topic(TopicConfig("t", partitions=1))
    assert topic.append(rows(5)) == {0: (0, 5)}
    assert topic.append(rows(3, start=5)) == {0: (5, 8)}
    assert topic.offsets(0) == (0, 8)
    assert topic.read(0, 3, 7).column("n").to_pylist() == [3, 4, 5, 6]  # across two segments
    assert topic.read(0, 3, 7).equals(topic.read(0, 3, 7))


def test_keyed_appends_put_each_key_in_one_partition(tmp_path):
    topic = Log(str(tmp_path)).create_topic(TopicConfig("t", partitions=3, key="user"))
    topic.append(rows(100))
    topic.append(rows(100, start=100))
    homes = {}
    for p in range(3):
        for user in topic.read(p, *topic.offsets(p)).column("user").to_pylist():
            assert homes.setdefault(user, p) == p
    assert sum(topic.offsets(p)[1] for p in range(3)) == 200


def _produce(url, worker, batches):
    topic = Log(url).topic("t")
    for b in range(batches):
        topic.append(pa.table({"producer": [worker] * 10, "seq": list(range(b * 10, b * 10 + 10))}))


def test_concurrent_producers_lose_nothing_and_never_share_an_offset(tmp_path):
    url = str(tmp_path)
    Log(url).create_topic(TopicConfig("t", partitions=2))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_produce, args=(url, w, 30)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    topic = Log(url).topic("t")
    seen = []
    for p in range(2):
        first, end = topic.offsets(p)
        segments = topic.segments(p)
        assert first == 0 and [s.first for s in segments[1:]] == [s.end for s in segments[:-1]]  # gapless
        seen += list(zip(*topic.read(p, first, end).to_pydict().values()))
    assert len(seen) == 4 * 30 * 10 == len(set(seen))


def test_retention_by_size_and_age_deletes_oldest_segments_but_never_the_newest(tmp_path):
    topic = Log(str(tmp_path)).create_topic(TopicConfig("t", partitions=1, retention_bytes=3000))
    for b in range(10):
        topic.append(rows(10, start=b * 10), now=1000.0 + b)
    first, end = topic.offsets(0)
    assert end == 100 and 0 < first < 100 and sum(s.size for s in topic.segments(0)) <= 3000
    aged = Log(str(tmp_path)).create_topic(TopicConfig("aged", partitions=1, retention_age_s=60))
    for b in range(3):
        aged.append(rows(10, start=b * 10), now=1000.0 + b * 50)  # at 1100, the first is 100 s old
    assert aged.offsets(0) == (10, 30)
    assert aged.apply_retention(0, now=10_000.0) and aged.offsets(0) == (20, 30)  # the newest stays


def test_compaction_keeps_the_latest_per_key_and_drops_old_tombstones(tmp_path):
    topic = Log(str(tmp_path)).create_topic(TopicConfig("kv", partitions=1, key="k", tombstone_delay_s=100))
    topic.append(pa.table({"k": ["a", "b", "a"], "v": [1, 2, 3]}), now=1000.0)
    topic.append(pa.table({"k": ["b", "c"], "v": [None, 5]}), now=1010.0)  # b's tombstone
    topic.append(pa.table({"k": ["c"], "v": [6]}), now=1020.0)  # the newest segment: untouched
    report = topic.compact(now=1050.0)
    assert report[0]["records_before"] == 5 and report[0]["records_after"] == 3
    assert topic.offsets(0) == (0, 6)
    assert topic.read(0, 0, 6).to_pylist() == [{"k": "a", "v": 3}, {"k": "b", "v": None}, {"k": "c", "v": 5},
                                              {"k": "c", "v": 6}]
    assert topic.read(0, 1, 3).to_pylist() == [{"k": "a", "v": 3}]  # offsets keep their meaning
    topic.append(pa.table({"k": ["d"], "v": [7]}), now=1200.0)
    topic.compact(now=1200.0)  # the tombstone is 190 s old now: gone, and b with it
    assert topic.read(0, 0, 7).column("k").to_pylist() == ["a", "c", "d"]
    assert topic.append(pa.table({"k": ["e"], "v": [8]})) == {0: (7, 8)}  # appends go on after compaction


def test_records_that_do_not_fit_the_topic_are_refused_with_the_columns_named(tmp_path):
    topic = Log(str(tmp_path)).create_topic(TopicConfig("t", partitions=1))
    topic.append(rows(2))
    with pytest.raises(SourceError, match=r"missing columns \['n'\]; unknown columns \['m'\]"):
        topic.append(pa.table({"user": ["x"], "m": [1]}))
    with pytest.raises(SourceError, match="column types n: string"):
        topic.append(pa.table({"user": ["x"], "n": ["seven"]}))
    assert topic.append(pa.table({"n": pa.array([9], pa.int32()), "user": ["x"]})) == {0: (2, 3)}  # cast, reordered
    with pytest.raises(FlowDefinitionError, match="already exists"):
        Log(str(tmp_path)).create_topic(TopicConfig("t", partitions=4))


def test_an_unknown_topic_names_the_known_ones_and_how_to_create_it(tmp_path):
    Log(str(tmp_path)).create_topic(TopicConfig("clicks", partitions=1))
    with pytest.raises(FlowDefinitionError) as err:
        LogSource("clickz", str(tmp_path))
    assert "topic 'clickz' does not exist" in str(err.value) and "topics: clicks" in str(err.value)
    assert "sluiceway log create clickz --partitions N" in str(err.value)


def test_a_corrupt_segment_becomes_dead_letters_and_the_rest_is_read(tmp_path):
    topic = Log(str(tmp_path)).create_topic(TopicConfig("t", partitions=1))
    for b in range(3):
        topic.append(rows(4, start=b * 4))
    middle = topic.segments(0)[1].path
    with open(middle, "r+b") as f:  # its footer overwritten
        f.seek(-40, os.SEEK_END)
        f.write(b"\xff" * 40)
    fresh = Log(str(tmp_path)).topic("t")
    table, dead = fresh.read_with_dead_letters(0, 0, 12)
    assert table.column("n").to_pylist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert dead.num_rows == 1
    letter = dead.to_pylist()[0]
    assert (letter["start_offset"], letter["stop_offset"], letter["location"]) == (4, 8, "file://" + middle)
    assert letter["source"] == "log:t" and "cannot be decoded" in letter["reason"]


def test_log_on_a_non_local_filesystem(tmp_path):
    url = "memory://sluiceway-log-test"
    topic = Log(url).create_topic(TopicConfig("m", partitions=2, key="user"))
    topic.append(rows(20))
    topic.append(rows(20, start=20))
    again = Log(url).topic("m")
    assert sum(len(again.read(p, *again.offsets(p))) for p in range(2)) == 40


def flow_reading(name, url, out, **options):
    flow = Dataflow(name)
    stream = flow.source(LogSource("t", url, bounded=True, **options))
    stream.sink(out)
    return flow


def test_two_jobs_read_one_topic_independently_and_record_their_lag(tmp_path):
    url = str(tmp_path)
    topic = Log(url).create_topic(TopicConfig("t", partitions=2))
    topic.append(rows(50))
    a, b = CollectSink(), CollectSink()
    run_local(flow_reading("job_a", url, a))
    topic.append(rows(10, start=50))
    run_local(flow_reading("job_b", url, b))
    assert len(a.rows()) == 50 and len(b.rows()) == 60
    source = LogSource("t", url)
    source.checkpointed("job_a", {0: 25, 1: 25})
    lag = topic.describe()["consumers"]["job_a"]
    assert lag["total_lag"] == 10 and lag["offsets"] == {0: 25, 1: 25}


def test_a_job_behind_retention_fails_clearly_or_skips_and_records_the_gap(tmp_path):
    url = str(tmp_path)
    topic = Log(url).create_topic(TopicConfig("t", partitions=1, retention_bytes=2500))
    for b in range(10):
        topic.append(rows(10, start=b * 10))
    first = topic.offsets(0)[0]
    assert first > 0
    strict = LogSource("t", url)
    with pytest.raises(SourceError) as err:
        plan_epoch(5, {"s": strict}, {"s": {0: 3}}, now=0, started_at=0, max_records_per_epoch=1000)
    assert f"next offset 3 was deleted by retention (the oldest retained offset is {first}" in str(err.value)
    assert "on_retention_gap='skip'" in str(err.value)
    lenient = LogSource("t", url, on_retention_gap="skip")
    planned = plan_epoch(5, {"s": lenient}, {"s": {0: 3}}, now=0, started_at=0, max_records_per_epoch=1000)
    assert planned.gaps == {"s": {0: (3, first)}} and planned.ranges == {"s": {0: (first, 100)}}
    with pytest.raises(SourceError, match="deleted by retention before this job read them"):
        strict.read(0, 0, 5)


def test_the_log_source_delivers_dead_letters_to_their_stream(tmp_path):
    url = str(tmp_path)
    topic = Log(url).create_topic(TopicConfig("t", partitions=1))
    topic.append(rows(4))
    topic.append(rows(4, start=4))
    with open(topic.segments(0)[0].path, "r+b") as f:
        f.truncate(30)
    good, bad = CollectSink(), CollectSink()
    flow = Dataflow("dead")
    stream = flow.source(LogSource("t", url, bounded=True))
    stream.sink(good)
    stream.dead_letters().sink(bad)
    run_local(flow)
    assert [r["n"] for r in good.rows()] == [4, 5, 6, 7]
    assert [(r["start_offset"], r["stop_offset"]) for r in bad.rows()] == [(0, 4)]
    with pytest.raises(FlowDefinitionError, match="call it on the stream flow.source"):
        stream.map(lambda r: r).dead_letters()


def test_log_cli_round_trip(tmp_path, capsys, monkeypatch):
    from sluiceway.jobs.cli import main

    monkeypatch.setenv("SLUICEWAY_LOG_DIR", str(tmp_path / "log"))
    data = tmp_path / "clicks.jsonl"
    data.write_text("".join(f'{{"user": "u{i % 10}", "n": {i}}}\n' for i in range(30)))
    assert main(["log", "create", "clicks", "--partitions", "2", "--key", "user"]) == 0
    assert main(["log", "produce", "clicks", str(data), "--batch-rows", "7"]) == 0
    assert main(["log", "describe", "clicks"]) == 0
    out = capsys.readouterr().out
    assert "2 partition(s), key user" in out and "columns: user: string, n: int64" in out
    assert main(["log", "tail", "clicks", "-n", "1"]) == 0
    tail = capsys.readouterr().out.splitlines()
    assert len(tail) == 2 and all('"offset"' in line for line in tail)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "u1", "n": 100}\n{"user": \n')
    assert main(["log", "produce", "clicks", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sluiceway: error: line 2 of {bad} is not JSON")
    topic = Log(str(tmp_path / "log")).topic("clicks")
    assert sum(topic.offsets(p)[1] for p in range(2)) == 31  # the good line before it, nothing lost or doubled
    assert main(["log", "compact", "clicks"]) == 0
    with pytest.raises(SystemExit) as usage:
        main(["log", "create", "x", "--partitions", "0"])
    assert usage.value.code == 2
    assert "0 must be 1 or more" in capsys.readouterr().err
    assert os.path.isdir(tmp_path / "log" / "clicks" / "partitions" / "1")


def test_a_tombstone_has_every_column_but_the_key_null(tmp_path):
    topic = Log(str(tmp_path)).create_topic(TopicConfig("wide", partitions=1, key="k", tombstone_delay_s=0))
    topic.append(pa.table({"k": ["a", "b"], "v": [1, 2], "w": ["x", "y"]}), now=1000.0)
    topic.append(pa.table({"k": ["a", "b"], "v": [None, None], "w": [None, "z"]}), now=1001.0)  # a deleted
    topic.append(pa.table({"k": ["c"], "v": [3], "w": ["q"]}), now=1002.0)
    topic.compact(now=1003.0)
    assert topic.read(0, 0, 5).to_pylist() == [{"k": "b", "v": None, "w": "z"}, {"k": "c", "v": 3, "w": "q"}]
