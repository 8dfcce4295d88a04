"""Ending a replica stream from the ingress without blocking its event loop.

`DeploymentResponseGenerator.cancel()` is not an asyncio call: when the handle's router runs in
its own loop (Serve's default) it first waits *synchronously* for the replica assignment, and if
that assignment failed (BackPressureError: every replica and the queue full) it re-raises that
error. Called in a `finally:` on the ingress's loop it therefore stalled every other request for
as long as the assignment took, and replaced the RequestError being raised (429, counted) with
Serve's BackPressureError (which Serve answers as 503 text/plain, uncounted). Here the cancel
runs on a worker thread and its own errors are dropped: a failed assignment has nothing to cancel.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


def _cancel(response: Any) -> None:
    try:
        response.cancel()
    except BaseException as e:  # noqa: BLE001 - BackPressureError, RequestCancelledError: nothing runs
        log.debug("cancelling a replica stream: %s", type(e).__name__)


def cancel_replica_stream(response: Any) -> None:
    """Cancel a DeploymentResponse(Generator) without waiting on this loop and without raising."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (finalised outside one): the call may block, nothing else waits
        _cancel(response)
        return
    loop.run_in_executor(None, _cancel, response)
