"""``sluiceway chaos``: kill random worker nodes while a job runs, then
report how the job took each kill.

For each kill the report gives the time to detect it and to restore (from
the job's recovery records in checkpoint storage, which every real failure
writes too), the time until the job processed again (kill to the first
epoch completed after the restore, a replay or not), the time until it
caught up with its input again (the first epoch after the recovery that is
not a replay and leaves nothing waiting), and the epochs replayed. :func:`report` is pure: it matches kills
to records by time.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

from sluiceway.cluster.errors import ClusterError
from sluiceway.cluster.supervisor import timestamp_seconds


@dataclass
class KillFigures:
    node: str
    killed_at: float
    detect_s: float | None = None
    restore_s: float | None = None
    processing_s: float | None = None  # kill to the first epoch completed after the restore
    caught_up_s: float | None = None  # kill to the first fresh epoch with no input waiting
    replayed_epochs: list[int] | None = None
    restored_checkpoint: int | None = None
    tasks_lost: list[str] | None = None
    recovered: bool = False

    def line(self) -> str:
        def s(v):
            return "-" if v is None else f"{v:.2f} s"

        if not self.recovered:
            return f"{self.node:<10} no task of the job ran there (nothing to recover)" if self.tasks_lost == [] \
                else f"{self.node:<10} no recovery recorded"
        return (f"{self.node:<10} detect {s(self.detect_s):>8}  restore {s(self.restore_s):>8}  "
                f"processing {s(self.processing_s):>8}  caught up {s(self.caught_up_s):>8}  replayed {len(self.replayed_epochs or [])} epoch(s)  "
                f"restored checkpoint {self.restored_checkpoint}  tasks {', '.join(self.tasks_lost or []) or '-'}")


def report(kills: list[tuple[str, float, list[str]]], recoveries: list[dict], progress: list[dict]) -> list[KillFigures]:
    """Figures per kill. ``kills``: (node name, when, job tasks it hosted);
    ``recoveries``: the job's recovery history records; ``progress``: its
    progress entries (``timestamp``, ``replay``, ``sourceLag``).

    >>> recs = [{"at": 12.0, "detect_s": 0.8, "restore_s": 1.1, "replay_epochs": [4, 5],
    ...          "restored_checkpoint": 3, "restarted_tasks": ["a[1]"]}]
    >>> prog = [{"timestamp": "1970-01-01T00:00:14.000Z", "replay": True, "sourceLag": 0},
    ...         {"timestamp": "1970-01-01T00:00:15.500Z", "replay": False, "sourceLag": 0}]
    >>> [f.line() for f in report([("worker-2", 11.0, ["a[1]"])], recs, prog)]
    ['worker-2   detect   0.80 s  restore   1.10 s  processing   3.00 s  caught up   4.50 s  replayed 2 epoch(s)  restored checkpoint 3  tasks a[1]']
    """
    figures = []
    used: set[int] = set()
    ordered = sorted(kills, key=lambda k: k[1])
    for i, (node, at, hosted) in enumerate(ordered):
        f = KillFigures(node, at, tasks_lost=hosted)
        figures.append(f)
        if not hosted:
            continue  # no task of the job ran there: nothing to recover
        next_kill = ordered[i + 1][1] if i + 1 < len(ordered) else float("inf")
        # The recovery that followed this kill: the first one after it, before the next kill.
        for j, r in enumerate(recoveries):
            if j not in used and at <= r["at"] < next_kill:
                used.add(j)
                f.recovered = True
                f.detect_s, f.restore_s = r.get("detect_s"), r.get("restore_s")
                f.replayed_epochs, f.restored_checkpoint = r.get("replay_epochs"), r.get("restored_checkpoint")
                f.tasks_lost = r.get("restarted_tasks") or hosted
                done = r["at"] + (r.get("restore_s") or 0)
                for p in progress:
                    when = timestamp_seconds(p["timestamp"])
                    if when > done and f.processing_s is None:
                        f.processing_s = round(when - at, 3)
                    if when > done and not p["replay"] and p["sourceLag"] == 0:
                        f.caught_up_s = round(when - at, 3)
                        break
                break
    return figures


def run_chaos(job: str, *, kill_every_s: float, duration_s: float, replace: bool, log=print,
              settle_s: float = 60.0, rng: random.Random | None = None) -> dict:
    """Kill a random worker node of the local cluster every ``kill_every_s``
    for ``duration_s`` (adding a fresh one after each with ``replace``),
    wait up to ``settle_s`` for the job to recover from the last kill, and
    return the report. This process must be connected to the cluster."""
    from sluiceway.checkpoint.timeline import RecordKind, history
    from sluiceway.cluster import devcluster
    from sluiceway.jobs import client

    client.supervisor(job)  # an unknown job fails here, before anything is killed
    state = devcluster.load_state()
    if state is None:
        raise ClusterError("chaos kills nodes of the cluster `sluiceway up` started; none is recorded")
    rng = rng or random.Random()
    kills: list[tuple[str, float, list[str]]] = []
    start = time.time()
    for k in range(1, int(duration_s // kill_every_s) + 1):  # kills at fixed times: every, 2 x every, ...
        time.sleep(max(0.0, start + k * kill_every_s - time.time()))
        placement = client.status(job, 1)["placement"]
        node, _ = devcluster.kill_node(state, None, rng=rng)
        hosted = sorted(t for t, n in placement.items() if n == node.node_id)
        kills.append((node.name, time.time(), hosted))
        log(f"killed {node.name} ({node.node_id[:12]}), hosting {', '.join(hosted) or 'no task of the job'}")
        if replace:
            for added in devcluster.add_workers(state, 1, node.cpus):
                log(f"added {added.name} ({added.node_id[:12]})")
    deadline = time.time() + settle_s
    while True:  # until every kill that cost tasks has its recovery and the job caught up after it
        status = client.status(job, 300)
        records = history(status["checkpoint_dir"], job, [RecordKind.RECOVERY]).records
        figures = report(kills, [r for r in records if r["at"] >= start], status["recentProgress"])
        settled = all(f.caught_up_s is not None for f in figures if f.tasks_lost)
        if settled or status["state"] in ("finished", "failed", "stopped") or time.time() > deadline:
            break
        time.sleep(0.5)
    return {"job": job, "kills": [asdict(f) for f in figures], "state": status["state"],
            "still_running": status["state"] in ("running", "recovering"), "error": status.get("error"),
            "lines": [f.line() for f in figures]}
