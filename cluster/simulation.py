"""A deterministic simulation of the whole job protocol under faults.

The real :class:`~sluiceway.cluster.controller.JobController` and the real
storage side of the driver (:class:`~sluiceway.cluster.driver.Driver`: offsets
log, manifests, commit log, retention, restore points, sink settling, on an
in-memory fsspec store) run against simulated tasks, nodes, sinks and a
network, all driven by one seeded scheduler on a simulated clock. The tasks
follow the task protocol (generations, barrier alignment with the real
:class:`~sluiceway.cluster.alignment.BarrierAligner`, pre-commit at the
barrier, incremental state files at checkpoints, acks); the flow is a source
of ``partitions`` bounded partitions, a hash exchange, a count per key and a
two-phase sink.

Faults come at random points: task and node deaths, tasks that hang, a
coordinator crash before any instruction (the next run restarts from storage
alone), storage calls that fail or stall, sinks that fail between pre-commit
and commit, a second run taking the lease. After every step the invariants
are checked:

1. a sink commits an epoch only after every task acknowledged it and after
   its commit record is durable;
2. first commits come in epoch order, and a commit again is the same commit;
3. committed output is exactly the input, once (and no row twice at any time);
4. a restore point is a complete checkpoint; the final state counts every
   input row once;
5. a run that lost its lease writes no offsets, manifest or commit record,
   deletes no checkpoint file and aborts no pre-commit;
6. no file a retained checkpoint refers to is deleted;
7. the job finishes (no hang) within its step budget.

``python -m sluiceway.cluster.simulation --seeds 1000`` runs seeds 0..999;
a failing seed prints the one command that replays it exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass

from sluiceway.checkpoint import lease as leases
from sluiceway.checkpoint.errors import CheckpointError, LeaseLostError
from sluiceway.checkpoint.lease import LeaseHolder
from sluiceway.checkpoint.manifest import CheckpointStatus, check_manifest
from sluiceway.checkpoint.types import TaskId, key_group_range
from sluiceway.cluster import protocol as p
from sluiceway.cluster.controller import JobController
from sluiceway.cluster.driver import Driver
from sluiceway.cluster.epochs import TaskAck
from sluiceway.cluster.errors import JobFailedError
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.restart import RestartPolicy
from sluiceway.checkpoint.dictfiles import DictFiles
from sluiceway.cluster.simparts import SimCrash, SimFault, SimSink, SimStorage, SimTask, Violation, sim_plan

__all__ = ["Config", "FAULT_KINDS", "Outcome", "Violation", "World", "main", "run_seeds", "sim_plan", "SimSink"]


# ------------------------------------------------------------------ driver
class SimDriver(Driver):
    """The driver of one simulated run: tasks are :class:`SimTask`."""

    def __init__(self, run: "Run", controller: JobController, storage, lease, job_doc):
        super().__init__(controller, storage, lease, job_doc, lambda: run.world.now)
        self.run = run

    def before(self, instruction: p.Instruction) -> None:
        self.run.world.maybe("crash", f"the coordinator died before {type(instruction).__name__}", SimCrash)

    def start_tasks(self, instruction: p.StartTasks) -> None:
        w = self.run.world
        live = [n for n in range(w.nodes) if n not in w.dead_nodes] or [w.revive_node()]
        for i, task in enumerate(instruction.tasks):
            old = self.run.tasks.get(task)
            if old is not None:
                old.alive = False
            self.run.tasks[task] = SimTask(self.run, task, live[(i + instruction.offset) % len(live)])
            self.placement[task] = self.run.tasks[task].node
        self.run.reported_lost -= set(instruction.tasks)

    def reset_tasks(self, instruction: p.ResetTasks) -> p.Event:
        for task in sorted(self.run.tasks):
            sim = self.run.tasks[task]
            if not sim.alive or sim.hung:
                return p.ResetFailed(f"task {task} died while restoring checkpoint state", lost=True)
        manifest = instruction.manifest
        if manifest is not None and check_manifest(self.storage, manifest.id).status is not CheckpointStatus.COMPLETE:
            raise Violation(f"restore point {manifest.id} is not a complete checkpoint")
        for task in sorted(self.run.tasks):
            self.run.tasks[task].reset(instruction.generation, manifest, instruction.first_epoch,
                                       instruction.high_water)
        return p.TasksReset()

    def find_dead(self, instruction: p.FindDead) -> p.DeadFound:
        dead = {t for t, sim in self.run.tasks.items() if not sim.alive or sim.hung}
        return p.DeadFound(frozenset(dead | set(instruction.known)))

    def run_epoch(self, instruction: p.RunEpoch) -> None:
        for task in self.plan.stages["src"].tasks():
            self.run.send("coordinator", ("task", task), ("plan", instruction.generation, instruction.plan))

    def publish(self, event: dict) -> None:
        self.run.events.append(event["type"])


# -------------------------------------------------------------------- runs
class Run:
    """One coordinator incarnation: its controller, driver, tasks and inbox."""

    def __init__(self, world: "World", controller_class=JobController):
        self.world = world
        self.plan = world.plan
        holder = LeaseHolder("sim", len(world.runs), f"r{len(world.runs)}", world.now)
        self.lease = leases.acquire(world.probe, holder, ttl_s=1e9, now=world.now, force=True)
        self.fencing = self.lease.fencing
        world.newest_fencing = max(world.newest_fencing, self.fencing)
        self.storage = SimStorage(world, self.fencing)
        self.controller = controller_class(self.plan, world.options, fencing=self.fencing, clock=lambda: world.now)
        job_doc = {"sources_started_at": 0.0}
        self.driver = SimDriver(self, self.controller, self.storage, self.lease, job_doc)
        self.tasks: dict[TaskId, SimTask] = {}
        self.inbox: deque = deque()
        self.events: list[str] = []
        self.reported_lost: set[TaskId] = set()
        self.ended: str | None = None
        self.started = False

    def send(self, sender, receiver, message) -> None:
        self.world.network.setdefault((id(self), sender, receiver), deque()).append((self, receiver, message))

    def deliver(self, receiver, message) -> None:
        if self.ended is not None:
            return
        if receiver == "coordinator":
            self.inbox.append(message)
        else:
            sim = self.tasks.get(receiver[1])
            if sim is not None:
                sim.receive(message)

    def step(self) -> None:
        """One turn of the coordinator's loop: start, or take what arrived, then tick."""
        try:
            if not self.started:
                self.started = True
                self.driver.handle(p.Start())
                return
            events: list[p.Event] = []
            acks = [m for m in self.inbox if isinstance(m, TaskAck)]
            events += [p.Acked(tuple(acks))] if acks else []
            events += [m for m in self.inbox if not isinstance(m, TaskAck)]
            self.inbox.clear()
            for task, sim in sorted(self.tasks.items()):
                if not sim.alive and task not in self.reported_lost:
                    self.reported_lost.add(task)
                    events.append(p.TaskLost(task))
            for event in events:
                self.driver.handle(event)
            silent = {t: self.world.now - s.hung for t, s in self.tasks.items() if s.hung}
            self.driver.handle(p.Tick(silent))
            if self.controller.finished:
                self.end("finished")
        except (SimCrash, JobFailedError, CheckpointError, LeaseLostError, SimFault) as exc:
            self.end(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def end(self, reason: str) -> None:
        self.ended = reason
        for sim in self.tasks.values():
            sim.alive = False  # a coordinator's tasks die with it


# ------------------------------------------------------------------- world
@dataclass
class Config:
    partitions: int = 3
    source_parallelism: int = 2
    parallelism: int = 2
    nodes: int = 3
    records: int = 60  # per partition
    rate: float = 20.0  # records per partition per simulated second
    max_steps: int = 60_000
    max_runs: int = 40


FAULT_KINDS = ("task_death", "node_death", "hang", "crash", "storage", "stall", "sink_commit", "precommit", "task",
               "takeover")


class World:
    """One seeded simulation (see module doc)."""

    def __init__(self, seed: int, config: Config = Config(), controller_class=JobController, faults: bool = True):
        self.seed, self.config = seed, config
        self.rng = random.Random(seed)
        self.now = 0.0
        self.controller_class = controller_class
        rng = self.rng
        self.faults = {k: 0.0 for k in FAULT_KINDS}
        if faults:  # each seed draws its own mix: some quiet, some stormy
            for kind in FAULT_KINDS:
                self.faults[kind] = rng.choice([0.0, 0.0005, 0.002, 0.01]) * (0.2 if kind in ("crash", "storage",
                                                                                          "takeover") else 1.0)
        self.options = RunOptions(
            trigger_s=1.0, checkpoint_every=rng.randint(1, 4), max_epochs_in_flight=rng.randint(1, 3),
            max_records_per_epoch=rng.randint(5, 80), keep_checkpoints=rng.randint(1, 3), until_idle=True,
            epoch_timeout_s=5.0, restart=RestartPolicy(max_failures=1_000, initial_delay_s=0.2, max_delay_s=2.0),
        )
        self.nodes = config.nodes
        self.dead_nodes: set[int] = set()
        self.files = DictFiles()
        self.sink = SimSink(self)
        self.sink_parallelism = config.parallelism
        self.plan = sim_plan(self.sink, config.partitions, config.source_parallelism, config.parallelism, config.records,
                             config.rate)
        self.probe = SimStorage(self, None)  # the test's own eyes: no faults, no fencing
        self.newest_fencing = 0
        self.network: dict = {}
        self.runs: list[Run] = []
        self.deleted = False
        self.steps = 0
        self.struck: dict[str, int] = {}  # fault kind -> how often it struck

    def maybe(self, kind: str, message: str, error=SimFault) -> None:
        if self.chance(kind):
            raise error(message)

    def chance(self, kind: str) -> bool:
        """Whether fault ``kind`` strikes now (counted when it does)."""
        if self.rng.random() < self.faults.get(kind, 0.0):
            self.struck[kind] = self.struck.get(kind, 0) + 1
            return True
        return False

    def storage_has(self, path: str) -> bool:
        return self.probe.fs.exists(path)

    def revive_node(self) -> int:
        node = min(self.dead_nodes)
        self.dead_nodes.discard(node)
        return node

    def active(self) -> list[Run]:
        return [r for r in self.runs if r.ended is None]

    def run(self) -> dict:
        """Run until the job finishes; raise :class:`Violation` if an invariant breaks."""
        self.runs.append(Run(self, self.controller_class))
        while True:
            self.steps += 1
            if self.steps > self.config.max_steps:
                raise Violation(f"no finish within {self.config.max_steps} steps: the job hangs "
                                f"(runs {[r.ended for r in self.runs]}, committed through "
                                f"{self.sink.last_first_commit})")
            self._step()
            finished = [r for r in self.runs if r.ended == "finished"]
            if finished:
                self._check_final(finished[0])
                return {"seed": self.seed, "steps": self.steps, "runs": len(self.runs),
                        "epochs": self.sink.last_first_commit, "time_s": round(self.now, 1),
                        "recoveries": sum(r.events.count("recovered") for r in self.runs), "faults": self.struck}
            if not self.active():
                if len(self.runs) >= self.config.max_runs:
                    raise Violation(f"{len(self.runs)} runs ended without finishing: "
                                    f"{[r.ended for r in self.runs][-3:]}")
                self.runs.append(Run(self, self.controller_class))  # restarted from storage alone

    def _step(self) -> None:
        rng = self.rng
        self.deleted = False
        self._faults()
        queues = [k for k, q in self.network.items() if q]
        if queues and rng.random() < 0.7:
            key = queues[rng.randrange(len(queues))]
            run, receiver, message = self.network[key].popleft()
            run.deliver(receiver, message)
        else:
            runs = self.active()
            if runs:
                rng.choice(runs).step()
            self.now += rng.choice([0.005, 0.02, 0.02, 0.1, 0.5])
        if self.deleted:
            self._check_retained()

    def _faults(self) -> None:
        rng = self.rng
        runs = self.active()
        if not runs:
            return
        run = runs[-1]
        tasks = [t for _, t in sorted(run.tasks.items()) if t.alive]
        if tasks and self.chance("task_death"):
            rng.choice(tasks).alive = False
        if tasks and self.chance("hang"):
            victim = rng.choice(tasks)
            victim.hung = victim.hung or self.now
        if len(self.dead_nodes) < self.nodes - 1 and self.chance("node_death"):
            node = rng.choice([n for n in range(self.nodes) if n not in self.dead_nodes])
            self.dead_nodes.add(node)
            for t in tasks:
                if t.node == node:
                    t.alive = False
        if self.dead_nodes and rng.random() < 0.01:
            self.revive_node()  # a node comes back (or a new one joins)
        if len(self.runs) < self.config.max_runs and self.chance("takeover"):
            self.runs.append(Run(self, self.controller_class))  # a second run forces its way in

    def _check_retained(self) -> None:
        """Invariant 6: every file a retained manifest names still exists."""
        for checkpoint_id in self.probe.checkpoint_ids():
            manifest = self.probe.read_manifest(checkpoint_id)
            for path in (manifest or {}).get("files", {}):
                if not self.storage_has(self.probe.absolute(path)):
                    raise Violation(f"retention deleted {path}, which checkpoint {checkpoint_id} refers to")

    def _check_final(self, run: Run) -> None:
        """Invariants 3 and 4 at the end: all input committed once, state counts each row once."""
        expected = {(part, o) for part in range(self.config.partitions) for o in range(self.config.records)}
        if self.sink.rows != expected:
            missing, extra = expected - self.sink.rows, self.sink.rows - expected
            raise Violation(f"committed output is not the input: {len(missing)} rows missing "
                            f"(e.g. {sorted(missing)[:3]}), {len(extra)} extra")
        manifest = self.probe.read_manifest(run.controller.last_checkpoint)
        values: dict[str, int] = {}
        for kg_text, chain in manifest["state"].get("counts", {}).items():
            values[kg_text] = json.loads(self.probe.read_bytes(self.probe.absolute(chain[-1][0])))[kg_text]
        counted = sum(values.values())
        if counted != len(expected):
            raise Violation(f"the final checkpoint counts {counted} rows, the input has {len(expected)}")


def replay_command(seed: int) -> str:
    return f"python -m sluiceway.cluster.simulation --seed {seed}"


@dataclass
class Outcome:
    """What a batch of seeds did."""

    failed: list  # (seed, violation) of every seed that broke an invariant
    epochs: int = 0  # committed, over all seeds that passed
    runs: int = 0
    recoveries: int = 0
    faults: dict = None  # fault kind -> how often it struck

    def line(self, seeds: int, seconds: float) -> str:
        struck = ", ".join(f"{k} {v}" for k, v in sorted((self.faults or {}).items()))
        return (f"{seeds - len(self.failed)} passed, {len(self.failed)} failed: {seeds} seeds, {self.epochs} epochs "
                f"committed, {self.runs} runs, {self.recoveries} recoveries, in {seconds:.1f} s\nfaults: {struck}")


def run_seeds(seeds, config: Config = Config(), controller_class=JobController, workers: int = 1) -> Outcome:
    """Run every seed; the violations and what the seeds went through.
    ``workers`` > 1 shares the seeds among that many fresh processes."""
    seeds = list(seeds)
    if workers > 1 and len(seeds) > workers:
        import multiprocessing

        chunks = [seeds[i::workers] for i in range(workers)]
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(run_seeds, [(chunk, config, controller_class) for chunk in chunks])
        outcome = Outcome(sorted(f for part in parts for f in part.failed), faults={})
        for part in parts:
            outcome.epochs += part.epochs
            outcome.runs += part.runs
            outcome.recoveries += part.recoveries
            for kind, n in part.faults.items():
                outcome.faults[kind] = outcome.faults.get(kind, 0) + n
        return outcome
    outcome = Outcome([], faults={})
    for seed in seeds:
        try:
            result = World(seed, config, controller_class).run()
        except Violation as exc:
            outcome.failed.append((seed, str(exc)))
            continue
        outcome.epochs += result["epochs"]
        outcome.runs += result["runs"]
        outcome.recoveries += result["recoveries"]
        for kind, n in result["faults"].items():
            outcome.faults[kind] = outcome.faults.get(kind, 0) + n
    return outcome


class _DryDriver:
    """Answers the controller's questions at once, without storage, for :func:`measure_controller`."""

    def __init__(self, plan, rows_per_partition: int):
        self.plan, self.rows = plan, rows_per_partition
        self.dispatched: list = []
        self.source = plan.sources()["src"]

    def answer(self, instruction):
        if isinstance(instruction, p.ReadRestorePoint):
            return p.RestorePoint(None, [], {}, 0)
        if isinstance(instruction, p.ResetTasks):
            return p.TasksReset()
        if isinstance(instruction, p.ProbeSources):
            from sluiceway.cluster.epochs import Planned

            start = instruction.next_offsets.get("src", {})
            return p.SourcesProbed(Planned({"src": {k: (start.get(k, 0), start.get(k, 0) + self.rows)
                                                    for k in range(self.source.partition_count())}}))
        if isinstance(instruction, p.WriteOffsets):
            return p.OffsetsWritten(instruction.plan)
        if isinstance(instruction, p.CommitSinks):
            return p.SinksCommitted(instruction.epoch)
        if isinstance(instruction, p.ApplyRetention):
            return p.RetentionApplied(instruction.epoch, [])
        if isinstance(instruction, p.RunEpoch):
            self.dispatched.append(instruction.plan)
        return None


def measure_controller(tasks: int, nodes: int, epochs: int = 20, gathered: bool = False) -> dict:
    """The controller's CPU time per epoch at ``tasks`` tasks on ``nodes``
    nodes (half of them source tasks, half keyed tasks with a sink and state),
    acks sent one per task, or ``gathered`` into one message per node. Only
    ``handle`` is timed: the instructions are answered at once, without I/O."""
    half = max(1, tasks // 2)
    plan = sim_plan(SimSink(None), partitions=half, source_parallelism=half, parallelism=half, records=10**12,
                    rate=1e9, max_key_groups=max(128, half))
    clock = [0.0]
    controller = JobController(plan, RunOptions(), fencing=1, clock=lambda: clock[0])
    dry = _DryDriver(plan, rows_per_partition=1000)
    cpu = [0.0]
    messages = [0]

    def handle(event):
        t0 = time.process_time()
        out = controller.handle(event)
        cpu[0] += time.process_time() - t0
        messages[0] += 1
        for instruction in out:
            answer = dry.answer(instruction)
            if answer is not None:
                handle(answer)

    handle(p.Start())
    groups = {t: [str(kg) for kg in key_group_range(t.subtask, half, plan.max_key_groups)]
              for t in plan.stages["counts"].tasks()}
    order = sorted(plan.tasks(), key=lambda t: hash((t.subtask, t.stage)) % nodes)  # tasks spread over nodes
    cpu[0], messages[0], done = 0.0, 0, 0
    while done < epochs:
        clock[0] += 1.0
        handle(p.Tick())
        while dry.dispatched:
            plan_ = dry.dispatched.pop(0)
            acks = []
            for t in order:
                ack = TaskAck(t, controller.generation, plan_.epoch, rows_in=1000 if t.stage == "src" else 0)
                if t.stage == "counts":
                    ack.rows_out = 1000
                    ack.sink_handles = {"out": {"subtask": t.subtask, "key": f"{plan_.epoch}/{t.subtask}"}}
                    if plan_.checkpoint:
                        path = f"checkpoints/{plan_.epoch}/state/counts/{t.subtask}.arrow"
                        ack.state_files = [{"path": path, "checkpoint": plan_.epoch, "size_bytes": 1000,
                                            "sha256": "0" * 64, "rows": len(groups[t])}]
                        ack.state = {"counts": {kg: [[path, i]] for i, kg in enumerate(groups[t])}}
                acks.append(ack)
            per_message = -(-len(acks) // nodes) if gathered else 1
            for i in range(0, len(acks), per_message):
                handle(p.Acked(tuple(acks[i:i + per_message])))
            done += 1
    return {"tasks": len(plan.tasks()), "nodes": nodes, "gathered": gathered, "epochs": done,
            "cpu_ms_per_epoch": round(1000 * cpu[0] / done, 3), "core_share_at_1s": round(cpu[0] / done, 4),
            "messages_per_epoch": round(messages[0] / done, 1)}


def scale_table(sizes=((10, 10), (100, 10), (1000, 100), (2000, 200)), epochs: int = 20) -> list[dict]:
    """:func:`measure_controller` at each (tasks, nodes), acks per task and per node."""
    return [measure_controller(t, n, epochs, gathered) for t, n in sizes for gathered in (False, True)]


def main(argv=None, controller_class=JobController) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluiceway.cluster.simulation",
                                     description="Run the deterministic simulation of the job protocol.")
    parser.add_argument("--seeds", type=int, default=1000, help="run seeds FIRST..FIRST+N-1 (default 1000)")
    parser.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed and say what it went through")
    parser.add_argument("--scale", action="store_true", help="measure the controller at 10 to 2,000 tasks instead")
    args = parser.parse_args(argv)
    if args.scale:
        print(f"{'tasks':>6} {'nodes':>6} {'acks':>9} {'controller CPU ms/epoch':>24} {'share of a core':>16} "
              f"{'messages/epoch':>15}")
        for r in scale_table():
            print(f"{r['tasks']:>6} {r['nodes']:>6} {'per node' if r['gathered'] else 'per task':>9} "
                  f"{r['cpu_ms_per_epoch']:>24.2f} {100 * r['core_share_at_1s']:>15.2f}% {r['messages_per_epoch']:>15}")
        return 0
    if args.seed is not None:
        try:
            print(World(args.seed, controller_class=controller_class).run())
            return 0
        except Violation as exc:
            print(f"seed {args.seed}: {exc}", file=sys.stderr)
            return 1
    started = time.perf_counter()
    outcome = run_seeds(range(args.first, args.first + args.seeds), controller_class=controller_class,
                        workers=os.cpu_count() or 1)
    for seed, problem in outcome.failed:
        print(f"seed {seed}: {problem}\n  replay: {replay_command(seed)}", file=sys.stderr)
    print(outcome.line(args.seeds, time.perf_counter() - started))
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
