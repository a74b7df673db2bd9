"""One owner per job: the lease and the fencing number."""

import threading

import pytest

from sluiceway.checkpoint import JobStorage
from sluiceway.checkpoint.errors import LeaseHeldError, LeaseLostError
from sluiceway.checkpoint.lease import LeaseHolder, acquire, check, owner, release, renew


def holder(name):
    return LeaseHolder("host", 1, name, 0.0)


@pytest.fixture
def storage(tmp_path):
    return JobStorage(str(tmp_path / "ckpt"), "job")


def test_live_lease_refuses_a_second_run_and_names_the_holder(storage):
    acquire(storage, holder("first"), ttl_s=10, now=100.0)
    with pytest.raises(LeaseHeldError, match=r"^job 'job' is already running: run first, process 1 on host holds "
                                             r"its lease \(fencing 1\).*expires in 5 s; .*--force"):
        acquire(storage, holder("second"), ttl_s=10, now=105.0)


def test_renewal_keeps_the_lease_and_expiry_allows_takeover(storage):
    lease = acquire(storage, holder("first"), ttl_s=10, now=100.0)
    lease = renew(storage, lease, ttl_s=10, now=108.0)
    with pytest.raises(LeaseHeldError):
        acquire(storage, holder("second"), ttl_s=10, now=115.0)
    second = acquire(storage, holder("second"), ttl_s=10, now=118.5)
    assert second.fencing == 2 and owner(storage).holder.run_id == "second"
    with pytest.raises(LeaseLostError, match="run first lost job 'job' to run second, process 1 on host"):
        renew(storage, lease, ttl_s=10, now=119.0)


def test_force_takes_over_a_live_lease_and_the_old_run_learns_it(storage):
    first = acquire(storage, holder("first"), ttl_s=10, now=100.0)
    forced = acquire(storage, holder("operator"), ttl_s=10, now=101.0, force=True)
    assert forced.fencing == 2
    with pytest.raises(LeaseLostError, match=r"fencing 2 > 1"):
        check(storage, first)
    check(storage, forced)


def test_release_lets_the_next_run_start_at_once(storage):
    lease = acquire(storage, holder("first"), ttl_s=600, now=100.0)
    release(storage, lease, now=101.0)
    assert acquire(storage, holder("next"), ttl_s=600, now=101.5).fencing == 2


def test_runs_racing_for_one_job_get_exactly_one_winner(storage):
    start = threading.Barrier(8)
    won, refused = [], []

    def contender(i):
        start.wait()
        try:
            won.append(acquire(storage, holder(f"run{i}"), ttl_s=60, now=100.0))
        except LeaseHeldError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7 and won[0].fencing == 1
    assert storage.lease_numbers() == [1]


def test_offsets_entries_are_written_once(storage):
    storage.write_offsets(1, {"epoch": 1})
    with pytest.raises(FileExistsError):
        storage.write_offsets(1, {"epoch": 1, "other": True})
    assert storage.read_offsets(1) == {"epoch": 1}


def test_malformed_lease_record_names_the_file(storage):
    storage.write_lease(1, {"job": "job", "fencing": 1})
    with pytest.raises(LeaseHeldError, match=r"^lease record file://.*lease/0000000001.json is malformed"):
        acquire(storage, holder("next"), ttl_s=10, now=100.0)


def test_old_lease_records_are_pruned_and_stale_runs_still_learn_they_lost(storage):
    first = acquire(storage, holder("run0"), ttl_s=1, now=0.0)
    for i in range(1, 15):
        acquire(storage, holder(f"run{i}"), ttl_s=1, now=float(i * 10))
    assert storage.lease_numbers() == list(range(5, 16))
    with pytest.raises(LeaseLostError, match="lost job 'job' to run run14"):
        check(storage, first)
