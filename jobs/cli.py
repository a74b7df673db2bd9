"""The ``sluiceway`` command line. Every flag also reads an environment variable."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

from sluiceway.checkpoint.errors import CheckpointError
from sluiceway.checkpoint.history import CheckpointHistory
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.cluster.errors import JobFailedError
from sluiceway.jobs.errors import JobFileError
from sluiceway.operators.errors import FlowDefinitionError, OperatorError


def _env(name: str, default=None):
    return os.environ.get(name, default)


def _whole_number(minimum: int):
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


_positive_int = _whole_number(1)
_nonnegative_int = _whole_number(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more seconds")
    return value


def _env_arg(p: argparse.ArgumentParser, flag: str, env: str, default: str, convert, help: str) -> None:
    """A flag that also reads ``env``; a bad value in the environment is a usage error too."""
    text = _env(env, default)
    try:
        value = convert(text) if text is not None else None
    except argparse.ArgumentTypeError as exc:
        p.error(f"{env}={text!r}: {exc}")
    shown = f"; default {default}" if default is not None else ""
    p.add_argument(flag, type=convert, default=value, help=f"{help} (env {env}{shown})")


def _checkpoint_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-dir",
        default=_env("SLUICEWAY_CHECKPOINT_DIR", ".sluiceway"),
        help="checkpoint storage: a path or fsspec URL (env SLUICEWAY_CHECKPOINT_DIR; default ./.sluiceway)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluiceway", description="Run streaming jobs on Ray and read their history.")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job on an embedded local Ray cluster")
    r.add_argument("job", help="path/to/job.py (attribute 'flow') or path/to/job.py:attribute")
    _checkpoint_dir_arg(r)
    r.add_argument("--trigger", type=_seconds, default=_seconds(_env("SLUICEWAY_TRIGGER", "1.0")),
                   help="seconds between epochs (env SLUICEWAY_TRIGGER; default 1.0)")
    r.add_argument("--checkpoint-every", type=_positive_int,
                   default=_positive_int(_env("SLUICEWAY_CHECKPOINT_EVERY", "5")),
                   help="checkpoint every N epochs (env SLUICEWAY_CHECKPOINT_EVERY; default 5)")
    r.add_argument("--parallelism", type=_positive_int,
                   default=_positive_int(_env("SLUICEWAY_PARALLELISM")) if _env("SLUICEWAY_PARALLELISM") else None,
                   help="default parallelism of steps that set none (env SLUICEWAY_PARALLELISM)")
    _env_arg(r, "--max-failures", "SLUICEWAY_MAX_FAILURES", "5", _nonnegative_int,
             "restart budget: failures allowed within --failure-window without a completed checkpoint between them")
    _env_arg(r, "--failure-window", "SLUICEWAY_FAILURE_WINDOW", "600", _seconds,
             "seconds after which a failure no longer counts against the budget")
    _env_arg(r, "--restart-delay", "SLUICEWAY_RESTART_DELAY", "1", _seconds,
             "delay before the second restart in a row; it doubles with each further one (the first is immediate)")
    _env_arg(r, "--max-restart-delay", "SLUICEWAY_MAX_RESTART_DELAY", "60", _seconds,
             "the longest delay between restarts")
    _env_arg(r, "--storage-deadline", "SLUICEWAY_STORAGE_DEADLINE", "120", _seconds,
             "seconds to keep retrying checkpoint storage that fails (the job pauses) before the job fails")
    _env_arg(r, "--epoch-timeout", "SLUICEWAY_EPOCH_TIMEOUT", None, _seconds,
             "seconds after which an epoch counts as stuck and its tasks are restarted "
             "(default: 10x the slowest recent epoch, at least 60; 600 before the first epoch completes)")
    r.add_argument("--force", action="store_true", default=_env("SLUICEWAY_FORCE", "") not in ("", "0"),
                   help="take the job over even if another run holds its lease; that run then stops writing "
                   "(env SLUICEWAY_FORCE=1)")
    stop = r.add_mutually_exclusive_group()
    stop.add_argument("--epochs", type=_positive_int,
                      default=_positive_int(_env("SLUICEWAY_EPOCHS")) if _env("SLUICEWAY_EPOCHS") else None,
                      help="stop after N new epochs and a final checkpoint (env SLUICEWAY_EPOCHS)")
    stop.add_argument("--until-idle", action="store_true",
                      default=_env("SLUICEWAY_UNTIL_IDLE", "") not in ("", "0"),
                      help="stop when bounded sources are exhausted, after a final checkpoint "
                      "(env SLUICEWAY_UNTIL_IDLE=1); without --epochs or --until-idle, run until Ctrl-C")

    c = sub.add_parser("checkpoints", help="read a job's checkpoint history")
    csub = c.add_subparsers(dest="checkpoints_command", required=True)
    ls = csub.add_parser("list", help="one row per checkpoint")
    ls.add_argument("job_name")
    _checkpoint_dir_arg(ls)
    ls.add_argument("--json", action="store_true", default=_env("SLUICEWAY_JSON", "") not in ("", "0"),
                    help="print a JSON list (env SLUICEWAY_JSON=1)")
    show = csub.add_parser("show", help="one checkpoint's manifest")
    show.add_argument("job_name")
    show.add_argument("id", type=int)
    _checkpoint_dir_arg(show)
    show.add_argument("--json", action="store_true", default=_env("SLUICEWAY_JSON", "") not in ("", "0"),
                      help="print the manifest as JSON (env SLUICEWAY_JSON=1)")
    diff = csub.add_parser("diff", help="how checkpoint B differs from A: offsets advanced, state per step")
    diff.add_argument("job_name")
    diff.add_argument("a", type=int)
    diff.add_argument("b", type=int)
    _checkpoint_dir_arg(diff)
    diff.add_argument("--json", action="store_true", default=_env("SLUICEWAY_JSON", "") not in ("", "0"),
                      help="print the difference as JSON (env SLUICEWAY_JSON=1)")

    h = sub.add_parser("history", help="a job's whole timeline: runs, checkpoints, failures, recoveries, rescales")
    h.add_argument("job_name")
    _checkpoint_dir_arg(h)
    h.add_argument("--json", action="store_true", default=_env("SLUICEWAY_JSON", "") not in ("", "0"),
                   help="print the records as JSON (env SLUICEWAY_JSON=1)")
    return parser


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def format_event(event: dict) -> str | None:
    kind = event["type"]
    if kind == "started":
        resume = event["resume_checkpoint"]
        where = f"resuming from checkpoint {resume}" if resume else "from the start"
        replay = f", replaying epochs {event['replay_epochs']}" if event["replay_epochs"] else ""
        return f"started {len(event['tasks'])} tasks on {event['nodes']} node(s), {where}{replay}"
    if kind == "epoch":
        ckpt = f"checkpoint {event['checkpoint']} complete" if event["checkpoint"] else f"last checkpoint {event['last_checkpoint']}"
        rate = f"{event['rows_per_s']:>12,.0f} rows/s" if event["rows_per_s"] else f"{'-':>12} rows/s"
        return (f"epoch {event['epoch']:>5}  in {event['rows_in']:>9,}  out {event['rows_out']:>9,}  {rate}  "
                f"{event['duration_s']:6.3f} s  {ckpt}")
    if kind == "failure":
        if event.get("delay_s") is None:
            return f"FAILURE: {event['error']}"
        delay = f" in {event['delay_s']:g} s" if event["delay_s"] else ""
        return f"FAILURE: {event['error']} (restart {event['restarts']}{delay})"
    if kind == "recovered":
        return (f"recovered in {event['duration_s']:.2f} s: restarted {event['restarted_tasks'] or 'no'} task(s), "
                f"restored checkpoint {event['checkpoint']}, replaying epochs {event['replay_epochs']}")
    if kind == "storage_waiting":
        return f"WAITING FOR STORAGE ({event['who']}): {event['error']}; retrying for up to {event['deadline_s']:g} s"
    if kind == "storage_resumed":
        return f"storage is back ({event['who']}): {event['message']}"
    if kind == "adopted_plan":
        return f"epoch {event['epoch']} was planned by another run; running that plan"
    if kind == "corrupt_checkpoint":
        return f"checkpoint {event['checkpoint']} is corrupt ({event['problem']}); using the one before"
    return None


def _print_event(event: dict) -> None:
    line = format_event(event)
    if line:
        print(line, flush=True)


def cmd_run(args) -> int:
    from sluiceway.jobs.jobfile import load_flow
    from sluiceway.jobs.runner import run

    from sluiceway.cluster.restart import RestartPolicy

    try:
        policy = RestartPolicy(
            max_failures=args.max_failures,
            failure_window_s=args.failure_window,
            initial_delay_s=min(args.restart_delay, args.max_restart_delay),
            max_delay_s=args.max_restart_delay,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    flow = load_flow(args.job)
    summary = run(
        flow,
        args.checkpoint_dir,
        until_idle=args.until_idle,
        epochs=args.epochs,
        trigger_s=args.trigger,
        checkpoint_every=args.checkpoint_every,
        parallelism=args.parallelism,
        restart_policy=policy,
        force=args.force,
        storage_deadline_s=args.storage_deadline,
        epoch_timeout_s=args.epoch_timeout,
        on_event=_print_event,
        on_started=lambda _: print(f"job {flow.name!r}: checkpoints in {args.checkpoint_dir}", flush=True),
    )
    print(
        f"done ({summary['stopped']}): {summary['epochs']} epochs, {summary['rows_in']:,} rows in, "
        f"{summary['rows_out']:,} rows out, {summary['checkpoints']} checkpoints, {summary['restarts']} restarts, "
        f"last checkpoint {summary['last_checkpoint']}, {summary['duration_s']:.1f} s"
    )
    return 0


def _offsets_summary(offsets: dict) -> str:
    return " ".join(f"{s}:{sum(parts.values())}" for s, parts in offsets.items()) or "-"


def cmd_checkpoints_list(args) -> int:
    rows = CheckpointHistory(JobStorage(args.checkpoint_dir, args.job_name)).list()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return 0
    if not rows:
        print(f"job {args.job_name!r} has no checkpoints under {args.checkpoint_dir}")
        return 0
    print(f"{'id':>6} {'epoch':>6} {'status':<10} {'started at':<24} {'duration':>9} {'bytes':>10} {'written':>10}  "
          "offsets  notes")
    for r in rows:
        dur = f"{r.duration_s:.3f}s" if r.duration_s is not None else "-"
        size = f"{r.size_bytes:,}" if r.size_bytes is not None else "-"
        written = f"{r.written_bytes:,}" if r.written_bytes is not None else "-"
        notes = [f"restored {r.restored}x"] if r.restored else []
        notes += [f"after {r.attempts - 1} failed attempt(s)"] if r.attempts > 1 and r.status != "failed" else []
        notes += [r.reason] if r.reason else []
        notes += [r.problem] if r.problem else []
        print(f"{r.id:>6} {r.epoch if r.epoch is not None else '-':>6} {r.status:<10} {_when(r.started_at):<24} "
              f"{dur:>9} {size:>10} {written:>10}  {_offsets_summary(r.offsets)}  {'; '.join(notes)}".rstrip())
    return 0


def cmd_checkpoints_diff(args) -> int:
    d = CheckpointHistory(JobStorage(args.checkpoint_dir, args.job_name)).diff(args.a, args.b)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"checkpoint {d['from']} -> {d['to']} of job {args.job_name}")
    for source, parts in d["offsets"].items():
        advanced = ", ".join(f"partition {p} +{n:,}" for p, n in sorted(parts.items(), key=lambda x: int(x[0])))
        print(f"  {source}: {advanced}")
    for step, s in d["steps"].items():
        print(f"  {step}: state {s['bytes_from']:,} -> {s['bytes_to']:,} bytes ({s['bytes_delta']:+,}), "
              f"{s['rows_from']:,} -> {s['rows_to']:,} stored rows ({s['rows_delta']:+,})")
    return 0


def format_record(r: dict) -> str:
    """One line of ``sluiceway history``."""
    kind = r["kind"]
    if kind == "run_started":
        where = f"from checkpoint {r['restored_checkpoint']}" if r["restored_checkpoint"] else "from the start"
        replay = f", replaying epochs {r['replay_epochs']}" if r["replay_epochs"] else ""
        text = (f"run {r['run_id']} (fencing {r['fencing']}, process {r['pid']} on {r['host']}) {where}{replay}; "
                f"parallelism {r['parallelism']}")
    elif kind == "checkpoint":
        if r["status"] == "complete":
            text = (f"{r['id']} complete: {r['duration_s']:.3f} s, alignment {r['alignment_s']:.3f} s, "
                    f"{r['size_bytes']:,} bytes of state, {r['written_bytes']:,} written")
        else:
            text = f"{r['id']} {r['status']}: {r['reason']}"
    elif kind == "recovery":
        text = (f"{r['failure']}; detected in {r['detect_s']:.2f} s, restored checkpoint "
                f"{r['restored_checkpoint'] or '(none: from the start)'} in {r['restore_s']:.2f} s, replaying "
                f"epochs {r['replay_epochs']}, restarted {r['restarted_tasks'] or 'no tasks'}")
    elif kind == "rescale":
        text = f"parallelism {r['from']} -> {r['to']}, from checkpoint {r['restored_checkpoint']}"
    elif kind == "run_ended":
        why = f"failed: {r['error']}" if r["error"] else r["reason"]
        text = (f"run {r['run_id']} ended ({why}): last epoch {r['last_epoch']}, last checkpoint "
                f"{r['last_checkpoint']}, {r['restarts']} restart(s)")
    else:
        text = json.dumps(r)
    return f"{_when(r['at'])}  {kind:<12} {text}"


def cmd_history(args) -> int:
    from sluiceway.checkpoint.timeline import read_history

    records = read_history(JobStorage(args.checkpoint_dir, args.job_name)).records
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    if not records:
        print(f"job {args.job_name!r} has no history under {args.checkpoint_dir}")
        return 0
    for r in records:
        print(format_record(r))
    return 0


def cmd_checkpoints_show(args) -> int:
    """A checkpoint's history record, and its manifest while its files are retained."""
    checkpoints = CheckpointHistory(JobStorage(args.checkpoint_dir, args.job_name))
    ids = {r.id: r for r in checkpoints.list()}
    if args.id in ids and ids[args.id].status not in ("complete", "corrupt", "incomplete"):
        record = checkpoints.record(args.id)
        if args.json:
            print(json.dumps({"record": record, "manifest": None}, indent=1))
            return 0
        row = ids[args.id]
        print(f"checkpoint {args.id} of job {args.job_name}: epoch {record['epoch']}, {row.status}"
              + (f" ({record['reason']})" if record.get("reason") else ""))
        print(f"  triggered {_when(record['trigger_time'])}, took {record['duration_s']:.3f} s"
              + (f", {record['size_bytes']:,} bytes of state" if record.get("size_bytes") is not None else ""))
        print(f"  offsets: {json.dumps(record['offsets'])}")
        if row.restored:
            print(f"  restored {row.restored} time(s) by a recovery or a restart")
        if row.status in ("removed", "retired"):
            print("  its state files were removed by retention: it can no longer be restored")
        return 0
    manifest = checkpoints.show(args.id)
    if args.json:
        try:
            record = checkpoints.record(args.id)
        except CheckpointError:
            record = None  # taken before the job kept a history
        print(json.dumps({"record": record, "manifest": manifest}, indent=1))
        return 0
    print(f"checkpoint {manifest['id']} of job {manifest['job']}: epoch {manifest['epoch']}, {manifest['status']}")
    if args.id in ids and ids[args.id].restored:
        print(f"  restored {ids[args.id].restored} time(s) by a recovery or a restart")
    print(f"  started {_when(manifest['started_at'])}, took {manifest['duration_s']:.3f} s, "
          f"{manifest['size_bytes']:,} bytes of state, {manifest['written_bytes']:,} written by this checkpoint")
    print(f"  offsets: {json.dumps(manifest['offsets'])}")
    for task in manifest["tasks"]:
        print(f"  task {task['task']}: snapshot {task['snapshot_s']:.3f} s, epoch {task['duration_s']:.3f} s, "
              f"wrote {task['written_bytes']:,} bytes")
    for step, key_groups in manifest["state"].items():
        by_file: dict[str, int] = {}
        for chain in key_groups.values():
            for path, _ in chain:
                by_file[path] = by_file.get(path, 0) + 1
        deltas = sum(len(chain) - 1 for chain in key_groups.values())
        print(f"  {step}: {len(key_groups)} key groups in {len(by_file)} file(s), {deltas} delta(s) on full copies")
        for path, count in sorted(by_file.items()):
            f = manifest["files"][path]
            print(f"    {path}  {count} key group part(s), {f['size_bytes']:,} bytes, {f['rows']:,} rows, "
                  f"from checkpoint {f['checkpoint']}, sha256 {f['sha256'][:12]}")
    return 0


class UsageError(Exception):
    """A flag or argument the command cannot use (exit status 2)."""


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 on success, 2 for a usage error, 1 for anything else;
    the cause is the first line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "history":
            return cmd_history(args)
        if args.checkpoints_command == "list":
            return cmd_checkpoints_list(args)
        if args.checkpoints_command == "diff":
            return cmd_checkpoints_diff(args)
        return cmd_checkpoints_show(args)
    except (UsageError, JobFileError, FlowDefinitionError) as exc:
        print(f"sluiceway: error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, OperatorError, JobFailedError, ValueError) as exc:
        print(f"sluiceway: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
