"""Event sourcing on Ray: a log of cart commands, two views kept from it
(current carts in PostgreSQL with deletes, revenue per hour in Delta Lake),
a task killed mid-run, then a replay of the log from offset 0 into fresh
views that ends identical (jobs/examples/shop.py)."""

import deltalake
import psycopg
import pytest

from sluiceway.jobs import run
from sluiceway.jobs.examples import shop
from sluiceway.jobs.testing import TaskKiller

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]


def _carts(dsn: str, table: str) -> set[tuple]:
    with psycopg.connect(dsn) as conn:
        return set(conn.execute(f"SELECT cart, items, value, status FROM {table}").fetchall())


def test_two_views_of_one_log_and_a_replay_into_fresh_views_end_identical(postgres_dsn, tmp_path):
    rows = 4000
    log_dir = str(tmp_path / "log")
    shop.produce(log_dir, rows)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS carts; DROP TABLE IF EXISTS carts_replay")
    flow = shop.build(log_dir, postgres_dsn, str(tmp_path / "out"), rows)
    killer = TaskKiller("by_cart[0]", after_epoch=3)
    # Twenty epochs of backlog: the kill after epoch 3 lands while the job still reads.
    summary = run(flow, str(tmp_path / "ckpt"), trigger_s=0.2, checkpoint_every=2, max_records_per_epoch=400,
                  on_event=killer)
    assert killer.killed.is_set() and summary["restarts"] == 1, summary["failures"]
    carts, revenue = _carts(postgres_dsn, "carts"), shop.expected_revenue(rows)
    assert carts == shop.expected_carts(rows) and any(status == "paid" for *_, status in carts)
    delta = deltalake.DeltaTable(str(tmp_path / "out" / "revenue")).to_pyarrow_table()
    assert shop.revenue_rows(delta) == revenue
    # The log is the truth: replayed from offset 0 into fresh views, with other epochs, it gives the same.
    replay = shop.build(log_dir, postgres_dsn, str(tmp_path / "replay"), rows, name="shop_replay",
                        table="carts_replay")
    run(replay, str(tmp_path / "ckpt_replay"), trigger_s=0.2, max_records_per_epoch=3000)
    assert _carts(postgres_dsn, "carts_replay") == carts
    assert shop.revenue_rows(deltalake.DeltaTable(str(tmp_path / "replay" / "revenue")).to_pyarrow_table()) == revenue
