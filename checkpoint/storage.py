"""One object owns every path of a job's checkpoint storage.

>>> s = JobStorage("memory://doc-root", "clicks")
>>> s.offsets_path(12)
'/doc-root/clicks/offsets/0000000012.json'
>>> s.state_path(12, "count", 1, "f3g0")
'/doc-root/clicks/checkpoints/0000000012/state/count/1-f3g0.arrow'

Layout (docs/architecture.md)::

    <root>/<job>/
      job.json               job id, graph, parallelism, key groups, versions
      lease/<fencing>.json   the owner of the job: the highest number wins
      history/<time>-f<fencing>-<seq>-<kind>.json   the job's timeline, kept past retention
      offsets/<epoch>.json   planned ranges per source partition (written first)
      commits/<epoch>.json   epoch finished and its output durable
      checkpoints/<id>/
        state/<step>/<subtask>-<attempt>.arrow   Arrow IPC, one batch per key group
        MANIFEST.json        written last
      sources/<step>/...     a source's own bookkeeping (which files a file source found, in order)

Every write of a JSON document goes to a temporary name first and is then
moved into place, so a reader never sees half a document. No method turns a
storage error into "nothing there": a missing file is ``None`` or an empty
list, anything else raises :class:`StorageError`.

Storage outages are pauses, not crashes: a failed call is retried with a
growing backoff until :class:`StorageRetry`'s deadline, and ``on_wait`` hears
when storage fails and when it is back. Only past the deadline does the
error reach the caller, with the cause in its first line.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from sluiceway.checkpoint.errors import NoSuchBucketError, StorageError

_EPOCH_DIGITS = 10


def _epoch_name(n: int) -> str:
    return f"{n:0{_EPOCH_DIGITS}d}"


@dataclass(frozen=True)
class StorageRetry:
    """How long storage calls are retried before they fail. Seconds."""

    deadline_s: float = 120.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def __post_init__(self):
        if self.deadline_s < 0 or self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"storage retry needs deadline >= 0 and 0 < initial backoff <= max backoff, got {self}"
            )


NO_RETRY = StorageRetry(deadline_s=0.0)

WaitListener = Callable[[str, str], None]  # ("waiting" | "resumed", message)


def call_with_retry(what: str, url: str, fn, retry: StorageRetry, on_wait: WaitListener | None = None, *,
                    retry_on: type[BaseException] | tuple = Exception,
                    give_up: Callable[[str, float], Exception] | None = None):
    """Run ``fn()``; when it raises ``retry_on``, retry with backoff until
    ``retry.deadline_s``. ``FileNotFoundError`` and ``FileExistsError`` are
    answers, not failures: they pass through at once. Past the deadline,
    ``give_up(cause, waited_s)`` makes the error to raise (default: a
    :class:`StorageError`)."""
    started = None
    backoff = retry.initial_backoff_s
    while True:
        try:
            result = fn()
        except (FileNotFoundError, FileExistsError):
            raise
        except retry_on as exc:  # re-raised with the path and the cause, in one line (details: the chained error)
            cause = f"cannot {what} {url}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            now = time.monotonic()
            if started is None:
                started = now
                if retry.deadline_s > 0 and on_wait is not None:
                    on_wait("waiting", cause)
            if now - started >= retry.deadline_s:
                if give_up is not None:
                    raise give_up(cause, now - started) from exc
                if retry.deadline_s > 0:
                    raise StorageError(
                        f"{cause} (storage kept failing for {now - started:.0f} s, past the "
                        f"{retry.deadline_s:g} s storage deadline)"
                    ) from exc
                raise StorageError(f"{cause}. Check that the checkpoint dir is a folder you can read and write") from exc
            time.sleep(min(backoff, max(0.0, started + retry.deadline_s - now)))
            backoff = min(retry.max_backoff_s, backoff * 2)
            continue
        if started is not None and on_wait is not None and retry.deadline_s > 0:
            on_wait("resumed", f"{url} answered again after {time.monotonic() - started:.1f} s ({what})")
        return result



def arrow_buffer(data: bytes):
    """``data`` copied into memory that Arrow owns (a ``pyarrow.Buffer``), to read files from.

    A buffer that wraps Python bytes is released by whichever thread drops
    it last; when that is one of Arrow's reader threads it must take the
    GIL, and if the interpreter is exiting by then the process aborts.
    Arrow's own memory is freed without the GIL.

    >>> arrow_buffer(b"abc").to_pybytes()
    b'abc'
    """
    import pyarrow as pa

    out = pa.BufferOutputStream()
    out.write(data)
    return out.getvalue()


def absolute_url(url: str) -> str:
    """A local path made absolute here, so that a process with another
    working directory (a Ray worker) finds the same folder; URLs of other
    filesystems are returned as they are.

    >>> import os
    >>> absolute_url("ckpt") == os.path.join(os.getcwd(), "ckpt"), absolute_url("s3://bucket/x")
    (True, 's3://bucket/x')
    """
    if "://" in url or "::" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def open_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URL or local path to ``(filesystem, path)`` with a clear error."""
    try:
        # No listings cache: other processes write here, and a cached listing would not show it.
        fs, path = url_to_fs(url, use_listings_cache=False)
    except (ValueError, ImportError) as exc:
        raise StorageError(
            f"cannot open storage {url!r}: {exc}. Use a local path or an fsspec URL "
            "such as file:///data/ckpt, memory://name or s3://bucket/prefix"
        ) from exc
    return fs, path.rstrip("/") or "/"


