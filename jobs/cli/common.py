"""What every command shares: flags that also read an environment variable,
times as users read them, and the usage error (exit status 2)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re


class UsageError(Exception):
    """A flag or argument the command cannot use (exit status 2)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FRAME = re.compile(r'\s*File "([^"]+)", line \d+')


def _unwrapped(exc: BaseException) -> BaseException:
    """The error a Ray wrapper (``ray::Actor.method()``, ``RayTaskError``) carries."""
    while type(exc).__module__.startswith("ray.") and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


def own_frames(text: str) -> str:
    """A message holding a traceback, with the frames that are not the
    user's own code left out (sluiceway's, Ray's, libraries'). Without any
    of those it is returned as it is; when frames were left out, so is the
    traceback's header and the chained exceptions: the user's frames stay,
    then the last line (the exception).

    >>> print(own_frames("boom\\nTraceback (most recent call last):\\n"
    ...                  '  File "/usr/lib/python3/site-packages/ray/actor.py", line 9, in run\\n    x()\\n'
    ...                  "ValueError: boom"))
    boom
    """
    lines = text.splitlines()
    files = [m.group(1) for m in map(_FRAME.match, lines) if m]
    from sluiceway.jobs.jobfile import _own_frame

    if all(_own_frame(f) for f in files):
        return text
    head: list[str] = []
    for line in lines:
        if line.startswith("Traceback (most recent call last)") or _FRAME.match(line):
            break
        head.append(line)
    frames, keep = [], False
    for line in lines[len(head):]:
        match = _FRAME.match(line)
        if match:
            keep = _own_frame(match.group(1))
        elif not line.startswith("    "):  # not a frame's code line or caret
            keep = False
        if keep:
            frames.append(line)
    tail = [lines[-1]] if frames and lines[-1] not in head else []
    return "\n".join(head + frames + tail).rstrip()


def error_text(exc: BaseException) -> str:
    """What the CLI prints for an error, after ``sluiceway: error:``: the
    cause on the first line, never a Ray wrapper, no terminal colours, no
    frames but the user's own. An error that is neither sluiceway's nor a
    bad value nor the system's shows its type, then the user's frames in it.

    >>> error_text(FileNotFoundError(2, "No such file or directory", "clicks.jsonl"))
    'clicks.jsonl: No such file or directory'
    """
    exc = _unwrapped(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    elif type(exc).__module__.startswith("sluiceway.") or isinstance(exc, (UsageError, ValueError,
                                                                           KeyboardInterrupt)):
        text = str(exc) or type(exc).__name__
    else:
        import traceback

        text = f"{type(exc).__name__}: {exc}".rstrip(": ") + "\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return own_frames(_ANSI.sub("", text))


def env(name: str, default=None):
    return os.environ.get(name, default)


def whole_number(minimum: int):
    """A flag parser for whole numbers of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be {minimum} or more")
        return value

    return parse


positive_int = whole_number(1)
nonnegative_int = whole_number(0)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more seconds")
    return value


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def seconds_or_duration(text: str) -> float:
    """Seconds, or a number with a unit: ``90``, ``90s``, ``15m``, ``6h``, ``7d``.

    >>> seconds_or_duration("15m"), seconds_or_duration("2.5")
    (900.0, 2.5)
    """
    unit = _UNITS.get(text[-1:].lower()) if text else None
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use seconds or a unit, like 90, 15m, 6h, 7d") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def env_arg(parser: argparse.ArgumentParser, flag: str, name: str, default: str | None, convert, help: str,
            group=None) -> None:
    """``flag``, whose default comes from environment variable ``name``; a bad
    value there is a usage error too. ``group``: add it to that group."""
    text = env(name, default)
    try:
        value = convert(text) if text is not None else None
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{name}={text!r}: {exc}")
    shown = f"; default {default}" if default is not None else ""
    (group or parser).add_argument(flag, type=convert, default=value, help=f"{help} (env {name}{shown})")


def env_switch(parser, flag: str, name: str, help: str, group=None) -> None:
    """An on/off flag that ``name=1`` also turns on."""
    (group or parser).add_argument(flag, action="store_true", default=env(name, "") not in ("", "0"),
                                   help=f"{help} (env {name}=1)")


def location(text: str) -> str:
    """A path or URL flag: an empty one is refused (it would mean "here" without saying so)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a path or fsspec URL (leave the flag out for the default)")
    return text


def checkpoint_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-dir",
        type=location,
        default=env("SLUICEWAY_CHECKPOINT_DIR", ".sluiceway"),
        help="checkpoint storage: a path or fsspec URL (env SLUICEWAY_CHECKPOINT_DIR; default ./.sluiceway)",
    )


def json_arg(p: argparse.ArgumentParser, what: str) -> None:
    env_switch(p, "--json", "SLUICEWAY_JSON", f"print {what} as JSON")


def job_command(sub, name: str, help: str, func, json_what: str, *positional: tuple[str, type]):
    """A command about one job in checkpoint storage: ``JOB_NAME``, then
    ``positional`` arguments, ``--checkpoint-dir`` and ``--json``."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=func)
    p.add_argument("job_name")
    for arg, kind in positional:
        p.add_argument(arg, type=kind)
    checkpoint_dir_arg(p)
    json_arg(p, json_what)
    return p


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
