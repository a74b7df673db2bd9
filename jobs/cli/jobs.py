"""Detached jobs on a running cluster: ``submit``, ``jobs``, ``status``,
``stop``, ``logs``, ``scale``, ``restore`` (:mod:`sluiceway.jobs.client`)."""

from __future__ import annotations

import json
import sys
import time

from sluiceway.jobs.cli.cluster import address_arg
from sluiceway.jobs.cli.common import env_arg, env_switch, json_arg, positive_int, whole_number
from sluiceway.jobs.cli.run import how_it_ends, job_options, run_options


def register(sub) -> None:
    p = sub.add_parser("submit", help="start a job on a running cluster and return; it runs on by itself")
    p.set_defaults(func=cmd_submit)
    job_options(p)
    p.add_argument("--name", help="the job's name (default: the flow's name)")
    address_arg(p)

    p = sub.add_parser("jobs", help="the jobs on the cluster, one line each")
    p.set_defaults(func=cmd_jobs)
    address_arg(p)
    json_arg(p, "the jobs")

    p = sub.add_parser("status", help="a job's recent epochs, rates, phase durations, lag and recoveries")
    p.set_defaults(func=cmd_status)
    p.add_argument("job_name")
    address_arg(p)
    json_arg(p, "the status (progress entries after Spark's StreamingQueryProgress)")
    env_arg(p, "--epochs", "SLUICEWAY_STATUS_EPOCHS", "10", positive_int, "how many recent epochs to show")
    env_switch(p, "--watch", "SLUICEWAY_WATCH", "refresh every second until Ctrl-C or the job ends")

    p = sub.add_parser("stop", help="stop a job after a final checkpoint (a savepoint with --savepoint); "
                                    "a job that already ended is removed from the cluster")
    p.set_defaults(func=cmd_stop)
    p.add_argument("job_name")
    p.add_argument("--savepoint", action="store_true", help="take a savepoint (kept until you delete it)")
    address_arg(p)

    p = sub.add_parser("logs", help="the log lines of a job's coordinator and tasks")
    p.set_defaults(func=cmd_logs)
    p.add_argument("job_name")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C")
    address_arg(p)

    p = sub.add_parser("scale", help="savepoint, then resume with N tasks per step (state moves with its keys)")
    p.set_defaults(func=cmd_scale)
    p.add_argument("job_name")
    p.add_argument("--parallelism", type=whole_number(1), required=True)
    address_arg(p)

    p = sub.add_parser("restore", help="run a job again from a retained checkpoint or savepoint")
    p.set_defaults(func=cmd_restore)
    p.add_argument("job_name")
    p.add_argument("--checkpoint", type=whole_number(1), required=True, help="checkpoint or savepoint id")
    p.add_argument("--parallelism", type=whole_number(1), help="tasks per step (default: as before)")
    address_arg(p)


def _connect(args) -> None:
    from sluiceway.cluster.connect import connect

    connect(args.address)


def cmd_submit(args) -> int:
    from sluiceway.cluster.connect import connect
    from sluiceway.jobs import client
    from sluiceway.jobs.jobfile import load_flow

    flow = load_flow(args.job, args.name)  # a broken job file is reported before anything is uploaded
    connect(args.address, runtime_env=client.job_runtime_env(args.job))
    summary = client.submit(args.job, args.checkpoint_dir, flow=flow, name=args.name, parallelism=args.parallelism,
                            options=run_options(args), force=args.force)
    tasks = summary["placement"]
    print(f"submitted job {summary['name']!r}: {len(tasks)} task(s) running on "
          f"{len(set(tasks.values()))} node(s); checkpoints in {summary['checkpoint_dir']}")
    print(f"follow it with `sluiceway status {summary['name']}`; stop it with `sluiceway stop {summary['name']}`")
    print(how_it_ends(flow, args.epochs, stop=f"`sluiceway stop {summary['name']}`"))
    return 0


def _rate(value) -> str:
    return f"{value:,.0f}" if value is not None else "-"


def cmd_jobs(args) -> int:
    from sluiceway.jobs import client

    _connect(args)
    jobs = client.list_jobs()
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    if not jobs:
        print("no jobs on this cluster (`sluiceway submit JOB` starts one)")
        return 0
    print(f"{'job':<20} {'state':<11} {'epoch':>7} {'rows/s':>11} {'checkpoint':>10} {'restarts':>8}")
    for j in jobs:
        print(f"{j['name']:<20} {j['state']:<11} {j['epoch'] if j['epoch'] is not None else '-':>7} "
              f"{_rate(j['input_rows_per_s']):>11} {j['last_checkpoint'] or '-':>10} "
              f"{j['restarts'] if j['restarts'] is not None else '-':>8}")
    return 0


