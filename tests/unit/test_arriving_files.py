"""FileSource: files arriving in a folder, each read once, in the order the
job's ledger recorded them; unreadable files become dead letters."""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluiceway.checkpoint.storage import JobStorage
from sluiceway.cluster.epochs import plan_epoch
from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.testing import CollectSink, run_local
from sluiceway.operators.connectors.files import FileSource
from sluiceway.operators.errors import FlowDefinitionError


def write_json_lines(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def bound(source, storage):
    source.bind(storage, "files")
    return source


def read_all(source, now):
    out, dead = [], []
    for p in range(source.partition_count()):
        first, end = source.readable(p, now, 0.0)
        table, bad = source.read_batch(p, first, end)
        out += table.to_pylist()
        dead += [] if bad is None else bad.to_pylist()
    return out, dead


def test_each_file_is_read_once_and_a_new_source_resumes_from_the_ledger(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    storage = JobStorage(f"memory://files-{uuid.uuid4().hex}", "job")
    write_json_lines(inbox / "a.jsonl", [{"n": 1}, {"n": 2}])
    write_json_lines(inbox / "_b.jsonl", [{"n": 99}])  # still being written: ignored
    source = bound(FileSource(str(inbox), "json"), storage)
    assert source.readable(0, 100.0, 0.0) == (0, 1)
    assert source.read(0, 0, 1).column("n").to_pylist() == [1, 2]
    os.rename(inbox / "_b.jsonl", inbox / "b.jsonl")
    write_json_lines(inbox / "c.jsonl", [{"n": 3}])
    assert source.readable(0, 101.0, 0.0) == (0, 3)
    again = bound(FileSource(str(inbox), "json"), storage)  # a restarted job: same ledger, same order
    assert again.readable(0, 102.0, 0.0) == (0, 3)
    assert again.read(0, 1, 3).equals(source.read(0, 1, 3))
    assert sorted(again.read(0, 0, 3).column("n").to_pylist()) == [1, 2, 3, 99]


def test_a_corrupt_file_becomes_one_dead_letter_and_nothing_else_is_lost(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"id": [i * 10 + j for j in range(10)]}), inbox / f"part-{i}.parquet")
    (inbox / "part-9.parquet").write_bytes(b"PAR1 this is not parquet")
    flow, good, bad = Dataflow("files"), CollectSink(), CollectSink()
    stream = flow.source(FileSource(str(inbox), "parquet", partitions=2, bounded=True))
    stream.sink(good)
    stream.dead_letters().sink(bad)
    run_local(flow)
    assert sorted(r["id"] for r in good.rows()) == list(range(30))
    [letter] = bad.rows()
    assert letter["location"] == f"file://{inbox}/part-9.parquet" and letter["payload"] == b"PAR1 this is not parquet"
    assert letter["reason"].startswith("parquet file cannot be read: ArrowInvalid")


def test_files_are_read_in_the_first_files_schema_or_the_given_one(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "1.csv").write_text("user,amount\na,1\nb,2\n")
    os.utime(inbox / "1.csv", (1000, 1000))
    (inbox / "2.csv").write_text("user,amount\nc,2.5\n")  # a float where the first file had integers
    os.utime(inbox / "2.csv", (1001, 1001))
    (inbox / "3.csv").write_text("user,amount\nd,7\n")
    os.utime(inbox / "3.csv", (1002, 1002))
    storage = JobStorage(f"memory://files-{uuid.uuid4().hex}", "job")
    rows, dead = read_all(bound(FileSource(str(inbox), "csv"), storage), 2000.0)
    assert rows == [{"user": "a", "amount": 1}, {"user": "b", "amount": 2}, {"user": "d", "amount": 7}]
    assert [d["location"].rsplit("/", 1)[1] for d in dead] == ["2.csv"] and "ArrowInvalid" in dead[0]["reason"]
    schema = pa.schema([("user", pa.string()), ("amount", pa.float64())])
    other = JobStorage(f"memory://files-{uuid.uuid4().hex}", "job")
    rows, dead = read_all(bound(FileSource(str(inbox), "csv", schema=schema), other), 2000.0)
    assert [r["amount"] for r in rows] == [1.0, 2.0, 2.5, 7.0] and dead == []


def test_files_per_epoch_are_capped_and_young_files_wait(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i in range(5):
        write_json_lines(inbox / f"{i}.json", [{"i": i}])
        os.utime(inbox / f"{i}.json", (1000 + i, 1000 + i))
    source = bound(FileSource(str(inbox), "json", max_files_per_epoch=2, min_age_s=2.5),
                   JobStorage(f"memory://files-{uuid.uuid4().hex}", "job"))
    planned = plan_epoch(1, {"files": source}, {}, now=1005.0, started_at=0.0, max_records_per_epoch=1000)
    assert planned.ranges == {"files": {0: (0, 2)}} and planned.waiting == 1  # 3 old enough, 2 per epoch
    assert [r["i"] for r in source.read(0, 0, 3).to_pylist()] == [0, 1, 2]  # in modification order


def test_bad_folder_or_format_is_refused_when_the_flow_is_built(tmp_path):
    with pytest.raises(FlowDefinitionError, match="does not exist"):
        FileSource(str(tmp_path / "nope"), "csv")
    with pytest.raises(FlowDefinitionError, match="format must be one of parquet, csv, json"):
        FileSource(str(tmp_path), "xml")
