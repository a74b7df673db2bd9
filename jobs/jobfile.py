"""Job files: a Python file defining a Dataflow, named ``path/to/job.py``
(attribute ``flow``) or ``path/to/job.py:attr``.

:func:`load_flow` is how ``run``, ``submit`` and the detached job's
supervisor all load one: the file's folder goes on ``sys.path`` (helper
modules beside the job import), and an error while it loads is reported
with its cause first, then the user's own frames only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import sysconfig
import traceback

from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.errors import JobFileError
from sluiceway.operators.errors import _is_user_frame

_INSTALLED = tuple(os.path.realpath(p) + os.sep for p in {sysconfig.get_paths()[k] for k in ("stdlib", "purelib",
                                                                                              "platlib")})


def _own_frame(filename: str) -> bool:
    """A frame of the user's own files: not sluiceway's, not an installed
    package's or the standard library's, not importlib's frozen machinery."""
    return (not filename.startswith("<") and _is_user_frame(filename)
            and not os.path.realpath(filename).startswith(_INSTALLED))


def _shown(filename: str) -> str:
    """A path as the user would type it: relative to here when below here."""
    relative = os.path.relpath(filename)
    return filename if relative.startswith("..") else relative


def load_error(path: str, exc: BaseException) -> JobFileError:
    """The error for a job file that raised while loading: ``file:line:
    cause`` first (the innermost line of the user's own code), the rest of
    the message next, then the user's frames; sluiceway's and libraries'
    frames are left out.

    >>> try:
    ...     exec(compile("x = (1,", "job.py", "exec"))
    ... except SyntaxError as e:
    ...     print(load_error("job.py", e))
    job.py:1: SyntaxError: '(' was never closed
        x = (1,
            ^
    """
    if isinstance(exc, SyntaxError):
        where = f"{_shown(exc.filename or path)}:{exc.lineno}" if exc.lineno else _shown(exc.filename or path)
        detail = traceback.format_exception_only(type(exc), exc)[1:-1]  # the code line and its caret
        return JobFileError(f"{where}: {type(exc).__name__}: {exc.msg}\n{''.join(detail).rstrip()}".rstrip())
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _own_frame(f.filename)]
    where = f"{_shown(frames[-1].filename)}:{frames[-1].lineno}" if frames else _shown(path)
    lines = str(exc).splitlines() or [""]
    own = type(exc).__module__.startswith("sluiceway.")  # our errors say what is wrong; others by their type too
    cause = lines[0] if own else f"{type(exc).__name__}: {lines[0]}".rstrip(": ")
    rest = [*lines[1:], *"".join(traceback.format_list(frames)).rstrip("\n").splitlines()]
    return JobFileError("\n".join([f"{where}: {cause}", *rest]))


def job_folder_on_path(path: str) -> None:
    """Put the job file's folder first on ``sys.path``, as ``python job.py``
    does: helper modules beside the job import. (Workers get them by value,
    :func:`sluiceway.jobs.runner.run`.)"""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)


def ship_by_value(module) -> None:
    """Pickle ``module``'s functions by value, for both the standalone
    cloudpickle and the copy Ray vendors (which is the one Ray uses)."""
    import cloudpickle
    import ray.cloudpickle

    for pickler in (cloudpickle, ray.cloudpickle):
        if module.__name__ not in pickler.list_registry_pickle_by_value():
            pickler.register_pickle_by_value(module)


def load_flow(spec: str, job_name: str | None = None) -> Dataflow:
    """The Dataflow a job file defines; ``job_name`` renames it (the job's name
    in checkpoint storage and on the cluster)."""
    path, _, attr = spec.partition(":")
    attr = attr or "flow"
    if not path.endswith(".py"):
        raise JobFileError(f"job {spec!r}: name a Python file, as path/to/job.py or path/to/job.py:attribute")
    if not os.path.isfile(path):
        raise JobFileError(f"job file {path!r} does not exist (looked in {os.getcwd()})")
    name = "sluiceway_job_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    job_folder_on_path(path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's error: its cause first, then the user's frames
        del sys.modules[name]
        raise load_error(path, exc) from None
    # Workers cannot import this module by name: ship its functions by value.
    ship_by_value(module)
    flow = getattr(module, attr, None)
    if not isinstance(flow, Dataflow):
        found = [k for k, v in vars(module).items() if isinstance(v, Dataflow)]
        hint = f"; it defines {', '.join(found)}: use {path}:{found[0]}" if found else ""
        what = "is missing" if flow is None else f"is a {type(flow).__name__}, not a Dataflow"
        raise JobFileError(f"job file {path!r} defines no Dataflow named {attr!r} ({attr!r} {what}){hint}")
    if job_name is not None and job_name != flow.name:
        if not job_name or not all(c.isalnum() or c in "-_" for c in job_name):
            raise JobFileError(f"job name {job_name!r} must be letters, digits, '-' or '_' (it names a folder)")
        flow.name = flow.graph.name = job_name
    return flow
