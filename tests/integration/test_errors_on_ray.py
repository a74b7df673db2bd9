"""Every failure a user can meet gives a first line that names its cause."""

import json
import re

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sluiceway.checkpoint import JobStorage
from sluiceway.cluster.restart import RestartPolicy
from sluiceway.jobs import Dataflow, JobFailedError, run
from sluiceway.jobs.cli import main as cli
from sluiceway.jobs.examples import clicks as example
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.sources import GeneratorSource

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


def numbers(partition, start, stop):
    return pa.record_batch({"n": pa.array(range(start, stop), pa.int64())})


def explode_at_500(batch):
    if pc.any(pc.greater_equal(batch["n"], 500)).as_py():
        raise ValueError("bad record at offset 500")
    return batch


def exploding_flow(out):
    flow = Dataflow("explodes")
    flow.source(GeneratorSource(numbers, 1, 1e9, 1000)).map_batches(explode_at_500, name="parse").sink(
        ParquetSink(str(out))
    )
    return flow


def test_deterministic_user_error_fails_after_one_replay_with_the_user_traceback(tmp_path):
    events = []
    with pytest.raises(JobFailedError) as info:
        run(exploding_flow(tmp_path / "out"), str(tmp_path / "ckpt"), trigger_s=0.05, max_records_per_epoch=100,
            checkpoint_every=2, restart_policy=RestartPolicy(max_failures=100, initial_delay_s=0),
            on_event=events.append)
    lines = str(info.value).splitlines()
    assert re.fullmatch(r"step 'parse' \(map_batches\) raised ValueError: bad record at offset 500 "
                        r"\(task source-[0-9a-f]{6}\[0\], epoch 6\)", lines[0]), lines[0]
    assert "failed the same way on epoch 6 after a replay: the error is deterministic" in lines[1]
    assert "committed output stays as of epoch 5" in lines[1]
    assert lines[2] == "Traceback of the user's code (most recent call last):"
    assert any("in explode_at_500" in line for line in lines[3:])
    assert lines[-1] == "ValueError: bad record at offset 500"
    assert not any("ray" in line.split("/") or "/cluster/" in line for line in lines), "Ray or engine frames leaked"
    assert [e["restarts"] for e in events if e["type"] == "failure"] == [1, 1]  # one replay, then the stop
    assert read_committed(str(tmp_path / "out")).column("n").to_pylist() == list(range(500))


def test_missing_key_column_fails_at_once_without_restarts(tmp_path):
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=1000, rows_per_second=1e9)
    flow.graph.steps["by_user"].key = "usr_id"  # a typo in key_by
    flow.graph.steps["totals"].operator.key = "usr_id"
    events = []
    with pytest.raises(JobFailedError) as info:
        run(flow, str(tmp_path / "ckpt"), trigger_s=0.05, on_event=events.append)
    first = str(info.value).splitlines()[0]
    assert first == ("step 'by_user' (key_by): the stream has no column 'usr_id' (it has event_id, user_id, cents, "
                     "dollars); fix the column name in key_by('usr_id')")
    assert "no replay can fix this" in str(info.value)
    assert not [e for e in events if e["type"] == "recovered"]


def test_filter_expression_typo_names_the_column_not_the_schema(tmp_path):
    flow = Dataflow("typo")
    flow.source(GeneratorSource(numbers, 1, 1e9, 100)).filter(pc.field("m") > 3, name="keep").sink(
        ParquetSink(str(tmp_path / "out"))
    )
    with pytest.raises(JobFailedError) as info:
        run(flow, str(tmp_path / "ckpt"), trigger_s=0.05)
    text = str(info.value)
    assert text.splitlines()[0].startswith("step 'keep' (filter): the stream has no column 'm' (it has n); fix the")
    assert len(text.splitlines()) <= 2


def test_malformed_offsets_entry_names_the_file(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=4000, rows_per_second=1e9)
    run(flow, ckpt, epochs=2, trigger_s=0.05, max_records_per_epoch=2000)
    storage = JobStorage(ckpt, "clicks")
    storage.fs.pipe_file(storage.offsets_path(3), json.dumps({"epoch": 3, "checkpoint": False, "planned_at": 1.0}).encode())
    with pytest.raises(JobFailedError) as info:
        run(flow, ckpt, trigger_s=0.05)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"offsets log entry file://{storage.offsets_path(3)} is malformed: it has no 'ranges';")
    storage.fs.pipe_file(storage.offsets_path(3), b"{not json")
    with pytest.raises(JobFailedError, match=r"^offsets log entry .*0000000003.json cannot be read: .* not valid JSON"):
        run(flow, ckpt, trigger_s=0.05)


def test_corrupt_checkpoint_is_named_and_the_one_before_is_used(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    flow = example.build(output=out, rows_per_partition=8000, rows_per_second=1e9)
    run(flow, ckpt, epochs=4, trigger_s=0.05, max_records_per_epoch=2000, checkpoint_every=2)
    storage = JobStorage(ckpt, "clicks")
    manifest = storage.read_manifest(4)
    state_path = [p for p, f in manifest["files"].items() if f["checkpoint"] == 4 and f["rows"]][0]
    path = storage.absolute(state_path)
    data = bytearray(storage.fs.cat_file(path))
    data[-40] ^= 0xFF
    storage.fs.pipe_file(path, bytes(data))
    events = []
    run(flow, ckpt, trigger_s=0.05, max_records_per_epoch=2000, checkpoint_every=2, on_event=events.append)
    corrupt = [e for e in events if e["type"] == "corrupt_checkpoint"]
    assert corrupt and corrupt[0]["checkpoint"] == 4
    assert corrupt[0]["problem"].startswith(f"state file {state_path} fails its checksum")
    totals = example.final_totals(read_committed(f"{out}/totals"))
    from sluiceway.jobs.testing import compare_exactly_once

    assert compare_exactly_once(totals, example.expected_totals(8000)).exactly_once


def test_cli_prints_the_cause_first_and_once(tmp_path, capsys):
    job = tmp_path / "job.py"
    job.write_text(
        "import pyarrow as pa, pyarrow.compute as pc\n"
        "from sluiceway.jobs import Dataflow\n"
        "from sluiceway.operators.sinks import ParquetSink\n"
        "from sluiceway.operators.sources import GeneratorSource\n"
        "def numbers(p, a, b):\n    return pa.record_batch({'n': pa.array(range(a, b), pa.int64())})\n"
        "def explode_at_500(batch):\n"
        "    if pc.any(pc.greater_equal(batch['n'], 500)).as_py():\n"
        "        raise ValueError('bad record at offset 500')\n"
        "    return batch\n"
        "flow = Dataflow('explodes')\n"
        "flow.source(GeneratorSource(numbers, 1, 1e9, 1000)).map_batches(explode_at_500, name='parse')"
        f".sink(ParquetSink({str(tmp_path / 'out')!r}))\n"
    )
    code = cli(["run", str(job), "--checkpoint-dir", str(tmp_path / "ckpt"), "--trigger", "0.05",
                "--restart-delay", "0"])
    captured = capsys.readouterr()
    assert code == 1
    err = captured.err.splitlines()
    assert err[0].startswith("sluiceway: error: step 'parse' (map_batches) raised ValueError: bad record at offset 500")
    assert sum("raised ValueError" in line for line in err) == 1  # one header per failure
    assert err.count("ValueError: bad record at offset 500") == 1
    assert "FAILURE: step 'parse'" in captured.out and "(restart 1)" in captured.out
