"""Connecting a command to a running cluster: which address, which token,
and one clear line when nothing answers or the token is refused (Ray itself
retries for 20-35 s before it says so).

The address comes from ``--address``, else ``RAY_ADDRESS``, else the
cluster ``sluiceway up`` recorded. The token is the one ``up`` made when the
address is that cluster's; otherwise Ray's own settings apply
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

from sluiceway.cluster.errors import ClusterError

NAMESPACE = "sluiceway"
PROBE_TIMEOUT_S = 3.0


def _host_port(address: str) -> tuple[str, int]:
    address = address.removeprefix("ray://")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"cluster address {address!r} is not HOST:PORT (for example 127.0.0.1:6379)")
    return host.strip("[]"), int(port)


def answers(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Something accepts TCP connections at ``address``."""
    try:
        host, port = _host_port(address)
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except (OSError, ClusterError):
        return False


def resolve(address: str | None, state_dir: str | None = None):
    """(address, the recorded cluster's state if the address is its own)."""
    from sluiceway.cluster.devcluster import load_state, state_path

    state = load_state(state_dir)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        if state is None:
            raise ClusterError(
                f"no cluster to use: none was started with `sluiceway up` (no {state_path(state_dir)}); "
                "start one with `sluiceway up`, or pass --address HOST:PORT (or set RAY_ADDRESS)"
            )
        return state.address, state
    return address, state if state is not None and state.address == address else None


def configure_auth(state) -> None:
    """Present the recorded cluster's token (before Ray reads its settings)."""
    if state is None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = state.token_file
    os.environ.pop("RAY_AUTH_TOKEN", None)
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except ImportError:  # pragma: no cover - other Ray versions read the environment when first asked
        pass


def keep_loopback() -> None:
    """Stop Ray from swapping 127.0.0.1 for the machine's routable address
    when it connects (Ray does so unless it believes multi-node clusters are
    off; a loopback-only cluster has every node on this machine anyway)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as constants

    constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_reachable(address: str, state) -> None:
    """One line when nothing answers at ``address`` or it refuses our token."""
    if not answers(address):
        recorded = f" (recorded by `sluiceway up` in {state.token_file.rsplit('/', 1)[0]})" if state else ""
        raise ClusterError(
            f"no Ray cluster answers at {address}{recorded}: start one with `sluiceway up`, "
            "or pass the address of a running one with --address"
        )
    from ray.exceptions import AuthenticationError

    try:
        from ray._raylet import GcsClient

        with _quiet_stderr():  # Ray's C++ client logs the refusal before raising it
            GcsClient(address=address)
    except AuthenticationError:
        raise ClusterError(
            f"the cluster at {address} refused this connection: its token authentication did not accept "
            "the token presented (use the address `sluiceway up` printed, or set RAY_AUTH_TOKEN_PATH to the "
            "cluster's token file)"
        ) from None


def ray_messages_to_stderr() -> None:
    """Ray's driver prints cluster events (a node marked dead ...) to stdout;
    send them to stderr, so that a command's output (``--json``) stays clean."""
    import ray._private.worker as worker

    original = worker.print_to_stdstream
    if getattr(original, "sluiceway", False):
        return

    def to_stderr(data, ignore_prefix: bool):
        return original({**data, "is_err": True}, ignore_prefix)

    to_stderr.sluiceway = True
    worker.print_to_stdstream = to_stderr


def connect(address: str | None = None, *, state_dir: str | None = None, runtime_env: dict | None = None) -> str:
    """Connect this process to a running cluster, in sluiceway's namespace
    (with ``runtime_env`` for what this process starts there: Ray uploads a
    local ``working_dir`` only at connection). Returns the address."""
    import ray

    from sluiceway.cluster.devcluster import LOOPBACK

    address, state = resolve(address, state_dir)
    configure_auth(state)
    if _host_port(address)[0] in LOOPBACK:
        keep_loopback()
    check_reachable(address, state)
    if not ray.is_initialized():
        ray_messages_to_stderr()
        ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False,
                 runtime_env=runtime_env)
    return address
