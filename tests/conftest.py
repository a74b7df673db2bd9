"""Servers the tests start themselves: PostgreSQL (``initdb`` + ``pg_ctl``
as the ``postgres`` user, in a temporary folder, on a free loopback port,
with prepared transactions on), started on first use and stopped at the end."""

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian puts it."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_postgres(*cmd, **kw):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, pg_bin(cmd[0]), *cmd[1:]], check=True, capture_output=True, text=True, **kw)


@contextlib.contextmanager
def postgres_server(max_prepared_transactions: int = 64):
    """A PostgreSQL server of its own; yields its DSN."""
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        pytest.fail("PostgreSQL's initdb and pg_ctl are not installed: `make test` installs them (apt-get install postgresql)")
    folder = tempfile.mkdtemp(prefix="sluiceway-pg-")
    os.chmod(folder, 0o755)
    data = os.path.join(folder, "data")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = _free_port()
    _as_postgres("initdb", "-D", data, "--auth=trust", "-U", "postgres", "--no-sync")
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
               f"-c max_prepared_transactions={max_prepared_transactions}")
    try:
        _as_postgres("pg_ctl", "-D", data, "-o", options, "-l", os.path.join(folder, "log"), "-w", "start")
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run((["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else [])
                       + [pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)
        time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_dsn():
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture
def start_postgres():
    """``with start_postgres(max_prepared_transactions=0) as dsn:`` a server of the test's own."""
    return postgres_server
