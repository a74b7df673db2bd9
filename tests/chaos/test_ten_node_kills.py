"""Ten worker-node kills in one run with the default restart policy: the job
keeps running and its output stays exactly-once.

Runs in its own process, on its own cluster (RAY_NOTES.md)."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, tempfile
from sluiceway.jobs.demo import node_kill_run
r = node_kill_run(90_000, 1000, kill_after_epoch=3, work=tempfile.mkdtemp(), kills=10, checkpoint_every=2,
                  log=lambda l: print(l, file=sys.stderr))
print(json.dumps(r))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_node_kills_in_one_run_keep_the_job_running_exactly_once():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in r, r.get("error")
    assert len(r["kills"]) == 10, f"only {len(r['kills'])} kills happened before the job ended"
    assert r["summary"]["restarts"] >= 10
    assert r["summary"]["stopped"] == "idle"
    assert r["exactly_once"], r["verdict"]
    after = [c for c in r["checkpoints"] if c["status"] == "complete" and c["started_at"] > r["kills"][-1]]
    assert after, f"no complete checkpoint newer than the last kill: {r['checkpoints']}"
