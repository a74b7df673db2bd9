"""A user's mistake on a real run gives a first line that names it (issue
23): a helper module beside the job under ``run``, a bounded job under the
CLI stopping by itself, a server wait bounded by ``--storage-deadline`` and
stopped by Ctrl-C, a bucket that does not exist refused, not created."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pyarrow as pa
import pytest

from sluiceway.checkpoint.errors import NoSuchBucketError, StorageError
from sluiceway.checkpoint.storage import open_filesystem
from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.cli import main as cli
from sluiceway.operators.sinks import ParquetSink, SinkContext, read_committed
from sluiceway.operators.sources import ListSource

pytestmark = pytest.mark.timeout(180)
SLUICEWAY = os.path.join(os.path.dirname(sys.executable), "sluiceway")


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_job(folder, port: int) -> str:
    job = folder / "to_postgres.py"
    job.write_text("from sluiceway.jobs import Dataflow\n"
                   "from sluiceway.operators.connectors.postgres import PostgresSink\n"
                   "from sluiceway.operators.sources import ListSource\n"
                   "flow = Dataflow('to_postgres')\n"
                   "flow.source(ListSource([{'n': 1}]), name='rows')"
                   f".sink(PostgresSink('host=127.0.0.1 port={port} dbname=shop user=app', 'orders'), name='out')\n")
    return str(job)


@pytest.mark.usefixtures("ray_cluster")
def test_a_helper_module_beside_the_job_imports_under_run(tmp_path, capsys):
    helper = f"helper_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text(
        "import pyarrow.compute as pc\n\n"
        "def doubled(batch):\n    return batch.set_column(0, 'n', pc.multiply(batch['n'], 2))\n")
    job = tmp_path / "job.py"
    job.write_text("from sluiceway.jobs import Dataflow\n"
                   "from sluiceway.operators.sinks import ParquetSink\n"
                   "from sluiceway.operators.sources import ListSource\n"
                   f"import {helper}\n"
                   "flow = Dataflow('helped')\n"
                   f"flow.source(ListSource([{{'n': i}} for i in range(5)])).map_batches({helper}.doubled)"
                   f".sink(ParquetSink({str(tmp_path / 'out')!r}))\n")
    assert cli(["run", str(job), "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0, capsys.readouterr().err
    assert sorted(read_committed(str(tmp_path / "out")).column("n").to_pylist()) == [0, 2, 4, 6, 8]


@pytest.mark.usefixtures("ray_cluster")
def test_a_bounded_job_under_the_cli_stops_by_itself_and_says_so(tmp_path, capsys):
    job = tmp_path / "job.py"
    job.write_text("from sluiceway.jobs import Dataflow\n"
                   "from sluiceway.operators.sinks import ParquetSink\n"
                   "from sluiceway.operators.sources import ListSource\n"
                   "flow = Dataflow('bounded')\n"
                   f"flow.source(ListSource([{{'n': i}} for i in range(10)]), name='rows')"
                   f".sink(ParquetSink({str(tmp_path / 'out')!r}))\n")
    ckpt = str(tmp_path / "ckpt")
    assert cli(["run", str(job), "--checkpoint-dir", ckpt, "--trigger", "0.05"]) == 0  # no --epochs, no --until-idle
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"job 'bounded': checkpoints in {ckpt}; every source is bounded: it stops once they are read "
                      "to the end, after a final checkpoint")
    assert out[-1].startswith("done (idle): 1 epochs, 10 rows in, 10 rows out"), out
    assert read_committed(str(tmp_path / "out")).num_rows == 10


@pytest.mark.usefixtures("ray_cluster")
def test_storage_deadline_bounds_the_wait_for_a_server(tmp_path, capsys):
    port = closed_port()
    started = time.time()
    assert cli(["run", postgres_job(tmp_path, port), "--checkpoint-dir", str(tmp_path / "ckpt"),
                "--storage-deadline", "2"]) == 1
    assert time.time() - started < 30  # not the 120 s a connector waited on its own
    captured = capsys.readouterr()
    waiting = [line for line in captured.out.splitlines() if line.startswith("WAITING")]
    assert waiting and re.fullmatch(  # the sink claims its table as the run opens, or the coordinator aborts
        rf"WAITING \((sink out|coordinator)\): cannot connect to PostgreSQL at 127.0.0.1:{port} \(database shop\): "
        rf'OperationalError: connection failed: connection to server at "127.0.0.1", port {port} failed: '
        r"Connection refused; retrying for up to 2 s", waiting[0]), waiting
    err = captured.err.splitlines()
    assert len(err) == 1, err  # no traceback of sluiceway's or Ray's frames
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port} (database shop)" in err[0]
    assert "past the 2 s connect deadline" in err[0], err


def _ray_processes_of(tmpdir: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tmpdir.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def redis_job(folder, port: int) -> str:
    job = folder / "from_redis.py"
    job.write_text("import pyarrow as pa\n"
                   "from sluiceway.jobs import Dataflow\n"
                   "from sluiceway.operators.sinks import ParquetSink\n"
                   "from sluiceway.operators.sources import RedisStreamSource\n"
                   "flow = Dataflow('from_redis')\n"
                   f"clicks = RedisStreamSource('redis://127.0.0.1:{port}', 'clicks', pa.schema([('n', pa.int64())]))\n"
                   f"flow.source(clicks, name='clicks').sink(ParquetSink({str(folder / 'out')!r}))\n")
    return str(job)


@pytest.mark.parametrize("job, who, server", [
    (postgres_job, "sink out", "PostgreSQL at 127.0.0.1:{port} (database shop): OperationalError: connection failed: "
                               'connection to server at "127.0.0.1", port {port} failed: Connection refused'),
    (redis_job, "coordinator", "Redis at 127.0.0.1:{port}: ConnectionError: Error 111 connecting to 127.0.0.1:{port}. "
                               "Connection refused."),
], ids=["sink-claim-in-the-driver", "source-in-the-coordinator"])
def test_ctrl_c_stops_a_job_that_waits_for_a_server_at_once(tmp_path, job, who, server):
    """``sluiceway run`` as a user runs it, its own embedded Ray in a private
    folder; Ctrl-C to the whole process group, as a terminal sends it, while
    the run opens (a sink claims its table) or while the job runs (the
    coordinator binds a source)."""
    port = closed_port()
    server = server.format(port=port)
    ray_tmp = tempfile.mkdtemp(prefix="sluiceway-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {**os.environ, "SLUICEWAY_HOME": str(tmp_path / "home"), "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([SLUICEWAY, "run", job(tmp_path, port), "--checkpoint-dir", str(tmp_path / "ckpt"),
                             "--embedded"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        lines = []
        while not (lines and lines[-1].startswith("WAITING")):
            line = proc.stdout.readline()
            assert line, f"sluiceway run ended before it waited: {lines} {proc.stderr.read()}"
            lines.append(line)
        assert lines[-1].startswith(f"WAITING ({who}): cannot "), lines
        interrupted = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.time() - interrupted
        assert proc.returncode == 130, (out, err)
        assert err.splitlines() == [f"sluiceway: stopped by Ctrl-C: the job was waiting ({who}): cannot "
                                    f"{lines[-1].split(': cannot ', 1)[1].split('; retrying')[0]}; nothing is lost: "
                                    "running the job again continues from its last checkpoint"], err
        assert server in err, err
        assert took < 5, f"exited {took:.1f} s after Ctrl-C"  # ~2 s with Ray up: most of it is Ray's own shutdown
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _ray_processes_of(ray_tmp):  # none should be left; a failed test leaves none either
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.usefixtures("ray_cluster")
def test_a_bucket_that_does_not_exist_is_refused_not_created(s3_endpoint, tmp_path):
    bucket = f"typo-{uuid.uuid4().hex[:8]}"
    flow = Dataflow("typo")
    flow.source(ListSource([{"n": 1}])).sink(ParquetSink(str(tmp_path / "out")))
    with pytest.raises(StorageError) as err:
        run(flow, f"s3://{bucket}/ckpt")
    assert str(err.value) == (f"checkpoint dir 's3://{bucket}/ckpt' is not usable: bucket {bucket!r} does not exist "
                              f"(s3://{bucket}/ckpt/typo): create it, or fix the name; sluiceway does not create "
                              "buckets")
    to_typo = Dataflow("to_typo")
    to_typo.source(ListSource([{"n": 1}])).sink(ParquetSink(f"s3://{bucket}/out"))
    with pytest.raises(NoSuchBucketError) as err:  # refused as the run opens, before anything runs
        run(to_typo, str(tmp_path / "ckpt"))
    assert str(err.value).startswith(f"bucket {bucket!r} does not exist (s3://{bucket}/out"), str(err.value)
    sink = ParquetSink(f"s3://{bucket}/out")  # and where a task writes
    writer = sink.open(SinkContext("out", 0, 1, "typo"))
    with pytest.raises(NoSuchBucketError, match=f"^bucket {bucket!r} does not exist"):
        writer.precommit(1, pa.table({"n": [1]}))
    fs, _ = open_filesystem(f"s3://{bucket}")
    fs.invalidate_cache()
    assert not fs.exists(bucket)
