"""``make demo``: the example job on a local cluster (a head and two worker
nodes), one worker node killed mid-run, recovery, the checkpoint history,
and an exactly-once verdict against an independent computation."""

from __future__ import annotations

import os
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


def main() -> int:
    from sluiceway.cluster.local import start_local_cluster

    work = tempfile.mkdtemp(prefix="sluiceway-demo-")
    output, checkpoints = os.path.join(work, "output"), os.path.join(work, "checkpoints")
    rows = 40_000  # per partition: ~20 s at 2,000 rows/s per partition
    flow = example.build(output=output, rows_per_partition=rows, rows_per_second=2000)

    print("starting a local Ray cluster: head (no CPUs for jobs) + 2 worker nodes ...", flush=True)
    cluster, workers = start_local_cluster(workers=2)
    kill_now = threading.Event()
    result: dict = {}

    def on_event(event: dict) -> None:
        line = format_event(event)
        if line:
            print(line, flush=True)
        if event["type"] == "epoch" and event["epoch"] >= 8 and not kill_now.is_set():
            kill_now.set()

    def job() -> None:
        from sluiceway.jobs.runner import run

        try:
            result["summary"] = run(flow, checkpoints, until_idle=True, checkpoint_every=3, on_event=on_event)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    try:
        thread = threading.Thread(target=job)
        thread.start()
        while not kill_now.wait(0.2):
            if not thread.is_alive():
                break
        if kill_now.is_set():
            victim = workers[0]
            print(f">>> killing worker node {victim.node_id[:12]} (SIGKILL of its raylet and workers)", flush=True)
            t_kill = time.time()
            cluster.remove_node(victim, allow_graceful=False)
            print(f">>> node removed after {time.time() - t_kill:.2f} s; the job must notice and recover", flush=True)
        thread.join()
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()

    if "error" in result:
        print(f"job failed: {result['error']}")
        return 1
    s = result["summary"]
    print(f"\njob finished: {s['epochs']} epochs, {s['rows_in']:,} rows in, {s['checkpoints']} checkpoints, "
          f"{s['restarts']} restart(s), {s['replayed_epochs']} epoch(s) replayed")
    print("\ncheckpoint history (sluiceway checkpoints list clicks):")

    class Args:
        job_name, checkpoint_dir, json = "clicks", checkpoints, False

    cmd_checkpoints_list(Args)
    complete = [c for c in CheckpointHistory(JobStorage(checkpoints, "clicks")).list() if c.status == "complete"]

    committed = read_committed(f"{output}/clicks")
    verdict = compare_exactly_once(committed, example.expected_clicks(rows))
    totals_ok = compare_exactly_once(
        example.final_totals(read_committed(f"{output}/totals")), example.expected_totals(rows)
    ).exactly_once
    recovered = s["restarts"] >= 1
    ok = verdict.exactly_once and totals_ok and bool(complete)
    print(f"\nper-user totals match the independent computation: {'yes' if totals_ok else 'no'}")
    print(f"node killed and job recovered: {'yes' if recovered else 'no'}")
    print(verdict.line().replace("exactly-once: yes", "exactly-once: yes" if ok else "exactly-once: no"))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok and recovered else 1


if __name__ == "__main__":
    sys.exit(main())
