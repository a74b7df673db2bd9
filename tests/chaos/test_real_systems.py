"""End to end into real systems with a worker node killed mid-run: the log
example (a producer appending to a log topic while the job reads it; per
user totals upserted into PostgreSQL, every kept click appended to Delta
Lake), compared with an independent computation. Once with everything on
local disk, once with the log, the checkpoints and the Delta table on an
S3-protocol server.

Each run is its own process on its own cluster (RAY_NOTES.md)."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, tempfile, threading
import deltalake, psycopg, pyarrow as pa
from sluiceway.jobs.demo import kill_nodes_during
from sluiceway.jobs.examples import clicks, log_clicks, produce_clicks
from sluiceway.jobs.testing import compare_exactly_once

root, dsn, rows = {root!r}, {dsn!r}, {rows}
log_dir, ckpt, output = root + "/log", root + "/ckpt", root + "/out"
produce_clicks.topic(log_dir)
producer = threading.Thread(target=produce_clicks.produce, args=(log_dir, rows, 2000.0, 500))
start = lambda event: event["type"] == "started" and not producer.is_alive() and producer.start()
flow = log_clicks.build(log_dir, dsn, output, rows, name={name!r})
r = kill_nodes_during(flow, ckpt, kill_after_epoch=3, checkpoint_every=2, trigger_s=0.5, on_event=start,
                      log=lambda l: print(l, file=sys.stderr))
producer.join()
if "error" not in r:
    with psycopg.connect(dsn) as conn:
        got = conn.execute("SELECT user_id, event_id_count, cents_sum FROM user_totals").fetchall()
        r["prepared"] = [g for (g,) in conn.execute("SELECT gid FROM pg_prepared_xacts")]
    totals = pa.table({{c: [row[i] for row in got] for i, c in enumerate(["user_id", "event_id_count", "cents_sum"])}})
    r["totals"] = compare_exactly_once(totals, clicks.expected_totals(rows)).line()
    raw = deltalake.DeltaTable(output + "/clicks_delta").to_pyarrow_table()
    r["clicks"] = compare_exactly_once(raw, clicks.expected_clicks(rows)).line()
print(json.dumps(r))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_log_to_postgres_and_delta_through_a_node_kill(storage, postgres_dsn, tmp_path, request):
    root = request.getfixturevalue("s3_bucket") if storage == "s3" else str(tmp_path)
    name = f"log_clicks_{storage}"
    with __import__("psycopg").connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS user_totals")
    script = SCRIPT.format(root=root, dsn=postgres_dsn, rows=12_000, name=name)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in r, r.get("error")
    assert len(r["kills"]) == 1 and r["summary"]["restarts"] >= 1 and r["summary"]["stopped"] == "idle"
    assert r["totals"].startswith("exactly-once: yes"), r["totals"]
    assert r["clicks"].startswith("exactly-once: yes"), r["clicks"]
    assert r["prepared"] == []
