"""Two runs of one job: one runs, the other is refused; a run whose lease
was taken over stops writing, and output stays exactly-once."""

import os
import signal
import threading
import time

import pytest
import ray

from sluiceway.checkpoint import JobStorage
from sluiceway.checkpoint.errors import LeaseHeldError
from sluiceway.checkpoint.lease import owner
from sluiceway.jobs import JobFailedError, run
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import compare_exactly_once, wait_for
from sluiceway.operators.sinks import read_committed

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


def exactly_once(out, rows):
    clicks = compare_exactly_once(read_committed(f"{out}/clicks"), example.expected_clicks(rows))
    totals = compare_exactly_once(example.final_totals(read_committed(f"{out}/totals")), example.expected_totals(rows))
    return clicks, totals


def test_two_runs_started_together_one_runs_the_other_is_refused(tmp_path):
    rows = 3000
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    flow = example.build(output=out, rows_per_partition=rows, rows_per_second=2000)
    start = threading.Barrier(2)
    results, refused = [], []

    def one_run():
        start.wait()
        try:
            results.append(run(flow, ckpt, trigger_s=0.2))
        except LeaseHeldError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and len(refused) == 1, (results, refused)
    assert refused[0].startswith(f"job 'clicks' is already running: run {owner(JobStorage(ckpt, 'clicks')).holder.run_id}, "
                                 f"process {os.getpid()} on ")
    clicks, totals = exactly_once(out, rows)
    assert clicks.exactly_once, clicks.line()
    assert totals.exactly_once


def test_paused_run_whose_lease_was_taken_over_stops_writing(tmp_path):
    rows = 6000
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    flow = example.build(output=out, rows_per_partition=rows, rows_per_second=1500)
    storage = JobStorage(ckpt, "clicks")
    first_events, second_events, first = [], [], {}
    coordinator_pid = {}

    def on_started(actor):
        coordinator_pid["pid"] = ray.get(actor.pid.remote())

    def first_run():
        try:
            first["summary"] = run(flow, ckpt, trigger_s=0.2, checkpoint_every=2, lease_ttl_s=1.0,
                                   on_event=first_events.append, on_started=on_started)
        except JobFailedError as exc:
            first["error"] = str(exc)

    a = threading.Thread(target=first_run)
    a.start()
    wait_for(lambda: any(e["type"] == "epoch" and e["epoch"] >= 3 for e in first_events), 60, what="3 epochs")
    pid = coordinator_pid["pid"]
    os.kill(pid, signal.SIGSTOP)  # the first run's coordinator freezes, as on a long GC pause or a lost VM
    try:
        wait_for(lambda: owner(storage).expires_at < time.time(), 10, what="the lease to expire")
        second = run(flow, ckpt, trigger_s=0.2, checkpoint_every=2, lease_ttl_s=5.0, on_event=second_events.append)
    finally:
        os.kill(pid, signal.SIGCONT)
    a.join(60)
    assert not a.is_alive()
    assert "error" in first, first
    assert "lost job 'clicks' to run" in first["error"].splitlines()[0]
    assert "it stopped writing" in first["error"].splitlines()[0]
    assert second["stopped"] == "idle"
    started = [e for e in second_events if e["type"] == "started"][0]
    assert started["resume_checkpoint"] is not None
    clicks, totals = exactly_once(out, rows)
    assert clicks.exactly_once, clicks.line()
    assert totals.exactly_once
    assert storage.lease_numbers() == [1, 2]
    # Every offsets entry and commit record names the run that wrote it; the last ones, the second run.
    last = storage.offset_epochs()[-1]
    assert storage.read_offsets(last)["fencing"] == 2 and storage.read_commit(last)["fencing"] == 2
    assert {storage.read_offsets(e)["fencing"] for e in storage.offset_epochs()} <= {1, 2}
