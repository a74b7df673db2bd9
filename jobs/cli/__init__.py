"""The ``sluiceway`` command line: one module per command group, registered
on one parser. Every flag also reads an environment variable. Exit status:
0 on success, 2 for a usage error, 1 for anything else; the cause is the
first line on stderr."""

from __future__ import annotations

import argparse
import sys

from sluiceway.checkpoint.errors import CheckpointError
from sluiceway.cluster.errors import JobFailedError
from sluiceway.jobs.cli import checkpoints, run
from sluiceway.jobs.cli.checkpoints import cmd_checkpoints_list, format_record
from sluiceway.jobs.cli.common import UsageError
from sluiceway.jobs.cli.run import format_event
from sluiceway.jobs.errors import JobFileError
from sluiceway.operators.errors import FlowDefinitionError, OperatorError

__all__ = ["build_parser", "cmd_checkpoints_list", "format_event", "format_record", "main", "UsageError"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluiceway", description="Run streaming jobs on Ray and read their history.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (run, checkpoints):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, JobFileError, FlowDefinitionError) as exc:
        print(f"sluiceway: error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, OperatorError, JobFailedError, ValueError) as exc:
        print(f"sluiceway: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
