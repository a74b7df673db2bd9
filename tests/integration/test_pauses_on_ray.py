"""Storage that fails for a while pauses the job; an epoch that hangs while
every actor is alive is detected and the job recovers. Output exactly-once."""

import os
import time

import pyarrow.compute as pc
import pytest

from sluiceway.jobs import JobFailedError, run
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import FlakyFileSystem, compare_exactly_once
from sluiceway.operators.sinks import read_committed

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


def exactly_once(out, rows):
    clicks = compare_exactly_once(read_committed(f"{out}/clicks"), example.expected_clicks(rows))
    totals = compare_exactly_once(example.final_totals(read_committed(f"{out}/totals")), example.expected_totals(rows))
    return clicks.exactly_once and totals.exactly_once, clicks.line()


def test_storage_outage_pauses_and_resumes_with_exactly_once_output(tmp_path):
    rows = 6000
    out, ckpt = str(tmp_path / "out"), f"sluiceway-flaky://{tmp_path}/ckpt"
    flow = example.build(output=out, rows_per_partition=rows, rows_per_second=1500)
    events, declared = [], {}

    def on_event(event):
        events.append(event)
        if event["type"] == "epoch" and event["epoch"] == 3 and not declared:
            declared["at"] = time.time()
            FlakyFileSystem.declare_outage(str(tmp_path), seconds=3.0)

    summary = run(flow, ckpt, trigger_s=0.2, checkpoint_every=2, storage_deadline_s=30, on_event=on_event)
    waiting = [e for e in events if e["type"] == "storage_waiting"]
    resumed = [e for e in events if e["type"] == "storage_resumed"]
    assert waiting and resumed, [e["type"] for e in events]
    assert "No space left on device (simulated outage)" in waiting[0]["error"]
    assert waiting[0]["error"].startswith("cannot ")
    assert summary["restarts"] == 0  # a pause, not a failure
    assert summary["stopped"] == "idle"
    ok, line = exactly_once(out, rows)
    assert ok, line


def test_sink_storage_outage_pauses_the_job_too(tmp_path):
    rows = 4000
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "out"
    out.mkdir()
    flow = example.build(output=f"sluiceway-flaky://{out}", rows_per_partition=rows, rows_per_second=2000)
    events, declared = [], {}

    def on_event(event):
        events.append(event)
        if event["type"] == "epoch" and event["epoch"] == 2 and not declared:
            declared["done"] = True
            FlakyFileSystem.declare_outage(str(out), seconds=2.0)

    summary = run(flow, ckpt, trigger_s=0.2, storage_deadline_s=30, on_event=on_event)
    waiting = [e for e in events if e["type"] == "storage_waiting"]
    assert waiting, [e["type"] for e in events]
    assert "/out/" in waiting[0]["error"] and "No space left on device (simulated outage)" in waiting[0]["error"]
    assert summary["restarts"] == 0 and summary["stopped"] == "idle"
    ok, line = exactly_once(str(out), rows)
    assert ok, line


def test_storage_outage_past_the_deadline_fails_with_the_cause_first(tmp_path):
    ckpt = f"sluiceway-flaky://{tmp_path}/ckpt"
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=6000, rows_per_second=1500)

    def on_event(event):
        if event["type"] == "epoch" and event["epoch"] == 2:
            FlakyFileSystem.declare_outage(str(tmp_path), seconds=120.0)

    with pytest.raises(JobFailedError) as info:
        run(flow, ckpt, trigger_s=0.2, storage_deadline_s=2, on_event=on_event)
    first = str(info.value).splitlines()[0]
    assert first.startswith("cannot ") and "No space left on device (simulated outage)" in first
    assert "past the 2 s storage deadline" in first


class SleepOnce:
    """Hangs forever the first time it sees event 2501 (a marker file makes
    "first" hold across processes and restarts)."""

    def __init__(self, marker):
        self.marker = marker

    def __call__(self, batch):
        if pc.any(pc.equal(batch["event_id"], 2501)).as_py() and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)
        return batch


def test_stuck_task_is_detected_and_the_job_recovers(tmp_path):
    rows = 6000
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    flow = example.build(output=out, rows_per_partition=rows, rows_per_second=3000)
    flow.graph.steps["dollars"].operator.fn = lambda b, _hang=SleepOnce(str(tmp_path / "hung")): \
        example.with_dollars(_hang(b))
    events = []
    summary = run(flow, ckpt, trigger_s=0.2, checkpoint_every=2, epoch_timeout_s=3, on_event=events.append)
    stuck = [e for e in events if e["type"] == "failure" and e["failure_kind"] == "stuck"]
    assert len(stuck) == 1, [e for e in events if e["type"] == "failure"]
    assert "did not complete within 3 s" in stuck[0]["error"]
    # The hung task's executor stopped answering: its tasks (events[0] among them) restart elsewhere.
    restarting = stuck[0]["error"].split("; restarting ")[1].removesuffix(", which stopped answering").split(", ")
    assert "events[0]" in restarting and "by_user[1]" not in restarting
    recovered = [e for e in events if e["type"] == "recovered"]
    assert recovered and sorted(recovered[0]["restarted_tasks"]) == sorted(restarting)
    assert summary["stopped"] == "idle"
    ok, line = exactly_once(out, rows)
    assert ok, line
