"""``sluiceway checkpoints list|show|diff`` and ``sluiceway history``: what
a job did, read from checkpoint storage alone."""

from __future__ import annotations

import json

from sluiceway.jobs.cli.common import job_command, when


def register(sub) -> None:
    c = sub.add_parser("checkpoints", help="read a job's checkpoints")
    csub = c.add_subparsers(dest="checkpoints_command", required=True)
    job_command(csub, "list", "one row per checkpoint ever taken", cmd_checkpoints_list, "a list")
    job_command(csub, "show", "one checkpoint: its history record, and its manifest while retained",
                cmd_checkpoints_show, "the record and the manifest", ("id", int))
    job_command(csub, "diff", "how checkpoint B differs from A: offsets advanced, state per step",
                cmd_checkpoints_diff, "the difference", ("a", int), ("b", int))
    job_command(sub, "history", "a job's whole timeline: runs, checkpoints, failures, recoveries, rescales",
                cmd_history, "the records")


def offsets_summary(offsets: dict) -> str:
    return " ".join(f"{s}:{sum(parts.values())}" for s, parts in offsets.items()) or "-"


def job_storage(args):
    """The storage of job ``args.job_name`` under ``args.checkpoint_dir``; a
    job that never ran there is an error naming the jobs that did."""
    from sluiceway.checkpoint.errors import CheckpointError
    from sluiceway.checkpoint.storage import JobStorage
    from sluiceway.jobs.ui.model import job_names

    storage = JobStorage(args.checkpoint_dir, args.job_name)
    if storage.read_job() is None:
        known = job_names(args.checkpoint_dir)
        there = f"the jobs there: {', '.join(known)}" if known else "no job has run there"
        raise CheckpointError(f"no job named {args.job_name!r} under {storage.root_url} ({there}); check the name "
                              "and --checkpoint-dir")
    return storage


def _history(args):
    from sluiceway.checkpoint.history import CheckpointHistory

    return CheckpointHistory(job_storage(args))


def cmd_checkpoints_list(args) -> int:
    rows = _history(args).list()
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
        notes = ["savepoint"] if r.savepoint else []
        notes += [f"restored {r.restored}x"] if r.restored else []
        notes += [f"after {r.attempts - 1} failed attempt(s)"] if r.attempts > 1 and r.status != "failed" else []
        notes += [r.reason] if r.reason else []
        notes += [r.problem] if r.problem else []
        print(f"{r.id:>6} {r.epoch if r.epoch is not None else '-':>6} {r.status:<10} {when(r.started_at):<24} "
              f"{dur:>9} {size:>10} {written:>10}  {offsets_summary(r.offsets)}  {'; '.join(notes)}".rstrip())
    return 0


