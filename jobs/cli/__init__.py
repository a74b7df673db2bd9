"""The ``sluiceway`` command line: one module per command group, registered
on one parser. Every flag also reads an environment variable. Exit status:
0 on success, 2 for a usage error, 1 for anything else; the cause is the
first line on stderr."""

from __future__ import annotations

import argparse
import os
import sys

from sluiceway.jobs.cli import cdc, checkpoints, cluster, jobs, log, run, ui
from sluiceway.jobs.cli.checkpoints import cmd_checkpoints_list, format_record
from sluiceway.jobs.cli.common import UsageError, error_text
from sluiceway.cluster.events import format_event
from sluiceway.jobs.errors import JobFileError
from sluiceway.operators.errors import FlowDefinitionError

__all__ = ["build_parser", "cmd_checkpoints_list", "format_event", "format_record", "main", "UsageError"]


class Parser(argparse.ArgumentParser):
    """argparse, with the cause first: the error line, then the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n{self.format_usage()}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sluiceway", description="Run streaming jobs on Ray and read their history.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (run, checkpoints, cluster, jobs, log, cdc, ui):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error prints ``sluiceway: error: <cause>`` as its
    first line, then the rest of its message and, for errors from the
    user's code, the user's own frames (:func:`~sluiceway.jobs.cli.common.error_text`)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, JobFileError, FlowDefinitionError) as exc:
        print(f"sluiceway: error: {error_text(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `sluiceway logs JOB | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C: what it stopped, in one line
        print(f"sluiceway: stopped by Ctrl-C{': ' + error_text(exc) if str(exc) else ''}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every other error: its cause first, never a Ray wrapper
        print(f"sluiceway: error: {error_text(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
