"""The job's history lasts: it survives retention and restarts, and shows
every checkpoint, the recovery and what it restored."""

import json

import pytest

from sluiceway.checkpoint.timeline import history
from sluiceway.jobs import run
from sluiceway.jobs.cli import main as cli
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import TaskKiller

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


def cli_json(capsys, *argv):
    assert cli([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_history_survives_retention_and_restarts_and_shows_the_recovery(tmp_path, capsys):
    rows = 6000
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    flow = example.build(output=out, rows_per_partition=rows, rows_per_second=1000)
    killer = TaskKiller("by_user[1]", after_epoch=3)
    first = run(flow, ckpt, trigger_s=0.5, checkpoint_every=2, keep_checkpoints=1, on_event=killer)
    run(flow, ckpt, trigger_s=0.5, checkpoint_every=2, keep_checkpoints=1)  # a restart: nothing left to read

    kinds = [r["kind"] for r in history(ckpt, "clicks").records]
    assert kinds[0] == "run_started" and kinds.count("run_started") == 2 and kinds.count("run_ended") == 2
    recovery = [r for r in history(ckpt, "clicks").records if r["kind"] == "recovery"]
    assert len(recovery) == 1 and " died: its executor x" in recovery[0]["failure"]
    # The killed executor's tasks, the one named among them, restarted on the other executor.
    assert "by_user[1]" in recovery[0]["restarted_tasks"] and recovery[0]["detect_s"] >= 0
    assert recovery[0]["failure"].split()[1] in recovery[0]["restarted_tasks"]

    listed = cli_json(capsys, "checkpoints", "list", "clicks", "--checkpoint-dir", ckpt)
    complete = [c for c in listed if c["status"] in ("complete", "removed")]
    assert [c["id"] for c in complete if c["status"] == "complete"] == [first["last_checkpoint"]]
    assert len([c for c in complete if c["status"] == "removed"]) >= 2  # retention removed the files, not the records
    restored = {c["id"]: c["restored"] for c in listed}
    if recovery[0]["restored_checkpoint"]:
        assert restored[recovery[0]["restored_checkpoint"]] >= 1  # the recovery says which one it restored
    assert restored[first["last_checkpoint"]] == 1  # the restart restored the last one

    a, b = complete[0]["id"], complete[-1]["id"]
    diff = cli_json(capsys, "checkpoints", "diff", "clicks", str(a), str(b), "--checkpoint-dir", ckpt)
    advanced = sum(n for parts in diff["offsets"].values() for n in parts.values())
    before = sum(complete[0]["offsets"]["events"].values())
    assert advanced == 2 * rows - before and "totals" in diff["steps"]

    removed = [c["id"] for c in complete if c["status"] == "removed"][0]
    assert cli(["checkpoints", "show", "clicks", str(removed), "--checkpoint-dir", ckpt]) == 0
    shown = capsys.readouterr().out
    assert f"checkpoint {removed} of job clicks: epoch {removed}, removed" in shown
    assert "removed by retention: it can no longer be restored" in shown
    both = cli_json(capsys, "checkpoints", "show", "clicks", str(first["last_checkpoint"]), "--checkpoint-dir", ckpt)
    assert both["record"]["status"] == "complete" and both["manifest"]["id"] == first["last_checkpoint"]
    assert cli(["checkpoints", "diff", "clicks", "1", "999", "--checkpoint-dir", ckpt]) == 1
    assert "has no checkpoint 1 in its history" in capsys.readouterr().err

    assert cli(["history", "clicks", "--checkpoint-dir", ckpt]) == 0
    text = capsys.readouterr().out
    assert f"recovery     {recovery[0]['failure'][:40]}" in text and "run_ended" in text and "complete:" in text
