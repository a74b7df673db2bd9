"""The restart policy as a pure state machine: budgets, delays, deterministic errors."""

import pytest

from sluiceway.cluster.restart import (
    Failure,
    FailureKind,
    GiveUp,
    Restart,
    RestartPolicy,
    RestartTracker,
    failure_from_exception,
    primary,
)
from sluiceway.operators.errors import FlowValidationError, UserCodeError


def lost(task="a[0]"):
    return Failure(FailureKind.TASK_LOST, f"task {task} died", task=task)


def user(epoch, message="bad record"):
    return Failure(FailureKind.USER_CODE, f"step 'p' raised ValueError: {message}", epoch=epoch,
                   signature=("p", "ValueError", message))


def test_delay_grows_on_repeated_failure_and_is_capped():
    t = RestartTracker(RestartPolicy(max_failures=10, initial_delay_s=1.0, multiplier=2.0, max_delay_s=5.0))
    delays = [t.on_failure(lost(), now=float(i)).delay_s for i in range(6)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_budget_refills_after_a_completed_checkpoint():
    t = RestartTracker(RestartPolicy(max_failures=3))
    for day in range(30):  # one node loss a day for a month, each followed by a checkpoint
        assert t.on_failure(lost(), now=day * 86400.0) == Restart(0.0)
        t.on_checkpoint_completed(now=day * 86400.0 + 10)
    assert t.total == 30


def test_crash_loop_spends_the_budget():
    t = RestartTracker(RestartPolicy(max_failures=3, initial_delay_s=0.0))
    assert [type(t.on_failure(lost(), now=float(i))) for i in range(3)] == [Restart] * 3
    decision = t.on_failure(lost(), now=3.0)
    assert isinstance(decision, GiveUp)
    assert "4 failures within 600 s without a completed checkpoint in between spent the restart budget of 3" \
        in decision.reason


def test_failures_older_than_the_window_no_longer_count():
    t = RestartTracker(RestartPolicy(max_failures=1, failure_window_s=60.0))
    assert isinstance(t.on_failure(lost(), now=0.0), Restart)
    assert isinstance(t.on_failure(lost(), now=30.0), GiveUp)
    t2 = RestartTracker(RestartPolicy(max_failures=1, failure_window_s=60.0))
    t2.on_failure(lost(), now=0.0)
    assert t2.on_failure(lost(), now=61.0) == Restart(0.0)


def test_same_user_error_on_same_epoch_after_a_replay_gives_up():
    t = RestartTracker(RestartPolicy(max_failures=100))
    assert t.on_failure(user(6), now=0.0) == Restart(0.0)
    decision = t.on_failure(user(6), now=1.0)
    assert isinstance(decision, GiveUp) and "failed the same way on epoch 6 after a replay" in decision.reason


def test_different_epoch_or_message_is_not_deterministic():
    t = RestartTracker(RestartPolicy(max_failures=100, initial_delay_s=0.0))
    assert isinstance(t.on_failure(user(6), now=0.0), Restart)
    assert isinstance(t.on_failure(user(7), now=1.0), Restart)
    assert isinstance(t.on_failure(user(7, "other"), now=2.0), Restart)
    assert isinstance(t.on_failure(lost(), now=3.0), Restart)
    assert isinstance(t.on_failure(user(7, "other"), now=4.0), Restart)  # a node loss came between


def test_fatal_failures_give_up_at_once():
    t = RestartTracker(RestartPolicy())
    decision = t.on_failure(Failure(FailureKind.FATAL, "step 'k' (key_by): the stream has no column 'x'"), now=0)
    assert isinstance(decision, GiveUp) and "without restarting" in decision.reason


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError, match="initial .* <= max"):
        RestartPolicy(initial_delay_s=10, max_delay_s=1)
    with pytest.raises(ValueError, match="max_failures must be >= 0"):
        RestartPolicy(max_failures=-1)


def boom():
    raise ValueError("bad record at offset 500")


def test_classification_leads_with_the_cause():
    try:
        boom()
    except ValueError as exc:
        err = UserCodeError.from_exception("parse", "map_batches", exc)
    f = failure_from_exception(err, "src[0]", 6)
    assert f.kind is FailureKind.USER_CODE and f.epoch == 6
    assert f.message == "step 'parse' (map_batches) raised ValueError: bad record at offset 500 (task src[0], epoch 6)"
    assert "in boom" in f.detail and "ValueError: bad record at offset 500" in f.detail
    assert "sluiceway" not in f.detail.replace("tests/unit", "")  # only the user's frames
    fatal = failure_from_exception(FlowValidationError("k", "key_by", "no column 'x'"), "src[0]", 1)
    assert fatal.kind is FailureKind.FATAL and fatal.message == "step 'k' (key_by): no column 'x'"
    assert primary([lost(), fatal, user(1)]) is fatal
    assert primary([lost(), user(1)]).kind is FailureKind.USER_CODE
