"""One owner per job: a lease in checkpoint storage, and a fencing number
that grows with every run.

A run takes fencing number *n* by creating ``lease/<n>.json`` if it does not
exist (the storage's exclusive create is the lock), where *n* is one more
than the highest number there. The newest file names the owner: host,
process, run, start, and when the lease expires unless renewed. A second
run of a live job is refused with the holder named; a lease that was not
renewed before its expiry may be taken over, and ``force`` takes it over
regardless. A run that finds a higher number than its own has lost the job
and must stop writing.

>>> import time
>>> from sluiceway.checkpoint.storage import JobStorage
>>> storage = JobStorage("memory://lease-doc", "clicks")
>>> first = acquire(storage, LeaseHolder("host-a", 101, "run-a", 0.0), ttl_s=30, now=1000.0)
>>> first.fencing
1
>>> acquire(storage, LeaseHolder("host-b", 202, "run-b", 0.0), ttl_s=30, now=1010.0)
Traceback (most recent call last):
...
sluiceway.checkpoint.errors.LeaseHeldError: job 'clicks' is already running: run run-a, process 101 on host-a holds its lease (fencing 1), which it renewed 10 s ago and which expires in 20 s; stop that run first, or pass --force if you know it is gone
>>> second = acquire(storage, LeaseHolder("host-b", 202, "run-b", 0.0), ttl_s=30, now=1031.0)  # expired
>>> second.fencing, owner(storage).holder.run_id
(2, 'run-b')
>>> check(storage, first)
Traceback (most recent call last):
...
sluiceway.checkpoint.errors.LeaseLostError: run run-a lost job 'clicks' to run run-b, process 202 on host-b (fencing 2 > 1); it stopped writing
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sluiceway.checkpoint.errors import LeaseHeldError, LeaseLostError
from sluiceway.checkpoint.storage import JobStorage

DEFAULT_TTL_S = 20.0
KEEP_RECORDS = 10  # lease records kept below the newest: who ran the job lately


@dataclass(frozen=True)
class LeaseHolder:
    """Who runs a job: ``host``, process id, run id, and when the run started."""

    host: str
    pid: int
    run_id: str
    started_at: float

    def describe(self) -> str:
        return f"run {self.run_id}, process {self.pid} on {self.host}"


@dataclass(frozen=True)
class Lease:
    """A held lease: the fencing number and its record as last written."""

    job: str
    fencing: int
    holder: LeaseHolder
    renewed_at: float
    expires_at: float

    def to_json(self) -> dict:
        return {**asdict(self), "holder": asdict(self.holder)}

    @classmethod
    def from_json(cls, doc: dict) -> "Lease":
        return cls(doc["job"], doc["fencing"], LeaseHolder(**doc["holder"]), doc["renewed_at"], doc["expires_at"])


def owner(storage: JobStorage) -> Lease | None:
    """The newest lease record, or ``None`` when the job never ran. A record
    being written at this very moment reads as ``None`` for a few
    milliseconds; :func:`acquire` treats that as held."""
    numbers = storage.lease_numbers()
    if not numbers:
        return None
    doc = storage.read_lease(numbers[-1])
    try:
        return Lease.from_json(doc) if doc else None
    except (KeyError, TypeError) as exc:
        url = storage.url(storage.lease_path(numbers[-1]))
        raise LeaseHeldError(f"lease record {url} is malformed ({exc!r}); delete it if no run of the job is alive")


def acquire(storage: JobStorage, holder: LeaseHolder, *, ttl_s: float, now: float, force: bool = False) -> Lease:
    """Take the job for ``holder``, or raise :class:`LeaseHeldError` naming who has it."""
    while True:
        numbers = storage.lease_numbers()
        top = numbers[-1] if numbers else 0
        if top and not force:
            current = owner(storage)
            if current is None:
                raise LeaseHeldError(
                    f"job {storage.job!r} is being started by another run at this moment (lease {top}); "
                    "stop that run first, or pass --force if you know it is gone"
                )
            if current.expires_at > now:
                raise LeaseHeldError(
                    f"job {storage.job!r} is already running: {current.holder.describe()} holds its lease "
                    f"(fencing {current.fencing}), which it renewed {now - current.renewed_at:.0f} s ago and which "
                    f"expires in {current.expires_at - now:.0f} s; stop that run first, or pass --force if you "
                    "know it is gone"
                )
        lease = Lease(storage.job, top + 1, holder, now, now + ttl_s)
        try:
            storage.create_lease(lease.fencing, lease.to_json())
        except FileExistsError:
            # Another run took top + 1 first: look again (and be refused, unless forcing).
            continue
        for old in numbers[: max(0, len(numbers) - KEEP_RECORDS)]:
            storage.delete_file(storage.lease_path(old))  # a stale run still sees a higher number
        return lease


def check(storage: JobStorage, lease: Lease) -> None:
    """Raise :class:`LeaseLostError` if a newer run has taken the job."""
    numbers = storage.lease_numbers()
    newest = numbers[-1] if numbers else 0
    if newest > lease.fencing:
        current = owner(storage)
        who = current.holder.describe() if current else f"lease {newest}"
        raise LeaseLostError(
            f"run {lease.holder.run_id} lost job {storage.job!r} to {who} "
            f"(fencing {newest} > {lease.fencing}); it stopped writing"
        )
    if newest < lease.fencing:
        raise LeaseLostError(
            f"run {lease.holder.run_id} lost job {storage.job!r}: its lease record {lease.fencing} is gone; "
            "it stopped writing"
        )


def renew(storage: JobStorage, lease: Lease, *, ttl_s: float, now: float) -> Lease:
    """Extend ``lease``; raises :class:`LeaseLostError` if it was taken over."""
    check(storage, lease)
    renewed = Lease(lease.job, lease.fencing, lease.holder, now, now + ttl_s)
    storage.write_lease(renewed.fencing, renewed.to_json())
    return renewed


def release(storage: JobStorage, lease: Lease, *, now: float) -> None:
    """Let the next run start at once: the lease expires now (if still ours)."""
    try:
        check(storage, lease)
    except LeaseLostError:
        return
    storage.write_lease(lease.fencing, Lease(lease.job, lease.fencing, lease.holder, now, now).to_json())

