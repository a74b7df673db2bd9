"""``sluiceway run``: a job on the local cluster ``sluiceway up`` started
when one answers, else on an embedded local Ray cluster; its progress
printed as it goes."""

from __future__ import annotations

from sluiceway.cluster.events import format_event
from sluiceway.jobs.cli.common import (
    UsageError,
    checkpoint_dir_arg,
    env_arg,
    env_switch,
    nonnegative_int,
    positive_int,
    seconds,
)


def register(sub) -> None:
    r = sub.add_parser("run", help="run a job here: on the cluster `sluiceway up` started, else an embedded one")
    r.set_defaults(func=cmd_run)
    job_options(r)
    env_switch(r, "--embedded", "SLUICEWAY_EMBEDDED",
               "start an embedded Ray cluster for this run even when `sluiceway up` started one")


def job_options(r) -> None:
    """The flags of ``run`` and ``submit``: how a job runs."""
    r.add_argument("job", help="path/to/job.py (attribute 'flow') or path/to/job.py:attribute")
    checkpoint_dir_arg(r)
    env_arg(r, "--trigger", "SLUICEWAY_TRIGGER", "1.0", seconds, "seconds between epochs on live input")
    env_arg(r, "--checkpoint-every", "SLUICEWAY_CHECKPOINT_EVERY", "5", positive_int, "checkpoint every N epochs")
    env_arg(r, "--parallelism", "SLUICEWAY_PARALLELISM", None, positive_int,
            "parallelism of steps that set none (default: one task per CPU)")
    env_arg(r, "--executors-per-node", "SLUICEWAY_EXECUTORS_PER_NODE", None, positive_int,
            "processes that run the job's tasks on each node (default: one per CPU of the node)")
    env_arg(r, "--max-failures", "SLUICEWAY_MAX_FAILURES", "5", nonnegative_int,
            "restart budget: failures allowed within --failure-window without a completed checkpoint between them")
    env_arg(r, "--failure-window", "SLUICEWAY_FAILURE_WINDOW", "600", seconds,
            "seconds after which a failure no longer counts against the budget")
    env_arg(r, "--restart-delay", "SLUICEWAY_RESTART_DELAY", "1", seconds,
            "delay before the second restart in a row; it doubles with each further one (the first is immediate)")
    env_arg(r, "--max-restart-delay", "SLUICEWAY_MAX_RESTART_DELAY", "60", seconds, "the longest delay between restarts")
    env_arg(r, "--storage-deadline", "SLUICEWAY_STORAGE_DEADLINE", "120", seconds,
            "seconds to keep retrying checkpoint storage, or a source's or sink's server, that fails or cannot "
            "be reached (the job pauses; Ctrl-C stops it) before the job fails; a connector's own "
            "connect_deadline_s overrides it for that connector")
    env_arg(r, "--epoch-timeout", "SLUICEWAY_EPOCH_TIMEOUT", None, seconds,
            "seconds after which an epoch counts as stuck and its tasks are restarted "
            "(default: 10x the slowest recent epoch, at least 60; 120 before the first epoch completes)")
    env_switch(r, "--force", "SLUICEWAY_FORCE",
               "take the job over even if another run holds its lease; that run then stops writing")
    r.add_argument("--allow-dropped-state", action="store_true",  # no env: a loss is accepted one run at a time
                   help="restore the checkpoint even when the changed flow leaves some of its state without a step "
                        "(a removed step, a changed key or window): those steps start empty")
    stop = r.add_mutually_exclusive_group()
    env_arg(r, "--epochs", "SLUICEWAY_EPOCHS", None, positive_int, "stop after N new epochs and a final checkpoint",
            group=stop)
    env_switch(r, "--until-idle", "SLUICEWAY_UNTIL_IDLE",
               "stop once every source is read to its end, after a final checkpoint (the default without "
               "--epochs: a job with an unbounded source runs until Ctrl-C)", group=stop)


def _join_recorded_cluster() -> None:
    """Connect to the cluster ``sluiceway up`` recorded when it answers (and say so); else ``run`` starts an
    embedded one."""
    from sluiceway.cluster.connect import answers, connect
    from sluiceway.cluster.devcluster import load_state

    import ray

    state = load_state()
    if ray.is_initialized() or state is None or not answers(state.address, timeout_s=0.5):
        return
    connect(state.address)
    print(f"running on the cluster `sluiceway up` started at {state.address} (--embedded for one of its own)",
          flush=True)


def print_event(event: dict) -> None:
    line = format_event(event)
    if line:
        print(line, flush=True)


def restart_policy(args):
    from sluiceway.cluster.restart import RestartPolicy

    try:
        return RestartPolicy(
            max_failures=args.max_failures,
            failure_window_s=args.failure_window,
            initial_delay_s=min(args.restart_delay, args.max_restart_delay),
            max_delay_s=args.max_restart_delay,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run_options(args):
    """The flags as :class:`RunOptions`, for ``run`` and ``submit`` alike."""
    from sluiceway.cluster.options import RunOptions

    try:
        return RunOptions(trigger_s=args.trigger, checkpoint_every=args.checkpoint_every,
                          restart=restart_policy(args), epoch_timeout_s=args.epoch_timeout,
                          until_idle=args.epochs is None, epochs=args.epochs, storage_deadline_s=args.storage_deadline,
                          executors_per_node=args.executors_per_node, allow_dropped_state=args.allow_dropped_state)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def how_it_ends(flow, epochs: int | None, stop: str = "Ctrl-C") -> str:
    """What ``run`` and ``submit`` say at the start: when the job stops by
    itself, if ever (``stop``: how the user stops it otherwise)."""
    from sluiceway.jobs.runner import unbounded_sources

    if epochs is not None:
        return f"it stops after {epochs} new epoch(s) and a final checkpoint"
    unbounded = unbounded_sources(flow)
    if unbounded:
        sources = f"source {unbounded[0]!r} is" if len(unbounded) == 1 else \
            f"sources {', '.join(map(repr, unbounded))} are"
        return f"{sources} unbounded: it runs until {stop} (--epochs N stops it after N epochs)"
    return "every source is bounded: it stops once they are read to the end, after a final checkpoint"


def cmd_run(args) -> int:
    from sluiceway.jobs.jobfile import load_flow
    from sluiceway.jobs.runner import run

    options = run_options(args)
    flow = load_flow(args.job)
    ends = how_it_ends(flow, args.epochs)
    if not args.embedded:
        _join_recorded_cluster()
    summary = run(
        flow,
        args.checkpoint_dir,
        options,
        parallelism=args.parallelism,
        force=args.force,
        on_event=print_event,
        on_started=lambda _: print(f"job {flow.name!r}: checkpoints in {args.checkpoint_dir}; {ends}", flush=True),
    )
    print(
        f"done ({summary['stopped']}): {summary['epochs']} epochs, {summary['rows_in']:,} rows in, "
        f"{summary['rows_out']:,} rows out, {summary['checkpoints']} checkpoints, {summary['restarts']} restarts, "
        f"last checkpoint {summary['last_checkpoint']}, {summary['duration_s']:.1f} s"
    )
    return 0
