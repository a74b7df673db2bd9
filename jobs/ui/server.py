"""The web server of ``sluiceway ui``: standard library HTTP, read-only.

Routes (all ``GET``; anything else is refused with 405):

- ``/``: the jobs page; ``/jobs/NAME``: a job's page;
- ``/api/jobs``: every job, a list of objects with ``name``, ``state``,
  ``epoch``, ``input_rows_per_s``, ``last_checkpoint``, ``restarts`` and
  ``checkpoint_dir``;
- ``/api/jobs/NAME``: that and the job's ``epochs``, ``checkpoints``,
  ``recoveries``, ``runs``, ``rescales``, ``graph`` (stages, tasks and
  their nodes) and ``log_lag`` (per partition of each log topic it reads);
- ``/static/...``: the page's script, style and chart library.

Jobs come from checkpoint roots (``--checkpoint-dir``, any number) and,
when a cluster is given, from its supervisors (each names its checkpoint
dir; their state and placement are live).
"""

from __future__ import annotations

import json
import mimetypes
import os
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from sluiceway.jobs.ui.model import JobWatch, Watches, job_names

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
SUMMARY_KEYS = ("name", "state", "epoch", "input_rows_per_s", "last_checkpoint", "restarts", "checkpoint_dir",
                "parallelism", "live")


class Sources:
    """Where the jobs are: checkpoint roots, and optionally a function that
    lists the cluster's jobs (supervisor summaries, each with its
    ``checkpoint_dir``)."""

    def __init__(self, roots: list[str], cluster_jobs: Callable[[], list[dict]] | None = None):
        self.roots = list(roots)
        self.cluster_jobs = cluster_jobs
        self.watches = Watches()

    def _all(self) -> dict[str, tuple[JobWatch, dict | None]]:
        found: dict[str, tuple[JobWatch, dict | None]] = {}
        for summary in (self.cluster_jobs() if self.cluster_jobs else []):
            if summary.get("checkpoint_dir"):
                found[summary["name"]] = (self.watches.get(summary["checkpoint_dir"], summary["name"]), summary)
        for root in self.roots:
            for name in job_names(root):
                found.setdefault(name, (self.watches.get(root, name), None))
        return found

    def poll_in_background(self, interval_s: float = 1.0) -> threading.Thread:
        """Read every job's new epochs and records every ``interval_s``, page
        open or not, so the charts keep epochs retention prunes meanwhile."""
        def loop():
            while True:
                try:
                    self.jobs()
                except Exception:  # noqa: BLE001 - storage or cluster hiccup: the next round tries again
                    pass
                time.sleep(interval_s)

        thread = threading.Thread(target=loop, name="sluiceway-ui-poll", daemon=True)
        thread.start()
        return thread

    def jobs(self) -> list[dict]:
        return [{k: view.get(k) for k in SUMMARY_KEYS}
                for view in (watch.poll(live) for watch, live in self._all().values())]

    def job(self, name: str) -> dict | None:
        found = self._all().get(name)
        return None if found is None else found[0].poll(found[1])


def _handler(sources: Sources):
    class Handler(BaseHTTPRequestHandler):
        server_version = "sluiceway-ui"

        def log_message(self, format, *args):  # noqa: A002 - quiet: the terminal is the user's
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, doc, status: int = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(doc, default=str).encode(), "application/json")

        def _file(self, name: str) -> None:
            allowed = {os.path.relpath(os.path.join(d, f), STATIC)
                       for d, _, files in os.walk(STATIC) for f in files}
            if name not in allowed:
                self._json({"error": f"no file {name!r}"}, HTTPStatus.NOT_FOUND)
                return
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            with open(os.path.join(STATIC, name), "rb") as f:
                self._send(HTTPStatus.OK, f.read(), kind + ("; charset=utf-8" if kind.startswith("text") else ""))

        def do_GET(self):  # noqa: N802 - http.server's name
            path = urllib.parse.urlparse(self.path).path
            parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
            try:
                if not parts:
                    self._file("index.html")
                elif parts[0] == "jobs" and len(parts) == 2:
                    self._file("job.html")
                elif parts[0] == "static":
                    self._file("/".join(parts[1:]))
                elif parts[:2] == ["api", "jobs"] and len(parts) == 2:
                    self._json(sources.jobs())
                elif parts[:2] == ["api", "jobs"] and len(parts) == 3:
                    view = sources.job(parts[2])
                    if view is None:
                        self._json({"error": f"no job named {parts[2]!r}"}, HTTPStatus.NOT_FOUND)
                    else:
                        self._json(view)
                else:
                    self._json({"error": f"nothing at {path}"}, HTTPStatus.NOT_FOUND)
            except Exception as exc:  # noqa: BLE001 - the page shows the cause; the server stays up
                self._json({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}, HTTPStatus.INTERNAL_SERVER_ERROR)

        def _refuse(self):
            self._json({"error": "sluiceway ui only reads: nothing here stops, scales or submits a job"},
                       HTTPStatus.METHOD_NOT_ALLOWED)

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    return Handler


class UIServer(ThreadingHTTPServer):
    daemon_threads = True


def make_server(sources: Sources, host: str = "127.0.0.1", port: int = 8377) -> UIServer:
    """A server bound to ``host:port`` (port 0: any free one); call
    ``serve_forever`` (or :func:`serve_in_thread`) and ``shutdown``."""
    return UIServer((host, port), _handler(sources))


def serve_in_thread(server: UIServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="sluiceway-ui", daemon=True)
    thread.start()
    return thread


def url(server: UIServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"