def format_status(s: dict) -> str:
    lines = [f"job {s['name']!r}: {s['state']}, epoch {s['epoch']}, last checkpoint {s['last_checkpoint'] or '-'}, "
             f"parallelism {s['parallelism']}, {s['restarts']} restart(s), input {_rate(s['input_rows_per_s'])} "
             f"rows/s"]
    if s.get("error"):
        lines.append(f"error: {s['error']}")
    if s["savepoints"]:
        lines.append(f"savepoints taken: {', '.join(map(str, s['savepoints']))}")
    lines.append(f"{'epoch':>6} {'in':>9} {'out':>9} {'in/s':>10} {'done/s':>11} {'plan':>6} {'process':>8} "
                 f"{'align':>6} {'ckpt':>6} {'commit':>7} {'lag':>8} {'state B':>10}  (ms)")
    for p in s["recentProgress"]:
        d = p["durationMs"]
        mark = f"  {'savepoint' if p['savepoint'] else 'checkpoint'} {p['checkpoint']}" if p["checkpoint"] else ""
        mark += "  (replay)" if p["replay"] else ""
        mark += f"  late {p['numLateRows']:,}" if p.get("numLateRows") else ""
        lines.append(f"{p['batchId']:>6} {p['numInputRows']:>9,} {p['numOutputRows']:>9,} "
                     f"{_rate(p['inputRowsPerSecond']):>10} {_rate(p['processedRowsPerSecond']):>11} "
                     f"{d['plan']:>6.0f} {d['process']:>8.0f} {d['align']:>6.0f} {d['checkpoint']:>6.0f} "
                     f"{d['commit']:>7.0f} {p['sourceLag']:>8,} {p['stateBytes'] or 0:>10,}{mark}")
    for f in s.get("failing") or []:
        lines.append(f"failing since {f['at']}: {f['error']}")
    for r in s["recoveries"]:
        lines.append(f"recovery at {r['at']}: {r['failure']}; detected in {r['detect_s']:.2f} s, restored "
                     f"checkpoint {r['restored_checkpoint']} in {r['restore_s']:.2f} s, replayed epochs "
                     f"{r['replay_epochs'] or 'none'}, restarted {', '.join(r['restarted_tasks'] or []) or 'no'} "
                     "task(s)")
    return "\n".join(lines)


def cmd_status(args) -> int:
    from sluiceway.jobs import client

    _connect(args)
    if not args.watch:
        s = client.status(args.job_name, args.epochs)
        print(json.dumps(s, indent=1) if args.json else format_status(s))
        return 0
    try:
        while True:
            s = client.status(args.job_name, args.epochs)
            text = json.dumps(s) if args.json else format_status(s)
            if args.json:
                print(text, flush=True)
            else:
                sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + text + "\n")
                sys.stdout.flush()
            if s["state"] in ("finished", "failed", "stopped"):
                return 0
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def cmd_stop(args) -> int:
    from sluiceway.jobs import client

    _connect(args)
    s = client.stop(args.job_name, savepoint=args.savepoint)
    if s.get("removed"):
        print(f"job {args.job_name!r} had already {s['state']}; removed it from the cluster "
              f"(its checkpoints stay in {s['checkpoint_dir']})")
        return 0
    saved = f", savepoint {s['savepoints'][-1]}" if args.savepoint and s["savepoints"] else ""
    print(f"job {args.job_name!r} {s['state']} at epoch {s['epoch']}: last checkpoint {s['last_checkpoint']}{saved}; "
          f"`sluiceway restore {args.job_name} --checkpoint ID` runs it again, `sluiceway stop {args.job_name}` "
          "removes it")
    return 0


def cmd_logs(args) -> int:
    from sluiceway.jobs import client

    _connect(args)
    after, offsets = 0, {}
    try:
        while True:
            got = client.logs(args.job_name, after, offsets)
            for _, line in got["lines"]:
                print(f"[coordinator] {line}")
            for task, lines in sorted(got["tasks"].items()):
                for line in lines:
                    print(f"[{task}] {line}")
            sys.stdout.flush()
            after, offsets = got["last"], got["task_offsets"]
            if not args.follow:
                return 0
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def cmd_scale(args) -> int:
    from sluiceway.jobs import client

    _connect(args)
    t0 = time.time()
    s = client.scale(args.job_name, args.parallelism)
    nodes = sorted(set(s["placement"].values()))
    stages: dict[str, int] = {}
    for task in s["placement"]:
        stage = task.rsplit("[", 1)[0]
        stages[stage] = stages.get(stage, 0) + 1
    per_stage = ", ".join(f"{stage} {n}" for stage, n in sorted(stages.items()))
    print(f"scaled job {args.job_name!r} from parallelism {s['from']} to {s['parallelism']} through savepoint "
          f"{s['savepoints'][-1] if s['savepoints'] else '-'} in {time.time() - t0:.1f} s: tasks {per_stage} "
          f"(a source has at most one task per partition), on {len(nodes)} node(s): "
          f"{', '.join(n[:12] for n in nodes)}")
    return 0


def cmd_restore(args) -> int:
    from sluiceway.jobs import client

    _connect(args)
    s = client.restore(args.job_name, args.checkpoint, parallelism=args.parallelism)
    print(f"job {args.job_name!r} restored checkpoint {args.checkpoint}: {s['state']} with parallelism "
          f"{s['parallelism']}")
    return 0