_BUCKETS_FOUND: set[tuple[str, str]] = set()  # (protocol, bucket): checked once per process


def check_bucket(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """On an object store (S3, GCS, Azure: filesystems with buckets), raise
    :class:`NoSuchBucketError` when the bucket of ``path`` does not exist;
    elsewhere do nothing. Any other failure of the check is raised as it is
    (an unreachable endpoint is not a missing bucket)."""
    if not hasattr(fs, "split_path"):  # folders, no buckets
        return
    bucket = fs.split_path(path)[0]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if not bucket or (protocol, bucket) in _BUCKETS_FOUND:
        return
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise NoSuchBucketError(f"bucket {bucket!r} does not exist ({protocol}://{path}): create it, or fix the "
                                "name; sluiceway does not create buckets") from None
    _BUCKETS_FOUND.add((protocol, bucket))


def make_folder(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """``folder`` and its parents, made where folders exist; on an object
    store only its bucket is checked: ``makedirs`` there would create a
    missing bucket, and a mistyped one must be refused, not made."""
    if hasattr(fs, "split_path"):
        check_bucket(fs, folder)
    else:
        fs.makedirs(folder, exist_ok=True)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` only if nothing is there: raises
    ``FileExistsError`` otherwise. Readers never see half the data (on local
    disks: a hard link of a finished temporary file; elsewhere the
    filesystem's exclusive create)."""
    make_folder(fs, posixpath.dirname(path))
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
        return
    with fs.open(path, "xb") as f:
        f.write(data)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then move it into place."""
    make_folder(fs, posixpath.dirname(path))
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


class JobStorage:
    """The storage of one job under ``<root>/<job>``: paths, logs and documents."""

    def __init__(self, root: str, job: str, retry: StorageRetry = StorageRetry()):
        if not root or not root.strip():
            raise StorageError("the checkpoint dir is empty: give a path or fsspec URL (default ./.sluiceway)")
        if not job or "/" in job or job.startswith("."):
            raise StorageError(f"job name {job!r} cannot be used as a folder name; use letters, digits, '-' or '_'")
        self.root_url = absolute_url(root)
        self.job = job
        self.retry = retry
        self.on_wait: WaitListener | None = None  # set where the job runs; never pickled
        self.fs, root_path = open_filesystem(self.root_url)
        self.base = posixpath.join(root_path, job)

    def __repr__(self) -> str:
        return f"JobStorage({self.root_url!r}, {self.job!r})"

    # ----------------------------------------------------------------- paths
    @property
    def job_path(self) -> str:
        return posixpath.join(self.base, "job.json")

    def offsets_path(self, epoch: int) -> str:
        return posixpath.join(self.base, "offsets", _epoch_name(epoch) + ".json")

    def commit_path(self, epoch: int) -> str:
        return posixpath.join(self.base, "commits", _epoch_name(epoch) + ".json")

    def history_path(self, name: str) -> str:
        return posixpath.join(self.base, "history", name)

    def history_names(self) -> list[str]:
        """Every history record's file name, oldest first (names sort by time)."""
        folder = posixpath.join(self.base, "history")
        try:
            names = self._call("list", folder, self.fs.ls, folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(n) for n in names if n.endswith(".json"))

    def lease_path(self, fencing: int) -> str:
        return posixpath.join(self.base, "lease", _epoch_name(fencing) + ".json")

    def checkpoint_path(self, checkpoint_id: int) -> str:
        return posixpath.join(self.base, "checkpoints", _epoch_name(checkpoint_id))

    def manifest_path(self, checkpoint_id: int) -> str:
        return posixpath.join(self.checkpoint_path(checkpoint_id), "MANIFEST.json")

    def retired_path(self, checkpoint_id: int) -> str:
        return posixpath.join(self.checkpoint_path(checkpoint_id), "RETIRED.json")

    def source_path(self, step: str, *parts: str) -> str:
        """A path of a source's own bookkeeping, under ``sources/<step>/``."""
        return posixpath.join(self.base, "sources", step, *parts)

    def numbered(self, folder: str, suffix: str) -> list[int]:
        """The numbers naming the files ``<n><suffix>`` in ``folder`` (a path), sorted."""
        return self._list_numbered(posixpath.relpath(folder, self.base), suffix)

    def state_path(self, checkpoint_id: int, step: str, subtask: int, attempt: str) -> str:
        """One state file; ``attempt`` (fencing number and generation) makes
        the name unique to the run that wrote it."""
        return posixpath.join(self.checkpoint_path(checkpoint_id), "state", step, f"{subtask}-{attempt}.arrow")

    def relative(self, path: str) -> str:
        """A path as recorded in manifests: relative to the checkpoint folder's parent."""
        return posixpath.relpath(path, self.base)

    def absolute(self, relative_path: str) -> str:
        return posixpath.join(self.base, relative_path)

    def url(self, path: str) -> str:
        """A path as users see it in messages: with its protocol."""
        return self.fs.unstrip_protocol(path)

    # ------------------------------------------------------------ primitives
    def _call(self, what: str, path: str, fn, *args, **kwargs):
        return call_with_retry(what, self.url(path), lambda: fn(*args, **kwargs), self.retry, self.on_wait)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._call("write", path, atomic_write, self.fs, path, data)

    def read_bytes(self, path: str) -> bytes | None:
        try:
            return self._call("read", path, self.fs.cat_file, path)
        except FileNotFoundError:
            return None

    def create_bytes(self, path: str, data: bytes) -> None:
        """Write a file that must not exist yet; ``FileExistsError`` if it does."""
        self._call("create", path, create_exclusive, self.fs, path, data)

    def create_json(self, path: str, doc: Any) -> None:
        """Write a document that must not exist yet; ``FileExistsError`` if it does."""
        self.create_bytes(path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def write_json(self, path: str, doc: Any) -> None:
        self.write_bytes(path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def read_json(self, path: str) -> Any | None:
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.fs.unstrip_protocol(path)} is not valid JSON: {exc}") from exc

    def _list_numbered(self, folder: str, suffix: str) -> list[int]:
        path = posixpath.join(self.base, folder)
        try:
            names = self._call("list", path, self.fs.ls, path, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            stem = posixpath.basename(name.rstrip("/"))
            if suffix:
                if not stem.endswith(suffix):
                    continue
                stem = stem[: -len(suffix)]
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def exists(self, path: str) -> bool:
        return bool(self._call("check", path, self.fs.exists, path))

    def delete_tree(self, path: str) -> None:
        try:
            self._call("delete", path, self.fs.rm, path, recursive=True)
        except FileNotFoundError:
            pass

    def check_access(self) -> None:
        """Fail early, with the cause in one line, when the root cannot hold
        a job: a folder that cannot be made, a bucket that does not exist,
        storage that does not answer or refuses."""
        probe = posixpath.join(self.base, f".probe-{uuid.uuid4().hex[:8]}")
        try:
            call_with_retry("write", self.url(probe), lambda: atomic_write(self.fs, probe, b"ok"), NO_RETRY)
            call_with_retry("delete", self.url(probe), lambda: self.fs.rm(probe), NO_RETRY)
        except NoSuchBucketError:
            raise
        except FileNotFoundError as exc:  # an answer, not a failure, to call_with_retry: a folder that cannot be made
            missing = f"{exc.filename}: " if exc.filename else ""
            raise StorageError(f"cannot write {self.url(probe)}: {missing}{exc.strerror or exc}. Check that the "
                               "checkpoint dir is a folder you can read and write") from None

    # ----------------------------------------------------------- documents
    def read_job(self) -> dict | None:
        return self.read_json(self.job_path)

    def write_job(self, doc: dict) -> None:
        self.write_json(self.job_path, doc)

    def write_offsets(self, epoch: int, plan: dict) -> None:
        """Offsets log entries are written once: ``FileExistsError`` if the
        epoch was planned already (then that plan is the one to run)."""
        self.create_json(self.offsets_path(epoch), plan)

    def read_offsets(self, epoch: int) -> dict | None:
        return self.read_json(self.offsets_path(epoch))

    def offset_epochs(self) -> list[int]:
        return self._list_numbered("offsets", ".json")

    def lease_numbers(self) -> list[int]:
        return self._list_numbered("lease", ".json")

    def read_lease(self, fencing: int) -> dict | None:
        return self.read_json(self.lease_path(fencing))

    def create_lease(self, fencing: int, doc: dict) -> None:
        self.create_json(self.lease_path(fencing), doc)

    def write_lease(self, fencing: int, doc: dict) -> None:
        self.write_json(self.lease_path(fencing), doc)

    def write_commit(self, epoch: int, doc: dict) -> None:
        self.write_json(self.commit_path(epoch), doc)

    def read_commit(self, epoch: int) -> dict | None:
        return self.read_json(self.commit_path(epoch))

    def commit_epochs(self) -> list[int]:
        return self._list_numbered("commits", ".json")

    def checkpoint_ids(self) -> list[int]:
        """Every checkpoint folder, complete or not."""
        return self._list_numbered("checkpoints", "")

    def read_manifest(self, checkpoint_id: int) -> dict | None:
        return self.read_json(self.manifest_path(checkpoint_id))

    def write_manifest(self, checkpoint_id: int, manifest: dict) -> None:
        """The commit point of a checkpoint: call it after every state file is written."""
        self.write_json(self.manifest_path(checkpoint_id), manifest)

    def file_size(self, path: str) -> int | None:
        try:
            return int(self._call("stat", path, self.fs.size, path))
        except FileNotFoundError:
            return None

    def prune_logs(self, below_epoch: int) -> int:
        """Delete offsets and commit records of epochs before ``below_epoch``."""
        removed = 0
        for epoch in self.offset_epochs():
            if epoch < below_epoch:
                self._rm(self.offsets_path(epoch))
                removed += 1
        for epoch in self.commit_epochs():
            if epoch < below_epoch:
                self._rm(self.commit_path(epoch))
                removed += 1
        return removed

    def files_under(self, folder: str) -> list[str]:
        """Every file below ``folder`` (empty if it does not exist)."""
        try:
            return sorted(self._call("list", folder, self.fs.find, folder))
        except FileNotFoundError:
            return []

    def delete_file(self, path: str) -> None:
        self._rm(path)

    def _rm(self, path: str) -> None:
        try:
            self._call("delete", path, self.fs.rm_file, path)
        except FileNotFoundError:
            pass

    def __reduce__(self):
        return (JobStorage, (self.root_url, self.job, self.retry))
