"""Kill a whole worker node of a head + 2 workers cluster mid-run.

Runs in its own process: a process already connected to the session's Ray
cluster would silently stay on it (RAY_NOTES.md).
"""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, tempfile
from sluiceway.jobs.demo import node_kill_run
r = node_kill_run(12_000, 2000, kill_after_epoch=3, work=tempfile.mkdtemp(), log=lambda l: print(l, file=sys.stderr))
print(json.dumps(r))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_node_kill_mid_run_keeps_output_exactly_once():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in r, r.get("error")
    assert r["killed_at"] is not None, "the job ended before the node could be killed"
    assert r["summary"]["restarts"] >= 1
    assert r["exactly_once"], r["verdict"]
    assert "duplicates 0, missing 0, unexpected 0" in r["verdict"]
    after = [c for c in r["checkpoints"] if c["status"] == "complete" and c["started_at"] > r["killed_at"]]
    assert after, f"no complete checkpoint newer than the failure: {r['checkpoints']}"
