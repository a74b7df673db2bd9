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


def _submit(cli, work, name: str, rows: int, rate: int, extra: tuple = (), until_idle: bool = True) -> dict:
    env = _job_env(work, rows, rate, name)
    cli("submit", JOB, "--name", name, "--checkpoint-dir", str(work / name / "ckpt"),  # a bounded job ends by itself:
        *(("--until-idle",) if until_idle else ("--epochs", "1000000")),  # --epochs keeps it on once its input is read
        "--checkpoint-every", "2", *extra, env=env)
    return env


def _wait_replayed(cli, name: str, through: int, after_run: str, timeout_s: float = 120) -> None:
    """Until a run other than ``after_run`` has committed epoch ``through`` (a replay counts)."""
    deadline = time.time() + timeout_s
    while True:
        status = cli.json("status", name)
        assert status["state"] != "failed", status
        if status["run_id"] != after_run and any(p["runId"] == status["run_id"] and p["batchId"] >= through
                                                  for p in status["recentProgress"]):
            return
        assert time.time() < deadline, f"job {name} did not replay through epoch {through}: {status}"
        time.sleep(0.5)


def _remove(cli, name: str) -> None:
    """Stop a running job, then remove it from the cluster (a stopped job stays listed until stopped again)."""
    assert "stopped at epoch" in cli("stop", name).stdout
    assert "removed it from the cluster" in cli("stop", name).stdout


def _wait_all_committed(env: dict, timeout_s: float = 120) -> None:
    """Until every input row's click is committed (a job that is not --until-idle never finishes)."""
    rows = int(env["SLUICEWAY_EXAMPLE_ROWS"])
    want = example.expected_clicks(rows).num_rows
    deadline = time.time() + timeout_s
    while read_committed(f"{env['SLUICEWAY_EXAMPLE_OUTPUT']}/clicks").num_rows < want:
        assert time.time() < deadline, "the job did not commit every row"
        time.sleep(1)


def _get_json(url: str):
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _wait_state(cli, name: str, states=("finished",), recovered: bool = False, timeout_s: float = 240) -> dict:
    """The job's summary once it is in one of ``states`` (with ``recovered``: after a restart)."""
    deadline = time.time() + timeout_s
    while True:
        jobs = {j["name"]: j for j in cli.json("jobs")}
        job = jobs.get(name)
        if job and job["state"] in states and (not recovered or job["restarts"] >= 1):
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


def test_up_submit_status_kill_node_history_stop(cli, tmp_path, request):
    # Not until idle here and below: the job runs on when its input is read, so a kill, a scale or a chaos
    # run finds it running however slow the machine, and the test stops it once every row is committed.
    env = _submit(cli, tmp_path, "walk", rows=28_000, rate=4000, until_idle=False)
    jobs = cli.json("jobs")
    assert [j["name"] for j in jobs] == ["walk"] and jobs[0]["state"] == "running"
    listing = cli("jobs").stdout
    assert listing.splitlines()[0].split() == ["job", "state", "epoch", "rows/s", "checkpoint", "restarts"]
    ui = subprocess.Popen([SLUICEWAY, "ui", "--port", "0"], stdout=subprocess.PIPE, text=True, env=cli.env)
    request.addfinalizer(ui.kill)  # starts while the job makes progress
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
    try:
        base = ui.stdout.readline().split(" at ")[1].split()[0]  # "sluiceway ui at http://127.0.0.1:PORT (..."
        live = _get_json(base + "/api/jobs/walk")
        assert live["live"] and live["state"] == "running" and set(live["graph"]["stages"][0]["tasks"][0]) == {
            "task", "node"}
        victim = next(n for n in nodes.values() if n["node_id"] in hosting and not n["head"])
        killed = cli("kill-node", victim["name"])
        assert f"killed {victim['name']}" in killed.stdout
        cli("workers", "add", "1")
        _wait_all_committed(env)
        final = _wait_state(cli, "walk", states=("running",), recovered=True)
        assert final["restarts"] >= 1, cli("status", "walk").stdout + cli("logs", "walk").stdout
        _exactly_once(env)
        seen = _get_json(base + "/api/jobs/walk")  # the page's data: the node's loss and the recovery
        assert seen["state"] == "running" and seen["recoveries"] and seen["recoveries"][0]["restored_checkpoint"]
        assert [j["name"] for j in _get_json(base + "/api/jobs")] == ["walk"]
    finally:
        ui.terminate()
        ui.wait(timeout=10)
    status = cli.json("status", "walk")
    assert status["recoveries"] and status["recoveries"][0]["restored_checkpoint"] is not None
    history = cli("history", "walk", "--checkpoint-dir", str(tmp_path / "walk" / "ckpt")).stdout
    assert "recovery" in history and "died" in history, history
    listed = cli("checkpoints", "list", "walk", "--checkpoint-dir", str(tmp_path / "walk" / "ckpt")).stdout
    assert "restored" in listed, listed
    _remove(cli, "walk")
    assert cli.json("jobs") == []


