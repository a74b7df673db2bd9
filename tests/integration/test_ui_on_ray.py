"""The JSON API of `sluiceway ui`: while a job runs (its epochs appear as they
commit) and afterwards from checkpoint storage alone (the recovery, the
checkpoints, the graph with each task's node); the server only reads."""

import json
import urllib.error
import urllib.request

import pytest

from sluiceway.jobs import run
from sluiceway.jobs.cli import build_parser
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import TaskKiller
from sluiceway.jobs.ui.server import Sources, make_server, serve_in_thread, url

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def api(base, path):
    return json.loads(get(base, path)[2])


@pytest.fixture
def ui(tmp_path):
    root = str(tmp_path / "ckpt")
    server = make_server(Sources([root]), "127.0.0.1", 0)
    serve_in_thread(server)
    yield root, url(server)
    server.shutdown()
    server.server_close()


def test_api_follows_a_running_job_then_reads_its_history_from_storage(ui, tmp_path):
    root, base = ui
    assert api(base, "/api/jobs") == []
    flow = example.build(output=str(tmp_path / "out"), rows_per_partition=6000, rows_per_second=1500)
    killer = TaskKiller("by_user[1]", after_epoch=3)
    seen_while_running = []

    def watch(event):
        killer(event)
        if event["type"] == "epoch" and event["epoch"] in (2, 6):
            seen_while_running.append(api(base, "/api/jobs/clicks"))

    summary = run(flow, root, trigger_s=0.5, checkpoint_every=2, on_event=watch, parallelism=2)
    assert summary["restarts"] == 1
    early, later = seen_while_running[0], seen_while_running[-1]
    assert early["epoch"] >= 1 and later["epoch"] > early["epoch"]  # it refreshes while the job runs

    [listed] = api(base, "/api/jobs")
    assert listed["name"] == "clicks" and listed["state"] == "finished" and listed["restarts"] == 1
    job = api(base, "/api/jobs/clicks")
    assert job["epochs"] and all(e["rows_in_per_s"] is not None for e in job["epochs"] if e["rows_in"])
    assert {"latency_p50_s", "latency_p99_s", "lag", "rows_out_per_s"} <= set(job["epochs"][-1])
    assert all(set(e["source_lag"]) == {"events"} for e in job["epochs"])  # each epoch: every source's lag
    [source] = job["sources"]
    assert source["source"] == "events" and source["records"] == 0 and source["kind"]
    [recovery] = job["recoveries"]
    assert "by_user[1]" in recovery["restarted_tasks"] and recovery["restored_checkpoint"] is not None
    assert recovery["detect_s"] is not None and recovery["restore_s"] is not None
    complete = [c for c in job["checkpoints"] if c["status"] == "complete"]
    assert complete and all(c["size_bytes"] and c["duration_s"] is not None for c in complete)
    stages = {s["id"]: s for s in job["graph"]["stages"]}
    assert stages["by_user"]["parallelism"] == 2 and stages["by_user"]["input"] == "events"
    assert all(t["node"] for s in stages.values() for t in s["tasks"])


def test_pages_and_static_files_are_served_and_nothing_is_writable(ui):
    root, base = ui
    for path, kind in (("/", "text/html"), ("/jobs/clicks", "text/html"), ("/static/app.js", "javascript"),
                       ("/static/vendor/uPlot.iife.min.js", "javascript"), ("/static/style.css", "text/css")):
        status, content_type, body = get(base, path)
        assert status == 200 and kind in content_type and body, path
    assert b"MIT License" in get(base, "/static/vendor/uPlot.LICENSE.txt")[2]
    for method in ("POST", "PUT", "DELETE"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(base + "/api/jobs", method=method), timeout=5)
        assert refused.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/api/jobs/nope", timeout=5)
    assert missing.value.code == 404 and "no job named 'nope'" in missing.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as outside:
        urllib.request.urlopen(base + "/static/../server.py", timeout=5)
    assert outside.value.code == 404


def test_the_cli_binds_to_loopback_unless_told_otherwise():
    args = build_parser().parse_args(["ui", "--checkpoint-dir", "/tmp/x"])
    assert args.host == "127.0.0.1" and args.port == 8377 and args.checkpoint_dir == ["/tmp/x"]
