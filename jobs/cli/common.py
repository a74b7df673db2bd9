"""What every command shares: flags that also read an environment variable,
times as users read them, and the usage error (exit status 2)."""

from __future__ import annotations

import argparse
import datetime as dt
import os


class UsageError(Exception):
    """A flag or argument the command cannot use (exit status 2)."""


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


def checkpoint_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-dir",
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
