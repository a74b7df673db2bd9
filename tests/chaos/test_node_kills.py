"""Worker nodes of a head + 2 workers cluster SIGKILLed mid-run: once, and
ten times in one run with the default restart policy. The job keeps
running, a checkpoint completes after the last kill, and the output is
exactly-once.

Each run is its own process on its own cluster: a process already connected
to the session's Ray cluster would silently stay on it (RAY_NOTES.md)."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, tempfile
from sluiceway.jobs.demo import node_kill_run
r = node_kill_run({rows}, {rate}, kill_after_epoch=3, work=tempfile.mkdtemp(), kills={kills}, checkpoint_every=2,
                  log=lambda l: print(l, file=sys.stderr))
print(json.dumps(r))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kills, rows, rate", [(1, 12_000, 2000), (10, 90_000, 1000)], ids=["one-kill", "ten-kills"])
def test_node_kills_keep_the_job_running_exactly_once(kills, rows, rate):
    script = SCRIPT.format(rows=rows, rate=rate, kills=kills)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in r, r.get("error")
    assert len(r["kills"]) == kills, f"only {len(r['kills'])} kills happened before the job ended"
    assert r["summary"]["restarts"] >= kills
    assert r["summary"]["stopped"] == "idle"
    assert r["exactly_once"], r["verdict"]
    after = [c for c in r["checkpoints"] if c["status"] == "complete" and c["started_at"] > r["kills"][-1]]
    assert after, f"no complete checkpoint newer than the last kill: {r['checkpoints']}"
