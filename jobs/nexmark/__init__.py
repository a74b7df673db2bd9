"""The Nexmark queries as sluiceway jobs, one file each (``q0.py`` ...):
``sluiceway run jobs/nexmark/q5.py --until-idle``.

All read :class:`~sluiceway.operators.connectors.nexmark.NexmarkSource`
through :func:`common.source` (its size, partitions, pace and output folder
come from ``SLUICEWAY_NEXMARK_*`` variables) and write Parquet under
``$SLUICEWAY_NEXMARK_OUTPUT/<query>``. Event time is ``date_time``; the
generator moves events back by up to a second and the jobs allow a second
of out-of-orderness, so no event is late and a batch computation over the
same events gives the same windows.

Q3, Q4 and Q8 join streams (persons with auctions, auctions with bids); they
come with the joins ("Tables and joins").
"""