def test_run_uses_the_cluster_up_started_and_says_so(cli, tmp_path):
    env = _job_env(tmp_path, rows=500, rate=100_000, name="here")
    started = time.time()
    ran = cli("run", JOB, "--checkpoint-dir", str(tmp_path / "ckpt"), "--until-idle",
              "--trigger", "0.1", env=env)
    took = time.time() - started
    address = json.load(open(os.path.join(cli.home, "cluster.json")))["address"]
    assert f"running on the cluster `sluiceway up` started at {address}" in ran.stdout.splitlines()[0], ran.stdout
    assert "done (idle)" in ran.stdout and took < 60, (took, ran.stdout)
    _exactly_once(env)


def test_the_coordinator_process_killed_the_job_resumes_by_itself(cli, tmp_path):
    env = _submit(cli, tmp_path, "phoenix", rows=32_000, rate=4000, until_idle=False)
    time.sleep(3)
    before = cli.json("jobs")[0]
    os.kill(before["supervisor"]["pid"], 9)
    _wait_all_committed(env)
    final = _wait_state(cli, "phoenix", states=("running",), recovered=True)
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
    _remove(cli, "phoenix")


def test_scale_2_4_1_onto_added_nodes_exactly_once(cli, tmp_path):
    # Not --until-idle: the job runs on when its input is read, so each scale finds it running whatever the
    # machine's speed, and the test ends it.
    env = _submit(cli, tmp_path, "elastic", rows=20_000, rate=3000, extra=("--parallelism", "2"), until_idle=False)
    added = {line.split()[2] for line in cli("workers", "add", "2").stdout.splitlines() if line.startswith("started")}
    assert len(added) == 2, added  # node id prefixes, as `workers add` prints them
    up = cli("scale", "elastic", "--parallelism", "4")
    assert "to 4 through savepoint" in up.stdout and "by_user 4" in up.stdout, up.stdout
    status = cli.json("status", "elastic")
    assert status["parallelism"] == 4
    by_user = {t: n for t, n in status["placement"].items() if t.startswith("by_user")}
    assert len(by_user) == 4
    assert {n[:12] for n in status["placement"].values()} & added, f"no task on the added nodes {added}: {status['placement']}"
    cli("scale", "elastic", "--parallelism", "1")
    status = cli.json("status", "elastic")
    assert [t for t in status["placement"] if t.startswith("by_user")] == ["by_user[0]"]
    assert len(status["savepoints"]) == 2
    _wait_all_committed(env)
    stopped = cli("stop", "elastic").stdout
    assert "stopped" in stopped, stopped
    final = cli.json("status", "elastic")
    _exactly_once(env)
    from sluiceway.checkpoint.timeline import RecordKind, history

    rescales = history(str(tmp_path / "elastic" / "ckpt"), "elastic").of_kind(RecordKind.RESCALE)
    assert len(rescales) == 2
    # Savepoints outlive retention and can be restored: the job replays from the first to where it stopped.
    ckpts = os.listdir(tmp_path / "elastic" / "ckpt" / "elastic" / "checkpoints")
    listed = cli("checkpoints", "list", "elastic", "--checkpoint-dir", str(tmp_path / "elastic" / "ckpt")).stdout
    assert listed.count("savepoint") == 2, listed
    assert all(f"{s:010d}" in ckpts for s in status["savepoints"]), (status["savepoints"], ckpts)
    restored = cli("restore", "elastic", "--checkpoint", str(status["savepoints"][0]), "--parallelism", "2")
    assert f"restored checkpoint {status['savepoints'][0]}" in restored.stdout
    _wait_replayed(cli, "elastic", through=final["epoch"], after_run=final["run_id"])
    _exactly_once(env)
    _remove(cli, "elastic")


