"""``make demo``: the example job on a local cluster (a head and two worker
nodes), one worker node killed mid-run, recovery, the checkpoint history,
and an exactly-once verdict against an independent computation."""

from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import threading
import time

from sluiceway.checkpoint.history import CheckpointHistory
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.jobs.cli import cmd_checkpoints_list, format_event
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import compare_exactly_once
from sluiceway.operators.sinks import read_committed


def node_kill_run(rows: int, rows_per_second: float, kill_after_epoch: int, work: str, log=print,
                  kills: int = 1, checkpoint_every: int = 3) -> dict:
    """Run the example job on a head + 2 workers cluster and SIGKILL worker
    nodes while it runs: the first once ``kill_after_epoch`` completed, each
    further one once the job has recovered and completed a checkpoint since
    (the default restart policy forgives a failure the job recovered from).
    With several kills, a replacement node joins before each kill.

    Returns the summary, the kill times, the checkpoint history and the verdicts."""
    from sluiceway.cluster.local import start_local_cluster
    from sluiceway.jobs.runner import run

    output, checkpoints = os.path.join(work, "output"), os.path.join(work, "checkpoints")
    flow = example.build(output=output, rows_per_partition=rows, rows_per_second=rows_per_second)
    log("starting a local Ray cluster: head (no CPUs for jobs) + 2 worker nodes ...")
    local = start_local_cluster(workers=2)
    cluster = local.cluster
    nodes = {n.node_id: n for n in local.workers}
    events: queue.Queue = queue.Queue()
    result: dict = {"killed_at": None, "kills": []}

    def on_event(event: dict) -> None:
        line = format_event(event)
        if line:
            log(line)
        events.put(event)

    def job() -> None:
        try:
            result["summary"] = run(flow, checkpoints, until_idle=True, checkpoint_every=checkpoint_every,
                                    on_event=on_event)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            result["error"] = f"{type(exc).__name__}: {exc}"

    try:
        thread = threading.Thread(target=job)
        thread.start()
        placement: dict[str, str] = {}
        recoveries, ready = 0, False
        while len(result["kills"]) < kills and thread.is_alive():
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if event["type"] in ("started", "recovered"):
                placement = event["tasks"]
                recoveries += event["type"] == "recovered"
            if event["type"] == "epoch":
                if not result["kills"]:
                    ready = event["epoch"] >= kill_after_epoch
                elif event["checkpoint"] and recoveries >= len(result["kills"]):
                    ready = True  # recovered from the last kill and completed a checkpoint since
            if not ready:
                continue
            hosting = sorted({n for n in placement.values() if n in nodes})
            victim = max(hosting, key=lambda n: sum(1 for v in placement.values() if v == n))
            if kills > 1:
                replacement = cluster.add_node(num_cpus=2, object_store_memory=256 * 1024**2)
                nodes[replacement.node_id] = replacement
            log(f">>> killing worker node {victim[:12]} (SIGKILL of its raylet and workers)")
            result["kills"].append(time.time())
            result["killed_at"] = result["killed_at"] or result["kills"][0]
            cluster.remove_node(nodes.pop(victim), allow_graceful=False)
            ready = False
        thread.join()
    finally:
        local.stop()
    if "error" in result:
        return result
    result["checkpoints"] = [c.to_dict() for c in CheckpointHistory(JobStorage(checkpoints, "clicks")).list()]
    committed = read_committed(f"{output}/clicks")
    verdict = compare_exactly_once(committed, example.expected_clicks(rows))
    totals = compare_exactly_once(example.final_totals(read_committed(f"{output}/totals")), example.expected_totals(rows))
    result["verdict"] = verdict.line()
    result["exactly_once"] = verdict.exactly_once and totals.exactly_once
    result["totals_match"] = totals.exactly_once
    result["checkpoint_dir"] = checkpoints
    return result


def main() -> int:
    work = tempfile.mkdtemp(prefix="sluiceway-demo-")
    try:
        r = node_kill_run(40_000, 2000, kill_after_epoch=8, work=work, log=lambda line: print(line, flush=True))
        if "error" in r:
            print(f"job failed: {r['error']}")
            return 1
        s = r["summary"]
        print(f"\njob finished: {s['epochs']} epochs, {s['rows_in']:,} rows in, {s['checkpoints']} checkpoints, "
              f"{s['restarts']} restart(s), {s['replayed_epochs']} epoch(s) replayed")
        print("\ncheckpoint history (sluiceway checkpoints list clicks):")

        class Args:
            job_name, checkpoint_dir, json = "clicks", r["checkpoint_dir"], False

        cmd_checkpoints_list(Args)
        recovered = r["killed_at"] is not None and s["restarts"] >= 1
        after = [c for c in r["checkpoints"] if c["status"] == "complete" and c["started_at"] > (r["killed_at"] or 0)]
        ok = r["exactly_once"] and recovered and bool(after)
        print(f"\nnode killed and job recovered: {'yes' if recovered else 'no'}; "
              f"complete checkpoints after the kill: {len(after)}")
        print(f"per-user totals match the independent computation: {'yes' if r['totals_match'] else 'no'}")
        line = r["verdict"]
        print(line if ok else line.replace("exactly-once: yes", "exactly-once: no"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
