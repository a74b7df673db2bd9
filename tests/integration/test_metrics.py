"""Metrics for Prometheus: a short job on a Ray node whose metrics agent
exports them, and the node's Prometheus endpoint scraped.

Ray exports application metrics only with ``ray[default]`` (its dashboard
agent on every node), which sluiceway's ``metrics`` extra installs. The test
suite's own clusters use the minimal ``ray``, which starts in half the time:
``make test`` installs the extra into ``.venv-metrics`` and this test runs
its job with that interpreter, in its own process on its own node."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile

import pytest

from sluiceway.cluster.metrics import METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(ROOT, ".venv-metrics", "bin", "python")

SCRIPT = """
import json, sys, time, urllib.request
import ray
from sluiceway.jobs.examples import clicks
from sluiceway.jobs.runner import run

port, work, names = {port}, {work!r}, {names!r}
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
         _metrics_export_port=port, _system_config={{"metrics_report_interval_ms": 500}})
flow = clicks.build(output=work + "/out", rows_per_partition=3000, rows_per_second=1e9)
summary = run(flow, work + "/ckpt", checkpoint_every=1, max_records_per_epoch=2000)
deadline, text = time.time() + 60, ""
while time.time() < deadline:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{{port}}/metrics", timeout=5).read().decode()
    except OSError:
        text = ""
    rows = [l for l in text.splitlines() if l.startswith("ray_sluiceway_rows_in_total")]
    if all(n in text for n in names) and rows and float(rows[0].split()[-1]) == summary["rows_in"]:
        break  # every metric there, and the last epoch's counts exported
    time.sleep(0.5)
lines = [l for l in text.splitlines() if "sluiceway_" in l and not l.startswith("#")]
print(json.dumps({{"summary": {{k: summary[k] for k in ("rows_in", "epochs", "checkpoints")}}, "lines": lines}}))
ray.shutdown()
"""

# What a short job without failures, late rows or dead letters records.
RECORDED = [m.name for m in METRICS if m.name not in (
    "sluiceway_late_rows_total", "sluiceway_dead_letters_total", "sluiceway_event_time_lag_seconds",
    "sluiceway_restarts_total", "sluiceway_recovery_duration_seconds")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _value(lines: list[str], name: str) -> float:
    """The sample of ``name`` for the job (Ray prefixes application metrics with ``ray_``)."""
    for line in lines:
        m = re.match(rf"ray_{name}\{{([^}}]*)\}} ([0-9.e+-]+)$", line)
        if m and 'job="clicks"' in m.group(1):
            return float(m.group(2))
    raise AssertionError(f"no sample of {name} for job clicks among:\n" + "\n".join(lines))


@pytest.mark.timeout(240)
def test_a_short_job_exports_its_metrics_on_the_nodes_prometheus_endpoint(tmp_path):
    assert os.path.exists(PYTHON), f"{PYTHON} is missing: `make test` installs sluiceway[metrics] there"
    script = SCRIPT.format(port=_free_port(), work=str(tmp_path), names=RECORDED)
    ray_tmp = tempfile.mkdtemp(prefix="sw-metrics-")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=220, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    lines, summary = got["lines"], got["summary"]
    assert _value(lines, "sluiceway_rows_in_total") == summary["rows_in"] == 6000
    assert _value(lines, "sluiceway_epochs_total") == summary["epochs"]
    assert _value(lines, "sluiceway_checkpoints_total") == summary["checkpoints"] >= 3
    assert _value(lines, "sluiceway_rows_out_total") > 0
    assert _value(lines, "sluiceway_state_size_bytes") > 0
    assert _value(lines, "sluiceway_checkpoint_size_bytes") >= 0
    for histogram in ("sluiceway_epoch_latency_seconds", "sluiceway_checkpoint_duration_seconds"):
        assert _value(lines, histogram + "_count") >= summary["checkpoints"]
        assert _value(lines, histogram + "_sum") > 0
    _value(lines, "sluiceway_source_lag_rows")


def test_the_readme_lists_every_metric():
    readme = open(os.path.join(ROOT, "README.md")).read()
    missing = [m.name for m in METRICS if f"`{m.name}`" not in readme]
    assert not missing, f"the README does not list {missing}"
