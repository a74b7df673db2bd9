"""Servers the tests start themselves, on first use, stopped at the end:
PostgreSQL (``initdb`` + ``pg_ctl`` as the ``postgres`` user, in a temporary
folder, on a free loopback port, with prepared transactions on), an
S3-protocol server (moto's server mode, on a free loopback port), and one
embedded Ray cluster for the whole session."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from sluiceway.jobs.testing import postgres_server  # noqa: F401 - a server per test where one is needed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_dsn():
    with postgres_server() as server:
        yield server.dsn


@pytest.fixture
def start_postgres():
    """``with start_postgres(max_prepared_transactions=0) as server:`` a server of the test's own."""
    return postgres_server


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on a free loopback port; yields its endpoint URL.
    Clients find it through ``AWS_ENDPOINT_URL`` (s3fs and delta-rs both read it)."""
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="sluiceway-moto-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"moto's S3 server did not start: {open(log.name).read()[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log.name)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """One S3-protocol server for the session, in this process's environment
    (so Ray workers started afterwards find it too)."""
    previous = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    with s3_server() as endpoint:
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        try:
            yield endpoint
        finally:
            for k, v in previous.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A new bucket of the session's S3 server: ``s3://<name>``."""
    from sluiceway.checkpoint.storage import open_filesystem

    name = f"sluiceway-{uuid.uuid4().hex[:12]}"
    fs, _ = open_filesystem(f"s3://{name}")
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One embedded Ray cluster for the session, in a session folder of its
    own that is removed afterwards. It starts after the S3 server, so that
    its workers inherit where to find it."""
    import ray

    from sluiceway.cluster.local import init_embedded

    previous = os.environ.get("RAY_TMPDIR")
    tmpdir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sluiceway-ray-")
    try:
        init_embedded(num_cpus=2)
        yield
    finally:
        ray.shutdown()
        if previous is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server():
    """One ``redis-server`` for the session (tests use keys of their own)."""
    from sluiceway.jobs.testing import redis_process, running

    with running(redis_process()) as server:
        yield server


@pytest.fixture(scope="session")
def nats_server():
    """One ``nats-server -js`` for the session (tests use streams of their own)."""
    from sluiceway.jobs.testing import nats_process, running

    with running(nats_process()) as server:
        yield server


@pytest.fixture(scope="session")
def rabbitmq_server():
    """One RabbitMQ node for the session (it takes seconds to start; tests use queues of their own)."""
    from sluiceway.jobs.testing import rabbitmq_process, running

    with running(rabbitmq_process()) as server:
        yield server