def test_chaos_reports_every_kill_and_output_stays_exactly_once(cli, tmp_path):
    env = _submit(cli, tmp_path, "storm", rows=40_000, rate=2000)  # kills hit live input: each is "caught up"
    report = cli.json("chaos", "storm", "--kill-every", "4", "--duration", "9", "--replace")
    assert len(report["kills"]) == 2, report
    for kill in report["kills"]:
        if kill["tasks_lost"]:
            assert kill["recovered"], kill
            assert kill["detect_s"] is not None and kill["restore_s"] is not None
            assert kill["caught_up_s"] is not None and kill["replayed_epochs"] is not None
            assert kill["processing_s"] is not None and kill["processing_s"] <= kill["caught_up_s"]
    assert report["still_running"] or report["state"] == "finished"
    _wait_state(cli, "storm")
    _exactly_once(env)
    line = cli("restore", "storm", "--checkpoint", "999", check=False).stderr.strip().splitlines()[0]
    assert "checkpoint 999 of job 'storm' does not exist" in line and "restorable:" in line
    assert "removed it from the cluster" in cli("stop", "storm").stdout


def test_bad_input_gets_one_clear_line_and_an_idle_worker_is_removed(cli, tmp_path):
    def first_line(proc):
        assert proc.returncode != 0, proc.stdout
        return proc.stderr.strip().splitlines()[0]

    # The commands are independent: run side by side, as several users could.
    empty = str(tmp_path / "nohome")
    cases = {
        ("submit", JOB, "--checkpoint-dir", str(tmp_path / "c")): ("no cluster to use", "sluiceway up"),
        ("status", "nope"): ("no job named 'nope'",),
        ("stop", "nope"): ("no job named 'nope'",),
        ("scale", "nope", "--parallelism", "2"): ("no job named 'nope'",),
        ("restore", "nope", "--checkpoint", "3"): ("no job named 'nope'",),
        ("kill-node", "worker-99"): ("'worker-99' is not a node of this cluster",),
        ("scale", "x", "--parallelism", "0"): ("0 must be 1 or more",),
    }
    running = {args: subprocess.Popen([SLUICEWAY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**cli.env, "SLUICEWAY_HOME": empty} if args[0] == "submit" else cli.env)
               for args in cases}
    for args, proc in running.items():
        out, err = proc.communicate(timeout=120)
        line = first_line(subprocess.CompletedProcess(args, proc.returncode, out, err))
        assert all(part in line for part in cases[args]), (args, line)
    # No job is left on the cluster: any worker is idle, and goes.
    assert cli.json("jobs") == []
    idle = next(n for n in cli.json("nodes") if n["alive"] and not n["head"] and not n["tasks"])
    assert f"stopped {idle['name']}" in cli("workers", "remove", idle["name"]).stdout
    assert not next(n for n in cli.json("nodes") if n["node_id"] == idle["node_id"])["alive"]


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
