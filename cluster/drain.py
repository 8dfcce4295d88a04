"""Draining a running application before it stops (SIGTERM / Ctrl-C of `shardline serve`, or a
Kubernetes pod's preStop hook): the ingress stops admitting (new calls UNAVAILABLE / HTTP 503,
readiness fails so load balancers stop sending), requests in flight finish within the timeout,
and only then may the caller stop Serve's proxies and Ray.

`serve.shutdown()` alone is not a drain: it stops the proxies first, which cuts every open gRPC
stream ("Stream removed") and SSE response at once, however long the replicas' own
graceful_shutdown_timeout_s is.

Run in a pod: `python -m shardline.cluster.drain --app shardline --timeout-s 120` (connects to
the local Ray node)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class DrainReport:
    """What a drain saw: requests in flight when admission closed and when it returned, and how
    long it waited (seconds)."""

    in_flight_at_start: int
    in_flight_at_end: int
    waited_s: float

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
    ingress = serve.get_app_handle(app_name)
    try:
        at_start = in_flight = await asyncio.wait_for(ingress.drain.remote(), 30)
        while in_flight > 0 and time.monotonic() - started < timeout_s and not (give_up and give_up.is_set()):
            await asyncio.sleep(poll_s)
            in_flight = await asyncio.wait_for(ingress.in_flight.remote(), 30)
    finally:
        # The handle's router lives on this loop, which asyncio.run closes: shut it down and drop
        # it from Serve's handle cache here, or serve.shutdown() later shuts it down on the closed
        # loop ("Event loop is closed"). Serve's client exposes no public call for this.
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is not None:
            await client.shutdown_cached_handles_async()
    return DrainReport(at_start, in_flight, time.monotonic() - started)


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
    print(f"shardline drain: {report.in_flight_at_start} request(s) in flight, {report.in_flight_at_end} left "
          f"after {report.waited_s:.1f} s", file=sys.stderr)
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