def cmd_checkpoints_show(args) -> int:
    from sluiceway.operators.event_time import format_watermark

    """A checkpoint's history record, and its manifest while its files are retained."""
    checkpoints = _history(args)
    row = checkpoints.row(args.id)
    if row is not None and row.status not in ("complete", "corrupt", "incomplete"):
        record = checkpoints.record(args.id)
        if args.json:
            print(json.dumps({"record": record, "manifest": None}, indent=1))
            return 0
        print(f"checkpoint {args.id} of job {args.job_name}: epoch {record['epoch']}, {row.status}"
              + (f" ({record['reason']})" if record.get("reason") else ""))
        print(f"  triggered {when(record['trigger_time'])}, took {record['duration_s']:.3f} s"
              + (f", {record['size_bytes']:,} bytes of state" if record.get("size_bytes") is not None else ""))
        print(f"  offsets: {json.dumps(record['offsets'])}")
        if row.restored:
            print(f"  restored {row.restored} time(s) by a recovery or a restart")
        if row.status in ("removed", "retired"):
            print("  its state files were removed by retention: it can no longer be restored")
        return 0
    manifest = checkpoints.show(args.id)
    if args.json:  # no record: taken before the job kept a history
        print(json.dumps({"record": checkpoints.records.get(args.id), "manifest": manifest}, indent=1))
        return 0
    print(f"checkpoint {manifest['id']} of job {manifest['job']}: epoch {manifest['epoch']}, {manifest['status']}")
    if row is not None and row.restored:
        print(f"  restored {row.restored} time(s) by a recovery or a restart")
    print(f"  started {when(manifest['started_at'])}, took {manifest['duration_s']:.3f} s, "
          f"{manifest['size_bytes']:,} bytes of state, {manifest['written_bytes']:,} written by this checkpoint")
    print(f"  offsets: {json.dumps(manifest['offsets'])}")
    for step, sig in manifest.get("steps", {}).items():
        key = f" keyed by {sig['key']!r}" if sig.get("key") else ""
        print(f"  step {step}: {sig['kind']}{key}" + (f", made at {sig['at']}" if sig.get("at") else ""))
    marks = {t: m for t, m in manifest.get("watermarks", {}).items() if m is not None}
    if marks:
        print(f"  watermarks: {', '.join(f'{t} {format_watermark(m)}' for t, m in sorted(marks.items()))}")
    for step, record in manifest.get("event_time", {}).items():
        largest = ", ".join(f"{p}: {format_watermark(v)}" for p, v in sorted(record["partitions"].items()))
        print(f"  event time of {step}: largest per partition {{{largest}}}")
    for task in manifest["tasks"]:
        print(f"  task {task['task']}: snapshot {task['snapshot_s']:.3f} s, epoch {task['duration_s']:.3f} s, "
              f"wrote {task['written_bytes']:,} bytes")
    for step, key_groups in manifest["state"].items():
        by_file: dict[str, int] = {}
        for chain in key_groups.values():
            for path, _ in chain:
                by_file[path] = by_file.get(path, 0) + 1
        deltas = sum(len(chain) - 1 for chain in key_groups.values())
        print(f"  {step}: {len(key_groups)} key groups in {len(by_file)} file(s), {deltas} run(s) on the oldest ones")
        for path, count in sorted(by_file.items()):
            f = manifest["files"][path]
            print(f"    {path}  {count} key group part(s), {f['size_bytes']:,} bytes, {f['rows']:,} rows, "
                  f"from checkpoint {f['checkpoint']}, sha256 {f['sha256'][:12]}")
    return 0


def cmd_checkpoints_diff(args) -> int:
    d = _history(args).diff(args.a, args.b)
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


def memory_of(checkpoint: dict) -> str:
    """Where the tasks kept each step's state at a checkpoint: in memory and mapped from local disk.

    >>> memory_of({"tasks": [{"state_memory": {"sums": {"resident_bytes": 10, "mapped_bytes": 5000}}},
    ...                      {"state_memory": {"sums": {"resident_bytes": 20, "mapped_bytes": 0}}}]})
    '; in memory / on local disk: sums 30 / 5,000 bytes'
    """
    steps: dict[str, list[int]] = {}
    for task in checkpoint.get("tasks", []):
        for step, m in task.get("state_memory", {}).items():
            both = steps.setdefault(step, [0, 0])
            both[0] += m["resident_bytes"]
            both[1] += m["mapped_bytes"]
    if not steps:
        return ""
    return "; in memory / on local disk: " + ", ".join(f"{s} {r:,} / {m:,} bytes" for s, (r, m) in steps.items())


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
            what = "savepoint" if r.get("savepoint") else "complete"
            text = (f"{r['id']} {what}: {r['duration_s']:.3f} s, alignment {r['alignment_s']:.3f} s, "
                    f"{r['size_bytes']:,} bytes of state, {r['written_bytes']:,} written{memory_of(r)}")
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
    return f"{when(r['at'])}  {kind:<12} {text}"


def cmd_history(args) -> int:
    from sluiceway.checkpoint.timeline import read_history

    records = read_history(job_storage(args)).records
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    if not records:
        print(f"job {args.job_name!r} has no history under {args.checkpoint_dir}")
        return 0
    for r in records:
        print(format_record(r))
    return 0
