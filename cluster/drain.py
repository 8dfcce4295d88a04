"""Draining a running application before it stops (SIGTERM / Ctrl-C of `shardline serve`, or a
Kubernetes pod's preStop hook): the ingress stops admitting (new calls UNAVAILABLE / HTTP 503,
readiness fails so load balancers stop sending), requests in flight finish within the timeout,
and only then may the caller stop Serve's proxies and Ray.

`serve.shutdown()` alone is not a drain: it stops the proxies first, which cuts every open gRPC
stream ("Stream removed") and SSE response at once, however long the replicas' own
graceful_shutdown_timeout_s is.

Every Ingress replica is drained (Serve's `DeploymentHandle.broadcast`, one call per running
replica; there may be several per node), again at each poll so that one started meanwhile is
closed too. Then the proxies: an ingress counts a stream finished once it has yielded the last
message, which may still be on its way through the proxy to the client; stopping the proxy then
cuts the stream's tail. So the drain marks each Serve proxy draining and waits (same timeout)
until it has no request open (Serve's own `is_drained`, after RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S,
which cluster/proxies.py sets short).

Run in a pod: `python -m shardline.cluster.drain --app shardline --timeout-s 120` (connects to
the local Ray node)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class DrainReport:
    """What a drain saw: requests in flight (summed over every Ingress replica) when admission
    closed and when it returned, how many Ingress replicas it closed, whether Serve's proxies had
    no request open at the end (False when they could not be asked), and how long it waited (seconds)."""

    in_flight_at_start: int
    in_flight_at_end: int
    waited_s: float
    ingress_replicas: int = 0
    proxies_drained: bool = False

    @property
    def complete(self) -> bool:
        """Whether every request in flight finished within the timeout."""
        return self.in_flight_at_end == 0


def drain_application(app_name: str, timeout_s: float, poll_s: float = 0.2,
                      give_up: threading.Event | None = None) -> DrainReport:
    """Close the application's ingress to new requests and wait (at most timeout_s, or until
    `give_up` is set, e.g. by a second Ctrl-C) for the requests in flight to finish."""
    # NOTE: on an event loop of its own: with RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 (set for the
    # proxies, cluster/proxies.py, and so inherited by this process) a handle only works inside one.
    return asyncio.run(_drain(app_name, timeout_s, poll_s, give_up))


async def _drain(app_name: str, timeout_s: float, poll_s: float, give_up: threading.Event | None) -> DrainReport:
    from ray import serve

    started = time.monotonic()

    def waiting() -> bool:
        return time.monotonic() - started < timeout_s and not (give_up and give_up.is_set())

    ingress = serve.get_app_handle(app_name)
    try:
        replies = await _drain_every_ingress(ingress)
        at_start = in_flight = sum(replies)
        replicas = len(replies)
        while in_flight > 0 and waiting():
            await asyncio.sleep(poll_s)
            replies = await _drain_every_ingress(ingress)
            in_flight, replicas = sum(replies), max(replicas, len(replies))
        proxies_drained = in_flight == 0 and await _drain_proxies(waiting, poll_s)
    finally:
        # The handle's router lives on this loop, which asyncio.run closes: shut it down and drop
        # it from Serve's handle cache here, or serve.shutdown() later shuts it down on the closed
        # loop ("Event loop is closed"). Serve's client exposes no public call for this.
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is not None:
            await client.shutdown_cached_handles_async()
    return DrainReport(at_start, in_flight, time.monotonic() - started, replicas, proxies_drained)


async def _drain_every_ingress(ingress: Any) -> list[int]:
    """`Ingress.drain` on every running Ingress replica (idempotent): each one's requests in flight."""
    return list(await ingress.broadcast("drain").results_async(timeout_s=30))


async def _drain_proxies(waiting: Callable[[], bool], poll_s: float) -> bool:
    """Mark every Serve proxy draining and wait while `waiting()` until none has a request open.
    Serve's ProxyActor methods `update_draining` / `is_drained` are the ones its controller uses
    (not public API): on a Ray without them this returns False at once and the caller stops anyway."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_NAMESPACE, SERVE_PROXY_NAME

        proxies = [ray.get_actor(a["name"], namespace=a["namespace"])
                   for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(SERVE_PROXY_NAME)]
        await asyncio.gather(*(p.update_draining.remote(True) for p in proxies))
        while True:
            if all(await asyncio.gather(*(p.is_drained.remote() for p in proxies))):
                return True
            if not waiting():
                return False
            await asyncio.sleep(poll_s)
    except Exception as e:  # noqa: BLE001 - another Ray version, a proxy gone: stop without waiting for them
        print(f"shardline drain: could not wait for Serve's proxies ({type(e).__name__}: {e})", file=sys.stderr)
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m shardline.cluster.drain`: drain the application on the Ray cluster this node belongs to."""
    parser = argparse.ArgumentParser(prog="python -m shardline.cluster.drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default="shardline", help="Serve application name (default shardline)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="longest wait for requests in flight")
    parser.add_argument("--address", default="auto", help="Ray address (default: this node's cluster)")
    args = parser.parse_args(argv)
    import ray

    ray.init(address=args.address, log_to_driver=False)
    report = drain_application(args.app, args.timeout_s)
    print(f"shardline drain: {report.in_flight_at_start} request(s) in flight on {report.ingress_replicas} ingress "
          f"replica(s), {report.in_flight_at_end} left after {report.waited_s:.1f} s; proxies drained: "
          f"{report.proxies_drained}", file=sys.stderr)
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
