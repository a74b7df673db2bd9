"""``make demo``: the operator's walk through the CLI on a local cluster (a
head and two worker nodes): submit the example job, kill a worker node
mid-run, add nodes and rescale, read the status, checkpoints and history,
and check the output exactly-once against an independent computation.

:func:`kill_nodes_during` runs any flow under ``run()`` while worker nodes
are killed, and :func:`node_kill_run` checks the example job that way, for
the chaos tests."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from sluiceway.checkpoint.history import CheckpointHistory
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.cluster.events import format_event
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import compare_exactly_once
from sluiceway.operators.sinks import read_committed


def kill_nodes_during(flow, checkpoints: str, kill_after_epoch: int, log=print, kills: int = 1,
                      checkpoint_every: int = 3, on_event=None, until=None, **run_options) -> dict:
    """Run ``flow`` on a head + 2 workers cluster until its sources are
    exhausted, and SIGKILL worker nodes while it runs: the first once
    ``kill_after_epoch`` completed, each further one once the job has
    recovered and completed a checkpoint since (the default restart policy
    forgives a failure the job recovered from).

    With several kills, a third worker joins once the job has started, and
    a replacement right after each kill but the last, while the job
    recovers (onto the two nodes left). The job runs on when its input is
    read, so that a slow machine gets every kill however long they take (on
    idle input the coordinator checkpoints a recovery with an empty epoch),
    and after the last kill the job is stopped with a savepoint.

    ``on_event`` hears every event of the job too (a producer can start
    when the job has). ``until()``, for input without end (a queue, change
    data capture): the job runs on, and once every kill is recovered and
    checkpointed and ``until()`` holds (checked at most once a second), it
    is stopped with a savepoint. Returns the summary (or the error), the kill times
    and the checkpoint history."""
    import ray

    also = on_event
    from sluiceway.cluster.local import start_local_cluster
    from sluiceway.jobs.runner import run

    several = kills > 1
    open_ended = several or until is not None  # the harness stops the job, not the end of its input
    log("starting a local Ray cluster: head (no CPUs for jobs) + 2 worker nodes ...")
    local = start_local_cluster(workers=2)
    cluster = local.cluster
    nodes = {n.node_id: n for n in local.workers}
    events: queue.Queue = queue.Queue()
    result: dict = {"killed_at": None, "kills": []}
    coordinator: list = []

    def on_event(event: dict) -> None:
        line = format_event(event)
        if line:
            log(line)
        events.put(event)
        if also is not None:
            also(event)

    def job() -> None:
        try:
            result["summary"] = run(flow, checkpoints, until_idle=not open_ended, checkpoint_every=checkpoint_every,
                                    on_event=on_event, on_started=coordinator.append, **run_options)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            result["error"] = f"{type(exc).__name__}: {exc}"

    def add_node() -> None:  # in this thread: Ray's node setup sets signal handlers
        node = cluster.add_node(num_cpus=2, object_store_memory=256 * 1024**2)
        nodes[node.node_id] = node

    try:
        thread = threading.Thread(target=job)
        thread.start()
        placement: dict[str, str] = {}
        recoveries, ready, input_read, stopping, checked = 0, False, False, False, 0.0

        def stop_if_done() -> None:
            nonlocal stopping, checked
            if stopping or not ready or len(result["kills"]) < kills:
                return
            if until is None:
                done = input_read
            elif time.time() - checked < 1.0:
                return
            else:
                checked, done = time.time(), until()
            if done:
                log(">>> every kill recovered and the input read: stopping the job with a savepoint")
                ray.get(coordinator[0].stop.remote(True))
                stopping = True

        while thread.is_alive():
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if open_ended:
                    stop_if_done()
                continue
            kind = event["type"]
            if kind in ("started", "recovered"):
                placement = event["tasks"]
                recoveries += kind == "recovered"
                if several and kind == "started" and not result["kills"]:
                    add_node()
            if kind != "epoch":
                continue
            input_read = input_read or event.get("input_ended", False)
            if not result["kills"]:
                ready = event["epoch"] >= kill_after_epoch
            elif recoveries >= len(result["kills"]) and event["checkpoint"]:
                ready = True  # recovered from the last kill and completed a checkpoint since
            if len(result["kills"]) == kills:
                if open_ended:
                    stop_if_done()
                continue
            if not ready:
                continue
            hosting = sorted({n for n in placement.values() if n in nodes})
            victim = max(hosting, key=lambda n: sum(1 for v in placement.values() if v == n))
            log(f">>> killing worker node {victim[:12]} (SIGKILL of its raylet and workers)")
            result["kills"].append(time.time())
            result["killed_at"] = result["killed_at"] or result["kills"][0]
            cluster.remove_node(nodes.pop(victim), allow_graceful=False)
            ready = False
            if several and len(result["kills"]) < kills:
                add_node()
        thread.join()
    finally:
        local.stop()
    if "error" not in result:
        storage = JobStorage(checkpoints, flow.name)
        result["checkpoints"] = [c.to_dict() for c in CheckpointHistory(storage).list()]
        result["checkpoint_dir"] = checkpoints
    return result


def node_kill_run(rows: int, rows_per_second: float, kill_after_epoch: int, work: str, log=print,
                  kills: int = 1, checkpoint_every: int = 3, **run_options) -> dict:
    """The example job under :func:`kill_nodes_during`, its output checked
    exactly-once against the independent computation."""
    output, checkpoints = os.path.join(work, "output"), os.path.join(work, "checkpoints")
    flow = example.build(output=output, rows_per_partition=rows, rows_per_second=rows_per_second)
    result = kill_nodes_during(flow, checkpoints, kill_after_epoch, log, kills, checkpoint_every, **run_options)
    if "error" in result:
        return result
    committed = read_committed(f"{output}/clicks")
    verdict = compare_exactly_once(committed, example.expected_clicks(rows))
    totals = compare_exactly_once(example.final_totals(read_committed(f"{output}/totals")), example.expected_totals(rows))
    result["verdict"] = verdict.line()
    result["exactly_once"] = verdict.exactly_once and totals.exactly_once
    result["totals_match"] = totals.exactly_once
    return result


def walk(work: str, log=print) -> bool:
    """The operator's walk through the CLI, each command a subprocess as a
    user types it: up, submit, jobs, status, kill-node, workers add, scale,
    nodes, status, checkpoints, history, stop, down. Returns whether the
    output was exactly-once and the job recovered and rescaled."""
    home, ckpt, output = (os.path.join(work, d) for d in ("home", "checkpoints", "output"))
    rows = 60_000
    env = {**os.environ, "SLUICEWAY_HOME": home, "SLUICEWAY_EXAMPLE_OUTPUT": output,
           "SLUICEWAY_EXAMPLE_ROWS": str(rows), "SLUICEWAY_EXAMPLE_RATE": "2000"}
    env.pop("RAY_ADDRESS", None)
    exe = os.path.join(os.path.dirname(sys.executable), "sluiceway")
    job = os.path.relpath(example.__file__)

    def sw(*args: str, show: bool = True) -> str:
        if show:
            log(f"\n$ sluiceway {' '.join(args)}")
        proc = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)
        if show:
            log(proc.stdout.rstrip())
        if proc.returncode != 0:
            raise RuntimeError(f"sluiceway {' '.join(args)} failed:\n{proc.stderr.strip()}")
        return proc.stdout

    def state() -> dict:
        jobs = {j["name"]: j for j in json.loads(sw("jobs", "--json", show=False))}
        return jobs["clicks"]

    sw("up", "--workers", "2", "--cpus-per-worker", "1")
    ui = None
    try:
        ui, page = start_ui(exe, env, log)
        sw("submit", job, "--checkpoint-dir", ckpt, "--until-idle", "--checkpoint-every", "3")
        time.sleep(5)
        sw("jobs")
        sw("status", "clicks", "--epochs", "4")
        sw("kill-node", "--random")
        time.sleep(3)
        sw("workers", "add", "2")
        sw("scale", "clicks", "--parallelism", "4")
        sw("nodes")
        while state()["state"] not in ("finished", "failed", "stopped"):
            time.sleep(1)
        final = state()
        screenshot(page + "/jobs/clicks", os.environ.get("SLUICEWAY_DEMO_SCREENSHOT"), work, log)
        sw("status", "clicks", "--epochs", "3")
        sw("checkpoints", "list", "clicks", "--checkpoint-dir", ckpt)
        sw("history", "clicks", "--checkpoint-dir", ckpt)
        sw("stop", "clicks")
    finally:
        if ui is not None:
            ui.terminate()
            ui.wait(timeout=10)
        sw("down")
    clicks = compare_exactly_once(read_committed(f"{output}/clicks"), example.expected_clicks(rows))
    totals = compare_exactly_once(example.final_totals(read_committed(f"{output}/totals")),
                                  example.expected_totals(rows))
    recovered, rescaled = final["restarts"] >= 1, final["parallelism"] == 4
    log(f"\njob {final['state']}: recovered from the node kill: {'yes' if recovered else 'no'}; "
        f"rescaled to 4 tasks per step: {'yes' if rescaled else 'no'}")
    log(f"per-user totals match the independent computation: {'yes' if totals.exactly_once else 'no'}")
    ok = clicks.exactly_once and totals.exactly_once and recovered and rescaled and final["state"] == "finished"
    line = clicks.line()
    log(line if ok else line.replace("exactly-once: yes", "exactly-once: no"))
    return ok


def start_ui(exe: str, env: dict, log) -> tuple[subprocess.Popen, str]:
    """``sluiceway ui`` on the demo's cluster, on a free port: the job page
    shows the node kill and the recovery while the demo runs."""
    ui = subprocess.Popen([exe, "ui", "--port", os.environ.get("SLUICEWAY_UI_PORT", "0")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = ui.stdout.readline()
    page = first.split(" at ", 1)[1].split()[0] if " at " in first else "http://127.0.0.1:8377"
    log(f"\n$ sluiceway ui --port 0 &\n{first.rstrip()}\n(open {page}/jobs/clicks to watch the job)")
    return ui, page


def screenshot(page: str, path: str | None, work: str, log) -> None:
    """With ``SLUICEWAY_DEMO_SCREENSHOT`` set and Chromium installed, save
    the job page as the demo ends (the README's picture comes from here)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not chromium:
        return
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={work}/chromium", "--window-size=1300,1750", "--virtual-time-budget=5000",
                    f"--screenshot={path}", page], capture_output=True, timeout=90)
    log(f"(the job page as the demo ended: {path})")


def main() -> int:
    work = tempfile.mkdtemp(prefix="sluiceway-demo-")
    try:
        return 0 if walk(work, log=lambda line: print(line, flush=True)) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
