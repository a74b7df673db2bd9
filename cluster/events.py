"""The coordinator's progress events as the lines ``run`` prints and
``logs`` shows, and the log files a Ray actor writes (its stdout and
stderr), which ``sluiceway logs`` reads back through the actor itself."""

from __future__ import annotations

import glob
import os



def lowest_watermark(event: dict) -> int | None:
    """The lowest watermark any stage had after an epoch (``None``: no event time, or none yet).

    >>> lowest_watermark({"watermark": {"readings": 5_000_000, "by_sensor": None, "sink": 3_000_000}})
    3000000
    """
    marks = [m for m in (event.get("watermark") or {}).values() if m is not None]
    return min(marks) if marks else None


def format_event(event: dict) -> str | None:
    kind = event["type"]
    if kind == "started":
        resume = event["resume_checkpoint"]
        where = f"resuming from checkpoint {resume}" if resume else "from the start"
        replay = f", replaying epochs {event['replay_epochs']}" if event["replay_epochs"] else ""
        processes = f" in {event['executors']} executors" if event.get("executors") else ""
        return f"started {len(event['tasks'])} tasks{processes} on {event['nodes']} node(s), {where}{replay}"
    if kind == "epoch":
        ckpt = f"checkpoint {event['checkpoint']} complete" if event["checkpoint"] else f"last checkpoint {event['last_checkpoint']}"
        rate = f"{event['rows_per_s']:>12,.0f} rows/s" if event["rows_per_s"] else f"{'-':>12} rows/s"
        late = f"  late {event['late']:,}" if event.get("late") else ""
        mark = lowest_watermark(event)
        from sluiceway.operators.event_time import format_watermark

        watermark = f"  watermark {format_watermark(mark)}" if mark is not None else ""
        return (f"epoch {event['epoch']:>5}  in {event['rows_in']:>9,}  out {event['rows_out']:>9,}  {rate}  "
                f"{event['duration_s']:6.3f} s  {ckpt}{late}{watermark}")
    if kind == "failure":
        if event.get("delay_s") is None:
            return f"FAILURE: {event['error']}"
        delay = f" in {event['delay_s']:g} s" if event["delay_s"] else ""
        return f"FAILURE: {event['error']} (restart {event['restarts']}{delay})"
    if kind == "recovered":
        return (f"recovered in {event['duration_s']:.2f} s: restarted {event['restarted_tasks'] or 'no'} task(s), "
                f"restored checkpoint {event['checkpoint']}, replaying epochs {event['replay_epochs']}")
    if kind == "flow_changed":  # the flow differs from the one its checkpoint was written by
        return f"{'DROPPED' if event['drops_state'] else 'changed'}: {event['message']}"
    if kind == "storage_waiting":
        return f"WAITING ({event['who']}): {event['error']}; retrying for up to {event['deadline_s']:g} s"
    if kind == "storage_resumed":  # storage, or a source's or sink's server
        return f"back ({event['who']}): {event['message']}"
    if kind == "waiting_for":  # an epoch in flight for long: what it waits for, before it counts as stuck
        shown = ", ".join(event["missing"])
        more = f" and {event['missing_count'] - len(event['missing'])} more" if event["missing_count"] > len(
            event["missing"]) else ""
        return (f"WAITING (epoch {event['epoch']}): {event['missing_count']} of {event['tasks']} tasks have not "
                f"acknowledged it after {event['waited_s']:.0f} s: {shown}{more}; it counts as stuck after "
                f"{event['bound_s']:g} s")
    if kind == "waiting_for_input":  # nothing readable: a run that waits for input says so, and where it stands
        planned = (f"{event['epochs_planned']} of {event['epochs']} epochs planned" if event.get("epochs")
                   else f"{event['epochs_planned']} epochs planned")
        at = "; ".join(f"{step} at " + ", ".join(f"p{k} {o:,}" for k, o in parts.items())
                       for step, parts in event["next_offsets"].items())
        return f"WAITING (input): no source has new records for {event['idle_s']:.0f} s; {planned}" + (
            f"; {at}" if at else "")
    if kind == "adopted_plan":
        return f"epoch {event['epoch']} was planned by another run; running that plan"
    if kind == "corrupt_checkpoint":
        return f"checkpoint {event['checkpoint']} is corrupt ({event['problem']}); using the one before"
    return None


RAY_MARKERS = (":job_id:", ":actor_name:", ":task_name:")  # Ray's own bookkeeping lines in worker logs


def own_log_files() -> list[str]:
    """This Ray worker process's stdout and stderr files (empty outside Ray)."""
    import ray._private.worker as worker

    node = getattr(worker, "_global_node", None)
    if node is None:
        return []
    folder = node.get_logs_dir_path()
    pid = os.getpid()
    return sorted(glob.glob(os.path.join(folder, f"worker-*-{pid}.out")) +
                  glob.glob(os.path.join(folder, f"worker-*-{pid}.err")))


def read_new(offsets: dict[str, int], limit: int = 256 * 1024) -> tuple[list[str], dict[str, int]]:
    """Lines appended to this process's log files since ``offsets`` (file ->
    bytes read); at most the last ``limit`` bytes of each on a first read."""
    lines, after = [], dict(offsets)
    for path in own_log_files():
        try:
            size = os.path.getsize(path)
            start = offsets.get(path)
            start = max(0, size - limit) if start is None else min(start, size)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(size - start)
        except OSError:
            continue
        end = data.rfind(b"\n") + 1  # whole lines only; the rest next time
        after[path] = start + end
        lines += [line for line in data[:end].decode(errors="replace").splitlines()
                  if line.strip() and not line.startswith(RAY_MARKERS)]
    return lines, after
