"""Operating a cluster through the CLI, as subprocesses, the way a user does:
``up`` → ``submit`` → ``jobs`` → ``status --json`` → ``kill-node`` → the job
finishes exactly-once → the history shows the restore → ``stop`` / ``down``,
with no Ray process left. Then: the coordinator's process killed, scaling
2 → 4 → 1 onto added nodes, chaos with several kills, and bad input.

One cluster (started by ``sluiceway up`` in a private ``SLUICEWAY_HOME``)
serves the module; every test submits its own job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import compare_exactly_once
from sluiceway.operators.sinks import read_committed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JOB = os.path.join(os.path.dirname(example.__file__), "clicks.py")
SLUICEWAY = os.path.join(os.path.dirname(sys.executable), "sluiceway")


class Cli:
    def __init__(self, home: str):
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        self.env["SLUICEWAY_HOME"] = home

    def __call__(self, *args, check: bool = True, env: dict | None = None, timeout: float = 300):
        proc = subprocess.run([SLUICEWAY, *args], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"sluiceway {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args, **kw):
        return json.loads(self(*args, "--json", **kw).stdout)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    cli = Cli(str(tmp_path_factory.mktemp("home")))
    up = cli("up", "--workers", "2", "--cpus-per-worker", "1")
    assert "cluster up at 127.0.0.1:" in up.stdout, up.stdout
    state = json.load(open(os.path.join(cli.home, "cluster.json")))
    try:
        yield cli
    finally:
        down = cli("down", check=False)
        leftovers = _processes_of(state)
        assert down.returncode == 0, down.stderr
        assert not leftovers, f"processes left after down: {leftovers}"
        assert not os.path.exists(state["ray_tmpdir"])


def _processes_of(state) -> list[int]:
    from sluiceway.cluster.devcluster import session_members

    time.sleep(0.5)
    return [pid for n in state["nodes"] for pid in session_members(n["pid"])]


def _job_env(work, rows: int, rate: int, name: str) -> dict:
    return {"SLUICEWAY_EXAMPLE_OUTPUT": str(work / name / "output"), "SLUICEWAY_EXAMPLE_ROWS": str(rows),
            "SLUICEWAY_EXAMPLE_RATE": str(rate)}


def _submit(cli, work, name: str, rows: int, rate: int, extra: tuple = ()) -> dict:
    env = _job_env(work, rows, rate, name)
    cli("submit", JOB, "--name", name, "--checkpoint-dir", str(work / name / "ckpt"), "--until-idle",
        "--checkpoint-every", "2", *extra, env=env)
    return env


def _wait_state(cli, name: str, states=("finished",), timeout_s: float = 240) -> dict:
    deadline = time.time() + timeout_s
    while True:
        jobs = {j["name"]: j for j in cli.json("jobs")}
        job = jobs.get(name)
        if job and job["state"] in states:
            return job
        assert job is None or job["state"] != "failed", job
        assert time.time() < deadline, f"job {name} still {job and job['state']} after {timeout_s} s"
        time.sleep(1)


def _exactly_once(env: dict) -> None:
    rows = int(env["SLUICEWAY_EXAMPLE_ROWS"])
    out = env["SLUICEWAY_EXAMPLE_OUTPUT"]
    clicks = compare_exactly_once(read_committed(f"{out}/clicks"), example.expected_clicks(rows))
    assert clicks.exactly_once, clicks.line()
    totals = compare_exactly_once(example.final_totals(read_committed(f"{out}/totals")), example.expected_totals(rows))
    assert totals.exactly_once, totals.line()


def test_up_submit_status_kill_node_history_stop(cli, tmp_path):
    env = _submit(cli, tmp_path, "walk", rows=100_000, rate=4000)
    jobs = cli.json("jobs")
    assert [j["name"] for j in jobs] == ["walk"] and jobs[0]["state"] == "running"
    listing = cli("jobs").stdout
    assert listing.splitlines()[0].split() == ["job", "state", "epoch", "rows/s", "checkpoint", "restarts"]
    time.sleep(3)
    status = cli.json("status", "walk")
    assert status["state"] == "running" and status["recentProgress"], status
    progress = status["recentProgress"][-1]
    for field in ("batchId", "numInputRows", "inputRowsPerSecond", "processedRowsPerSecond", "durationMs",
                  "sources", "sourceLag", "stateBytes", "timestamp"):
        assert field in progress, field
    assert set(progress["durationMs"]) >= {"plan", "process", "align", "checkpoint", "commit", "triggerExecution"}
    hosting = {n for n in status["placement"].values()}
    nodes = {n["node_id"]: n for n in cli.json("nodes")}
    victim = next(n for n in nodes.values() if n["node_id"] in hosting and not n["head"])
    killed = cli("kill-node", victim["name"])
    assert f"killed {victim['name']}" in killed.stdout
    cli("workers", "add", "1")
    final = _wait_state(cli, "walk")
    assert final["restarts"] >= 1, cli("status", "walk").stdout + cli("logs", "walk").stdout
    _exactly_once(env)
    status = cli.json("status", "walk")
    assert status["recoveries"] and status["recoveries"][0]["restored_checkpoint"] is not None
    history = cli("history", "walk", "--checkpoint-dir", str(tmp_path / "walk" / "ckpt")).stdout
    assert "recovery" in history and "died" in history, history
    listed = cli("checkpoints", "list", "walk", "--checkpoint-dir", str(tmp_path / "walk" / "ckpt")).stdout
    assert "restored" in listed, listed
    assert "removed it from the cluster" in cli("stop", "walk").stdout
    assert cli.json("jobs") == []


def test_the_coordinator_process_killed_the_job_resumes_by_itself(cli, tmp_path):
    env = _submit(cli, tmp_path, "phoenix", rows=80_000, rate=4000)
    time.sleep(3)
    before = cli.json("jobs")[0]
    os.kill(before["supervisor"]["pid"], 9)
    final = _wait_state(cli, "phoenix")
    assert final["supervisor"]["restarted"] and final["supervisor"]["pid"] != before["supervisor"]["pid"]
    assert final["restarts"] >= 1
    _exactly_once(env)
    # The history lasts across the restart and retention: both runs, and checkpoints long since removed.
    from sluiceway.checkpoint.timeline import RecordKind, history

    h = history(str(tmp_path / "phoenix" / "ckpt"), "phoenix")
    assert len(h.of_kind(RecordKind.RUN_STARTED)) >= 2
    complete = [c for c in h.checkpoints().values() if c["status"] == "complete"]
    on_disk = os.listdir(tmp_path / "phoenix" / "ckpt" / "phoenix" / "checkpoints")
    assert len(complete) > len(on_disk), "retention removed nothing: the history's survival is not shown"
    cli("stop", "phoenix")


def test_scale_2_4_1_onto_added_nodes_exactly_once(cli, tmp_path):
    env = _submit(cli, tmp_path, "elastic", rows=150_000, rate=3000, extra=("--parallelism", "2"))
    before = {n["node_id"] for n in cli.json("nodes") if n["alive"]}
    cli("workers", "add", "2")
    added = {n["node_id"] for n in cli.json("nodes") if n["alive"]} - before
    time.sleep(2)
    up = cli("scale", "elastic", "--parallelism", "4")
    assert "to 4 through savepoint" in up.stdout and "by_user 4" in up.stdout, up.stdout
    status = cli.json("status", "elastic")
    assert status["parallelism"] == 4
    by_user = {t: n for t, n in status["placement"].items() if t.startswith("by_user")}
    assert len(by_user) == 4
    assert set(status["placement"].values()) & added, f"no task on the added nodes {added}: {status['placement']}"
    time.sleep(3)
    cli("scale", "elastic", "--parallelism", "1")
    status = cli.json("status", "elastic")
    assert [t for t in status["placement"] if t.startswith("by_user")] == ["by_user[0]"]
    assert len(status["savepoints"]) == 2
    _wait_state(cli, "elastic")
    _exactly_once(env)
    from sluiceway.checkpoint.timeline import RecordKind, history

    rescales = history(str(tmp_path / "elastic" / "ckpt"), "elastic").of_kind(RecordKind.RESCALE)
    assert len(rescales) == 2
    # Savepoints outlive retention and can be restored.
    ckpts = os.listdir(tmp_path / "elastic" / "ckpt" / "elastic" / "checkpoints")
    listed = cli("checkpoints", "list", "elastic", "--checkpoint-dir", str(tmp_path / "elastic" / "ckpt")).stdout
    assert listed.count("savepoint") == 2, listed
    assert all(f"{s:010d}" in ckpts for s in status["savepoints"]), (status["savepoints"], ckpts)
    restored = cli("restore", "elastic", "--checkpoint", str(status["savepoints"][0]), "--parallelism", "2")
    assert f"restored checkpoint {status['savepoints'][0]}" in restored.stdout
    _wait_state(cli, "elastic")
    _exactly_once(env)
    cli("stop", "elastic")
    idle = next(n for n in cli.json("nodes") if n["alive"] and not n["head"] and not n["tasks"])
    assert f"stopped {idle['name']}" in cli("workers", "remove", idle["name"]).stdout
    assert not next(n for n in cli.json("nodes") if n["node_id"] == idle["node_id"])["alive"]


def test_chaos_reports_every_kill_and_output_stays_exactly_once(cli, tmp_path):
    env = _submit(cli, tmp_path, "storm", rows=50_000, rate=2000)
    report = cli.json("chaos", "storm", "--kill-every", "6", "--duration", "13", "--replace")
    assert len(report["kills"]) == 2, report
    for kill in report["kills"]:
        if kill["tasks_lost"]:
            assert kill["recovered"], kill
            assert kill["detect_s"] is not None and kill["restore_s"] is not None
            assert kill["caught_up_s"] is not None and kill["replayed_epochs"] is not None
    assert report["still_running"] or report["state"] == "finished"
    _wait_state(cli, "storm")
    _exactly_once(env)
    cli("stop", "storm")


def test_bad_input_gets_one_clear_line(cli, tmp_path):
    def first_line(proc):
        assert proc.returncode != 0
        return proc.stderr.strip().splitlines()[0]

    empty = str(tmp_path / "nohome")
    line = first_line(cli("submit", JOB, "--checkpoint-dir", str(tmp_path / "c"), check=False,
                          env={"SLUICEWAY_HOME": empty}))
    assert "no cluster to use" in line and "sluiceway up" in line
    for args in (("status", "nope"), ("stop", "nope"), ("scale", "nope", "--parallelism", "2")):
        line = first_line(cli(*args, check=False))
        assert "no job named 'nope'" in line, line
    line = first_line(cli("kill-node", "worker-99", check=False))
    assert "'worker-99' is not a node of this cluster" in line
    line = first_line(cli("scale", "x", "--parallelism", "0", check=False))
    assert "0 must be 1 or more" in line
    _submit(cli, tmp_path, "shortlived", rows=4000, rate=4000)
    _wait_state(cli, "shortlived")
    line = first_line(cli("restore", "shortlived", "--checkpoint", "999", check=False))
    assert "checkpoint 999 of job 'shortlived' does not exist" in line and "restorable:" in line
    cli("stop", "shortlived")


def test_a_connection_without_the_token_is_refused(cli):
    state = json.load(open(os.path.join(cli.home, "cluster.json")))
    t0 = time.time()
    proc = cli("jobs", "--address", state["address"], check=False,
               env={"SLUICEWAY_HOME": cli.home + "-other", "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 1
    assert "refused this connection" in proc.stderr.splitlines()[0], proc.stderr
    assert time.time() - t0 < 15, "refusal took too long: it should not wait for Ray's retries"
    wrong = os.path.join(cli.home + "-other", "token")
    os.makedirs(os.path.dirname(wrong), exist_ok=True)
    with open(wrong, "w") as f:
        f.write("not-the-token")
    proc = cli("jobs", "--address", state["address"], check=False,
               env={"SLUICEWAY_HOME": cli.home + "-other", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": wrong})
    assert "refused this connection" in proc.stderr.splitlines()[0], proc.stderr
    shutil.rmtree(cli.home + "-other", ignore_errors=True)
