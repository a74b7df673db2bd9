import pyarrow as pa
import pytest

from sluiceway.jobs import Dataflow, JobFileError
from sluiceway.jobs.cli import main
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.jobfile import load_flow
from sluiceway.jobs.testing import CollectSink, compare_exactly_once, run_local
from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.sinks import read_committed
from sluiceway.operators.sources import ListSource


def test_missing_job_file_is_named(tmp_path):
    with pytest.raises(JobFileError, match="does not exist"):
        load_flow(str(tmp_path / "nope.py"))


def test_job_file_without_dataflow_says_what_it_found(tmp_path):
    job = tmp_path / "job.py"
    job.write_text("from sluiceway.jobs import Dataflow\nother = Dataflow('x')\nflow = 3\n")
    with pytest.raises(JobFileError, match=r"defines no Dataflow named 'flow' \('flow' is a int.*use .*job.py:other"):
        load_flow(str(job))


def test_job_file_that_raises_shows_the_traceback(tmp_path):
    job = tmp_path / "job.py"
    job.write_text("raise RuntimeError('boom in job file')\n")
    with pytest.raises(JobFileError, match="boom in job file"):
        load_flow(str(job))


def test_job_file_attribute_spec(tmp_path):
    job = tmp_path / "job.py"
    job.write_text("from sluiceway.jobs import Dataflow\nmine = Dataflow('mine')\n")
    assert load_flow(f"{job}:mine").name == "mine"


def test_cli_reports_bad_job_file_and_bad_flags(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.py")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "job.py", "--checkpoint-every", "0"])
    assert "must be 1 or more" in capsys.readouterr().err


def test_flow_errors_are_raised_when_built():
    flow = Dataflow("f")
    s = flow.source(ListSource([{"x": 1}]), name="src")
    with pytest.raises(FlowDefinitionError, match="already exists.*two steps with the same name"):
        s.map_batches(lambda b: b, name="src")
    with pytest.raises(FlowDefinitionError, match="needs a sluiceway sink"):
        s.sink("out.parquet")
    with pytest.raises(FlowDefinitionError, match="parallelism must be a positive integer"):
        s.key_by("x", parallelism=0)
    with pytest.raises(FlowDefinitionError, match="has no sink"):
        run_local(flow)


def test_example_job_runs_locally_with_exact_output(tmp_path):
    flow = example.build(output=str(tmp_path), rows_per_partition=3000)
    epochs = run_local(flow, max_records_per_epoch=1000)
    assert epochs == 6
    verdict = compare_exactly_once(read_committed(str(tmp_path / "clicks")), example.expected_clicks(3000))
    assert verdict.exactly_once and verdict.rows == example.expected_clicks(3000).num_rows
    totals = example.final_totals(read_committed(str(tmp_path / "totals")))
    assert compare_exactly_once(totals, example.expected_totals(3000)).exactly_once


def test_fan_out_feeds_every_branch():
    flow = Dataflow("fan")
    a, b = CollectSink(), CollectSink()
    s = flow.source(ListSource([{"x": i} for i in range(4)], partitions=2))
    s.sink(a)
    s.map_batches(lambda batch: batch.filter(pa.compute.greater(batch["x"], 1))).sink(b)
    run_local(flow)
    assert sorted(r["x"] for r in a.rows()) == [0, 1, 2, 3]
    assert sorted(r["x"] for r in b.rows()) == [2, 3]


def test_verdict_counts_duplicates_and_missing():
    expected = pa.table({"id": [1, 2, 3]})
    v = compare_exactly_once(pa.table({"id": [1, 1, 2, 9]}), expected)
    assert (v.duplicates, v.missing, v.unexpected, v.exactly_once) == (1, 1, 1, False)


def test_malformed_job_document_names_the_file(tmp_path):
    from sluiceway.checkpoint import IncompatibleJobError, JobStorage
    from sluiceway.cluster.graph import plan
    from sluiceway.cluster.launch import job_document

    flow = example.build(output=str(tmp_path / "out"))
    storage = JobStorage(str(tmp_path / "ckpt"), "clicks")
    storage.write_json(storage.job_path, ["not", "a", "job"])
    with pytest.raises(IncompatibleJobError, match=r"^file://.*clicks/job.json is malformed"):
        job_document(storage, plan(flow.graph))
