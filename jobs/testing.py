"""Helpers for testing jobs, shipped so users can test their own.

- :func:`run_local` runs a flow in this process, without Ray, epoch by epoch,
  through the same controller, task runner and barrier alignment the cluster uses.
- :class:`CollectSink` keeps committed rows in memory (``run_local`` only).
- :func:`compare_exactly_once` compares committed output with an independent
  computation and counts duplicates and missing rows.
- :class:`FlakyFileSystem` (``sluiceway-flaky://``) fails on demand, to test
  how a job rides out a storage outage.
- :func:`postgres_server` starts a throwaway PostgreSQL (``initdb`` +
  ``pg_ctl``, as the ``postgres`` user when run as root) on a free loopback
  port, for tests and benchmarks of PostgreSQL sinks.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from sluiceway.cluster.graph import plan as physical_plan
from sluiceway.cluster.inprocess import InProcessDriver
from sluiceway.operators.sinks import Sink, SinkContext, SinkWriter


class _CollectWriter(SinkWriter):
    def __init__(self, sink: "CollectSink", context: SinkContext):
        self.sink, self.context = sink, context

    def precommit(self, epoch: int, table: pa.Table | None) -> dict:
        key = f"{epoch}/{self.context.subtask}"
        if table is not None and table.num_rows:
            self.sink._pending[key] = table
        return {"subtask": self.context.subtask, "key": key}


class CollectSink(Sink):
    """Committed rows in memory, for :func:`run_local` only (on Ray each task
    would hold its own copy: use :class:`~sluiceway.operators.sinks.ParquetSink`)."""

    kind = "collect"
    in_process_only = True

    def __init__(self):
        self._pending: dict[str, pa.Table] = {}
        self._committed: dict[int, list[pa.Table]] = {}

    def open(self, context: SinkContext) -> SinkWriter:
        return _CollectWriter(self, context)

    def commit(self, epoch: int, handles: list[dict]) -> None:
        if epoch in self._committed:
            return
        ordered = sorted(handles, key=lambda h: h["subtask"])
        self._committed[epoch] = [self._pending.pop(h["key"]) for h in ordered if h["key"] in self._pending]

    def table(self) -> pa.Table:
        tables = [t for e in sorted(self._committed) for t in self._committed[e]]
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    def rows(self) -> list[dict]:
        return self.table().to_pylist()


def run_local(flow, *, parallelism: int | None = None, max_records_per_epoch: int = 1_000_000,
              max_epochs: int = 10_000, start_time: float = 0.0, trigger_s: float = 1.0, executors: int = 1) -> int:
    """Run ``flow`` in this process until its bounded sources are exhausted.
    Returns the number of epochs run. Sources must be bounded. Epoch ``n``
    counts as planned at ``start_time + n * trigger_s`` (seconds since the
    Unix epoch): what ingestion time and idle partitions go by.

    The job controller, the task runner and the barrier alignment are the
    ones a run on Ray uses (:mod:`sluiceway.cluster.inprocess`); a failing
    step raises its exception at once. ``executors``: how many executors
    the tasks are spread over (their batches to each other go through a
    queue, as they go through Ray calls on a cluster)."""
    plan = physical_plan(flow.graph, parallelism)
    driver = InProcessDriver(plan, max_records_per_epoch=max_records_per_epoch, max_epochs=max_epochs,
                             start_time=start_time, trigger_s=trigger_s, executors=executors)
    return driver.run()


@dataclass(frozen=True)
class Verdict:
    """How committed output compares with what it should be."""

    rows: int
    expected_rows: int
    duplicates: int
    missing: int
    unexpected: int

    @property
    def exactly_once(self) -> bool:
        return self.duplicates == 0 and self.missing == 0 and self.unexpected == 0

    def line(self) -> str:
        return (
            f"exactly-once: {'yes' if self.exactly_once else 'no'}, rows {self.rows}, expected {self.expected_rows}, "
            f"duplicates {self.duplicates}, missing {self.missing}, unexpected {self.unexpected}"
        )


def compare_exactly_once(actual: pa.Table, expected: pa.Table) -> Verdict:
    """Compare two tables as multisets of rows (column order and row order ignored)."""
    columns = sorted(expected.column_names)
    if actual.num_rows and sorted(actual.column_names) != columns:
        raise ValueError(f"committed columns {sorted(actual.column_names)} differ from expected {columns}")
    got = Counter(tuple(r[c] for c in columns) for r in actual.select(columns).to_pylist()) if actual.num_rows else Counter()
    want = Counter(tuple(r[c] for c in columns) for r in expected.select(columns).to_pylist())
    duplicates = sum(got[k] - want[k] for k in got if k in want and got[k] > want[k])
    missing = sum(want[k] - got.get(k, 0) for k in want if got.get(k, 0) < want[k])
    unexpected = sum(n for k, n in got.items() if k not in want)
    return Verdict(actual.num_rows, expected.num_rows, duplicates, missing, unexpected)


def wait_for(condition, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``condition()`` until it returns a truthy value; raise on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        time.sleep(interval_s)


class FlakyFileSystem(LocalFileSystem):
    """A local filesystem that fails while an outage is declared, for testing
    how a job rides out storage trouble. URLs: ``sluiceway-flaky:///path``.

    An outage is a file ``SLUICEWAY_OUTAGE.json`` in any folder above the
    path, ``{"until": <unix time>, "error": "..."}``: until then every call
    raises ``OSError`` (ENOSPC: no space left on device). Every process sees
    the same outage (Ray workers too), since it lives on disk; the protocol
    is registered through the package's ``fsspec.specs`` entry point.
    """

    protocol = ("sluiceway-flaky",)
    OUTAGE_FILE = "SLUICEWAY_OUTAGE.json"

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("sluiceway-flaky://"):
            path = path[len("sluiceway-flaky://"):]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"sluiceway-flaky://{self._strip_protocol(name)}"

    @classmethod
    def declare_outage(cls, folder: str, seconds: float, error: str = "No space left on device") -> None:
        """Make every path below ``folder`` fail for ``seconds`` from now."""
        doc = {"until": time.time() + seconds, "error": error}
        tmp = os.path.join(folder, f".{cls.OUTAGE_FILE}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, os.path.join(folder, cls.OUTAGE_FILE))

    @classmethod
    def _check(cls, path) -> None:
        folder = os.path.dirname(str(path))
        while True:
            marker = os.path.join(folder, cls.OUTAGE_FILE)
            if os.path.exists(marker):
                with open(marker) as f:
                    doc = json.load(f)
                if time.time() < doc["until"]:
                    raise OSError(errno.ENOSPC, f"{doc['error']} (simulated outage)", str(path))
                return
            parent = os.path.dirname(folder)
            if parent == folder:
                return
            folder = parent


def _guarded(name):
    method = getattr(LocalFileSystem, name)

    def guarded(self, path, *args, **kwargs):
        FlakyFileSystem._check(self._strip_protocol(path))
        return method(self, path, *args, **kwargs)

    guarded.__name__ = name
    return guarded


for _name in ("_open", "cat_file", "pipe_file", "ls", "info", "mv", "rm", "rm_file", "find", "makedirs",
              "exists", "size", "cp_file", "touch"):
    setattr(FlakyFileSystem, _name, _guarded(_name))


class TaskKiller:
    """An ``on_event`` for :func:`~sluiceway.jobs.runner.run` that kills the
    actor of ``task`` (``"by_user[1]"``) once epoch ``after_epoch`` completed;
    ``killed`` says whether it happened."""

    def __init__(self, task: str, after_epoch: int):
        self.task, self.after_epoch = task, after_epoch
        self.names: dict[str, str] = {}
        self.killed = threading.Event()
        self.killed_after: int | None = None

    def __call__(self, event: dict) -> None:
        import ray

        if event["type"] in ("started", "recovered"):
            self.names.update(event["actor_names"])
        if event["type"] == "epoch" and event["epoch"] >= self.after_epoch and not self.killed.is_set():
            self.killed.set()
            self.killed_after = event["epoch"]
            ray.kill(ray.get_actor(self.names[self.task]), no_restart=True)


# ------------------------------------------------ a throwaway PostgreSQL
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


class PostgresServer:
    """A PostgreSQL server of its own, in a temporary folder: ``start()``,
    ``stop()`` (and start again: the same data, the same port), ``remove()``."""

    def __init__(self, max_prepared_transactions: int = 64):
        if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
            raise RuntimeError("PostgreSQL's initdb and pg_ctl are not installed: `make test` installs them "
                               "(apt-get install postgresql)")
        self.folder = tempfile.mkdtemp(prefix="sluiceway-pg-")
        os.chmod(self.folder, 0o755)
        self.data = os.path.join(self.folder, "data")
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self.port = _free_port()
        self.max_prepared_transactions = max_prepared_transactions
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        _as_postgres("initdb", "-D", self.data, "--auth=trust", "-U", "postgres", "--no-sync")

    def start(self) -> "PostgresServer":
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c max_prepared_transactions={self.max_prepared_transactions} "
                   "-c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20")
        _as_postgres("pg_ctl", "-D", self.data, "-o", options, "-l", os.path.join(self.folder, "log"), "-w", "start")
        return self

    def stop(self) -> None:
        subprocess.run((["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else [])
                       + [pg_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"], capture_output=True)

    def remove(self) -> None:
        self.stop()
        time.sleep(0.2)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(max_prepared_transactions: int = 64):
    """A PostgreSQL server of its own; yields the :class:`PostgresServer` (``.dsn``)."""
    server = PostgresServer(max_prepared_transactions)
    try:
        yield server.start()
    finally:
        server.remove()


# ------------------------------------------------ brokers: Redis, NATS
class ServerProcess:
    """A server program of its own on a free loopback port, in a temporary
    folder: ``start()``, ``stop()`` (and start again: the same folder, the
    same port, so the same data), ``remove()``. ``command(port, folder)``
    makes its command line."""

    def __init__(self, name: str, program: str, command, package: str):
        if shutil.which(program) is None:
            raise RuntimeError(f"{program} is not installed: `make test` installs it (apt-get install {package})")
        self.name, self.command = name, command
        self.folder = tempfile.mkdtemp(prefix=f"sluiceway-{name}-")
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> "ServerProcess":
        log = open(os.path.join(self.folder, "log"), "ab")
        self.proc = subprocess.Popen(self.command(self.port, self.folder), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.folder, start_new_session=True,
                                     env={**os.environ, **getattr(self, "env", {})})
        deadline = time.time() + timeout_s
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None or time.time() > deadline:
                with open(os.path.join(self.folder, "log"), "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"{self.name} did not start on port {self.port}: {tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and what it started (Erlang's children)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def redis_process() -> ServerProcess:
    """``redis-server`` with its data (an append-only file) in its folder."""
    server = ServerProcess("redis", "redis-server", lambda port, folder: [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", folder, "--appendonly", "yes",
        "--appendfsync", "no", "--save", "", "--protected-mode", "no"], "redis-server")
    server.url = f"redis://127.0.0.1:{server.port}/0"
    return server


def nats_process() -> ServerProcess:
    """``nats-server -js`` with its JetStream store in its folder."""
    server = ServerProcess("nats", "nats-server", lambda port, folder: [
        "nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", folder], "nats-server")
    server.url = f"nats://127.0.0.1:{server.port}"
    return server


@contextlib.contextmanager
def running(server: ServerProcess):
    """``with running(redis_process()) as server:`` started, then removed."""
    try:
        yield server.start()
    finally:
        server.remove()


def rabbitmq_process() -> ServerProcess:
    """``rabbitmq-server`` as a node of its own: its own node name, ports,
    Erlang cookie and port mapper (``ERL_EPMD_PORT``), data and logs in its
    folder; AMQP on ``.port``, user ``guest``/``guest``."""
    if shutil.which("rabbitmq-server") is None and not os.path.exists("/usr/lib/rabbitmq/bin/rabbitmq-server"):
        raise RuntimeError("rabbitmq-server is not installed: `make test` installs it (apt-get install rabbitmq-server)")
    program = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's /usr/sbin wrapper insists on the rabbitmq user
    server = ServerProcess("rabbitmq", "sh", lambda port, folder: ["sh", "-c", f"exec {program}"], "rabbitmq-server")
    dist, epmd = _free_port(), _free_port()
    folder = server.folder
    with open(os.path.join(folder, "rabbitmq.conf"), "w") as f:
        f.write("loopback_users = none\nlisteners.tcp.default = %d\n" % server.port)
    with open(os.path.join(folder, "enabled_plugins"), "w") as f:
        f.write("[].\n")
    server.env = {
        "HOME": folder, "RABBITMQ_NODENAME": f"sluiceway{server.port}@localhost", "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(server.port), "RABBITMQ_DIST_PORT": str(dist), "ERL_EPMD_PORT": str(epmd),
        "RABBITMQ_MNESIA_BASE": os.path.join(folder, "mnesia"), "RABBITMQ_LOG_BASE": os.path.join(folder, "logs"),
        "RABBITMQ_CONFIG_FILE": os.path.join(folder, "rabbitmq"), "RABBITMQ_ENABLED_PLUGINS_FILE":
        os.path.join(folder, "enabled_plugins"), "RABBITMQ_PID_FILE": os.path.join(folder, "pid"),
        "RABBITMQ_LOGS": os.path.join(folder, "logs", "rabbit.log"), "RABBITMQ_USE_LONGNAME": "false",
    }
    server.url = f"amqp://guest:guest@127.0.0.1:{server.port}/%2F"

    def stop() -> None:  # the node, then its own port mapper
        ServerProcess.stop(server)
        subprocess.run(["epmd", "-kill"], env={**os.environ, "ERL_EPMD_PORT": str(epmd)}, capture_output=True)

    server.stop = stop
    return server


class StopWhen:
    """Stops a job (``on_started=stopper.started``) once ``ready()`` holds,
    checked every ``every_s`` after ``after`` is set (a producer that
    finished), or at ``deadline_s`` after that regardless, so that a job on
    unbounded input ends either way and the test's own checks decide."""

    def __init__(self, ready, after: threading.Event, every_s: float = 0.3, deadline_s: float = 90.0):
        self.ready, self.after, self.every_s, self.deadline_s = ready, after, every_s, deadline_s
        self.coordinators: list = []
        self.met: bool | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def started(self, coordinator) -> None:
        self.coordinators.append(coordinator)
        if not self._thread.is_alive() and self.met is None:
            self._thread.start()

    def _watch(self) -> None:
        self.after.wait()
        deadline = time.time() + self.deadline_s
        while time.time() < deadline:
            try:
                if self.ready():
                    self.met = True
                    break
            except Exception:  # noqa: BLE001 - not ready yet (no output at all, say)
                pass
            time.sleep(self.every_s)
        else:
            self.met = False
        self.coordinators[-1].stop.remote(False)
