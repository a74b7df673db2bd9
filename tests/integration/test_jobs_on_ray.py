import threading

import pytest
import ray

from sluiceway.checkpoint import CheckpointHistory, JobStorage
from sluiceway.jobs import run
from sluiceway.jobs.cli import main as cli
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import compare_exactly_once
from sluiceway.operators.sinks import read_committed

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


def verdicts(output, rows):
    clicks = compare_exactly_once(read_committed(f"{output}/clicks"), example.expected_clicks(rows))
    totals = compare_exactly_once(example.final_totals(read_committed(f"{output}/totals")), example.expected_totals(rows))
    return clicks, totals


def test_bounded_job_output_equals_independent_computation(tmp_path, capsys):
    rows = 6000
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=rows, rows_per_second=1e9)
    ckpt = str(tmp_path / "ckpt")
    summary = run(flow, ckpt, trigger_s=0, max_records_per_epoch=3000, checkpoint_every=2)
    assert summary["stopped"] == "idle"
    assert summary["rows_in"] == 2 * rows and summary["epochs"] == 4 and summary["restarts"] == 0
    clicks, totals = verdicts(tmp_path / "out", rows)
    assert clicks.exactly_once and clicks.rows == example.expected_clicks(rows).num_rows
    assert totals.exactly_once
    # The history, through the CLI as a user reads it.
    assert cli(["checkpoints", "list", "clicks", "--checkpoint-dir", ckpt, "--json"]) == 0
    import json

    listed = json.loads(capsys.readouterr().out)
    assert [c["epoch"] for c in listed] == [2, 4] and {c["status"] for c in listed} == {"complete"}
    assert set(listed[-1]) >= {"id", "epoch", "status", "started_at", "duration_s", "size_bytes", "offsets"}
    assert listed[-1]["offsets"] == {"events": {"0": rows, "1": rows}}
    assert cli(["checkpoints", "show", "clicks", "4", "--checkpoint-dir", ckpt]) == 0
    shown = capsys.readouterr().out
    assert "checkpoint 4 of job clicks: epoch 4, complete" in shown and "totals:" in shown


def test_stopped_job_started_again_continues_without_loss_or_duplicates(tmp_path):
    rows = 8000
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    flow = example.build(output=out, rows_per_partition=rows, rows_per_second=1e9)
    first = run(flow, ckpt, epochs=2, trigger_s=0, max_records_per_epoch=2000, checkpoint_every=5)
    assert first["stopped"] == "epochs" and first["epochs"] == 2 and first["last_checkpoint"] == 2
    events = []
    second = run(flow, ckpt, trigger_s=0, max_records_per_epoch=2000, checkpoint_every=5, on_event=events.append)
    started = [e for e in events if e["type"] == "started"][0]
    assert started["resume_checkpoint"] == 2
    assert second["epochs"] == 6 and second["rows_in"] == 2 * rows - first["rows_in"]
    clicks, totals = verdicts(out, rows)
    assert clicks.exactly_once and totals.exactly_once
    third = run(flow, ckpt, trigger_s=0.05)
    assert third["epochs"] == 0 and third["stopped"] == "idle"


def test_killed_executor_recovers_onto_a_running_one_with_exactly_once_output(tmp_path):
    rows = 6000
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    flow = example.build(output=out, rows_per_partition=rows, rows_per_second=1000)
    names, after, killed, pids = {}, {}, {}, {}
    kill = threading.Event()

    def on_event(event):
        if event["type"] == "started":
            names.update(event["actor_names"])
            pids.update({name: ray.get(ray.get_actor(name).pid.remote()) for name in set(names.values())})
        if event["type"] == "recovered":
            after.update(event["actor_names"])
        if event["type"] == "epoch" and event["epoch"] >= 2 and not kill.is_set():
            killed["after_epoch"], killed["executor"] = event["epoch"], names["by_user[1]"]
            kill.set()
            ray.kill(ray.get_actor(names["by_user[1]"]), no_restart=True)

    summary = run(flow, ckpt, trigger_s=0.5, checkpoint_every=2, on_event=on_event)
    assert kill.is_set() and summary["restarts"] == 1
    # The killed executor's tasks now run in an executor that was running before the failure (a standby).
    assert len(pids) == 2 and set(names) == set(after)  # the embedded cluster's 2 CPUs: 2 executors
    moved = {t for t, e in names.items() if e == killed["executor"]}
    assert "by_user[1]" in moved and all(after[t] != killed["executor"] and after[t] in pids for t in moved)
    clicks, totals = verdicts(out, rows)
    assert clicks.exactly_once, clicks.line()
    assert totals.exactly_once
    complete = [c for c in CheckpointHistory(JobStorage(ckpt, "clicks")).list() if c.status == "complete"]
    assert max(c.epoch for c in complete) > killed["after_epoch"]


def test_cli_run_until_idle_then_list_checkpoints_as_json(tmp_path, capsys, monkeypatch):
    job = tmp_path / "job.py"
    job.write_text(
        "from sluiceway.jobs.examples import clicks\n"
        f"flow = clicks.build(output={str(tmp_path / 'out')!r}, rows_per_partition=2000, rows_per_second=1e9)\n"
    )
    ckpt = str(tmp_path / "ckpt")
    assert cli(["run", str(job), "--checkpoint-dir", ckpt, "--trigger", "0.1", "--until-idle"]) == 0
    out = capsys.readouterr().out
    assert "epoch     1  in     4,000" in out and "done (idle)" in out
    assert cli(["checkpoints", "list", "clicks", "--checkpoint-dir", ckpt, "--json"]) == 0
    import json

    listed = json.loads(capsys.readouterr().out)
    assert listed and all(c["status"] == "complete" for c in listed)


def test_unusable_checkpoint_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=10, rows_per_second=1e9)
    from sluiceway.checkpoint import StorageError

    with pytest.raises(StorageError, match=r"checkpoint dir .*file' is not usable"):
        run(flow, str(blocker))


def test_backlog_is_planned_back_to_back_not_one_epoch_per_trigger(tmp_path):
    """A 3 s trigger and 5 epochs' worth waiting: the offsets log shows each
    epoch planned while records waited, and the run does not spend a trigger
    interval per epoch (that would be 12 s or more)."""
    rows = 10_000
    ckpt = str(tmp_path / "ckpt")
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=rows, rows_per_second=1e9)
    summary = run(flow, ckpt, max_records_per_epoch=4000, checkpoint_every=1, keep_checkpoints=10, trigger_s=3.0)
    assert summary["epochs"] == 5 and summary["rows_in"] == 2 * rows
    storage = JobStorage(ckpt, "clicks")
    plans = [storage.read_offsets(e) for e in storage.offset_epochs()]
    assert [p["waiting"] for p in plans] == [16000, 12000, 8000, 4000, 0]
    assert summary["duration_s"] < 9.0  # five epochs back to back, not one per 3 s trigger
