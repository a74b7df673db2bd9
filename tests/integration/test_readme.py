"""The README's example job runs as written and commits every kept row once."""

import os
import pathlib
import re

import pytest

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_job_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"## A job\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    summary, rows = namespace["summary"], namespace["rows"]
    assert summary["stopped"] == "idle" and summary["rows_in"] == 20_000
    kept = [i for p in range(2) for i in range(10_000) if i % 97 >= 5]
    assert rows.num_rows == len(kept)


def test_readme_window_example_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"## Event time and windows\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    summary, windows = namespace["summary"], namespace["windows"]
    assert summary["stopped"] == "idle" and summary["late"] == 0
    assert sum(windows["count_all"].to_pylist()) == 200_000 * 46 // 50  # every bid in exactly one window
    assert windows.column_names == ["auction", "window_start", "window_end", "count_all", "price_max"]


def test_readme_tables_and_joins_example_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"## Tables and joins\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["summary"]["stopped"] == "idle"
    rows = sorted(namespace["paid_orders"].to_pylist(), key=lambda r: r["order"])
    assert [r["order"] for r in rows] == [0, 1, 2, 3, 4, 5]  # the repeats of 0 and 1 dropped
    assert [r["name"] for r in rows] == ["ann", "bo", None, "ann", "bo", None]  # bob's update, same epoch
    assert [r["paid_at"] is not None for r in rows] == [True, False, True, False, True, False]
    changelog = namespace["read_committed"]("out/customers").to_pylist()
    assert sorted((r["id"], r["name"], r["_op"]) for r in changelog) == [(1, "ann", "insert"), (2, "bo", "insert")]


def test_readme_example_sink_commits_each_epoch_once(tmp_path):
    from sluiceway.jobs import Dataflow
    from sluiceway.jobs.testing import run_local
    from sluiceway.operators.sinks import SinkContext
    from sluiceway.operators.sources import ListSource

    code = re.search(r"## Writing a sink\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    sink = namespace["JsonLinesSink"](str(tmp_path / "out"))
    flow = Dataflow("sinks")
    flow.source(ListSource([{"n": i} for i in range(10)], partitions=2)).sink(sink)
    run_local(flow, max_records_per_epoch=4)
    import json as _json

    def committed():
        files = sorted(f for f in os.listdir(tmp_path / "out") if f.startswith("epoch-"))
        return [_json.loads(line)["n"] for f in files for line in open(tmp_path / "out" / f)]

    assert sorted(committed()) == list(range(10))
    first = sorted(f for f in os.listdir(tmp_path / "out") if f.startswith("epoch-"))[0]
    epoch = int(first[len("epoch-"):-len(".jsonl")])
    sink.commit(epoch, [])  # a second commit of a committed epoch changes nothing
    assert sorted(committed()) == list(range(10))
    writer = sink.open(SinkContext("out", 0, 1, "sinks", attempt="f9g0"))
    import pyarrow as pa

    writer.precommit(99, pa.table({"n": [100]}))
    sink.abort(50, SinkContext("out", -1, 0, "sinks"))
    assert not any(f.startswith("pending-000099") for f in os.listdir(tmp_path / "out"))
    assert sorted(committed()) == list(range(10))
