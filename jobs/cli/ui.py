"""``sluiceway ui``: serve the read-only web page of the jobs on a cluster
or under checkpoint dirs."""

from __future__ import annotations

import sys

from sluiceway.jobs.cli.cluster import address_arg
from sluiceway.jobs.cli.common import env, env_arg, nonnegative_int


def register(sub) -> None:
    p = sub.add_parser(
        "ui", help="a web page per job (throughput, latency, checkpoints, recoveries, graph) and its JSON API; "
                   "it only reads")
    p.set_defaults(func=cmd_ui)
    env_arg(p, "--port", "SLUICEWAY_UI_PORT", "8377", nonnegative_int, "port to serve on (0: any free port)")
    p.add_argument("--host", default=env("SLUICEWAY_UI_HOST", "127.0.0.1"),
                   help="address to bind (env SLUICEWAY_UI_HOST; default 127.0.0.1: this machine only)")
    p.add_argument("--checkpoint-dir", action="append", default=None,
                   help="read the jobs under this checkpoint dir, running or not (repeat for several); without "
                        "it, the jobs of the cluster (env SLUICEWAY_CHECKPOINT_DIR)")
    address_arg(p)


def cmd_ui(args) -> int:
    from sluiceway.jobs.ui.server import Sources, make_server, url

    roots = args.checkpoint_dir or ([env("SLUICEWAY_CHECKPOINT_DIR")] if env("SLUICEWAY_CHECKPOINT_DIR") else [])
    cluster_jobs = None
    if not roots or args.address:
        from sluiceway.cluster.connect import connect
        from sluiceway.jobs import client

        connect(args.address)
        cluster_jobs = client.list_jobs
    sources = Sources(roots, cluster_jobs)
    server = make_server(sources, args.host, args.port)
    sources.poll_in_background()
    where = ", ".join(roots) + (" and " if roots and cluster_jobs else "") + ("the cluster" if cluster_jobs else "")
    print(f"sluiceway ui at {url(server)} (jobs of {where}; read-only); Ctrl-C stops it", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {args.host}: anyone who reaches it can read these jobs' history", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
