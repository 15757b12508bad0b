"""Deliver a finished job to its callback URL: one JSON POST, a few tries, a short stable answer.

`deliver` checks the URL against the egress policy (`moorage.security.egress`) right before every
attempt, POSTs with httpx, and retries with exponential backoff (tenacity) only what may pass:
connection errors, timeouts, HTTP 5xx and 429, a name that does not resolve. Anything else ends at
once: a refused URL, another 4xx, a redirect. Redirects are never followed: the egress check
judged the URL the caller gave, and a ``302 Location: http://10.0.0.1/`` would bypass it.

The answer is what `JobStore.set_callback_status` records and ``GET /v1/jobs/{id}`` shows:

    delivered: HTTP 204
    refused: callback_not_allowed
    failed: HTTP 404
    failed: HTTP 302 (redirects are not followed)
    failed: HTTP 503 after 3 attempts
    failed: connect_error after 3 attempts      (also: timeout, network_error, callback_unresolvable)

It never carries an exception's text: that could tell the caller about the server's network.

A job's callback is delivered at least once: a server that dies before it records the outcome
leaves the callback ``pending`` in the job's row, and the runner that reclaims the job delivers it
again with the same ``Idempotency-Key`` (the job id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from ..security.egress import CallbackNotAllowed, check_callback_url

log = logging.getLogger("moorage.jobs")
MAX_BACKOFF_S = 5.0
USER_AGENT = "moorage-callback/1"


class _Retryable(Exception):
    """One attempt failed in a way the next one may not; `reason` is a short stable token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def idempotency_headers(job_id: str, delivery: int) -> dict[str, str]:
    """The headers of a job's callback: ``Idempotency-Key`` is the job id, the same on every delivery
    (callbacks are at-least-once: a receiver that has seen the key has seen the job), and
    ``Moorage-Callback-Delivery`` counts the deliveries (1, 2, ... as ``callback_attempts`` records)."""
    return {"Idempotency-Key": job_id, "Moorage-Callback-Delivery": str(delivery)}


async def deliver(
    url: str,
    payload: Mapping[str, Any],
    *,
    allow: Iterable[str],
    retries: int,
    timeout_s: float,
    client: httpx.AsyncClient | None = None,
    backoff_s: float = 0.5,
    headers: Mapping[str, str] | None = None,
) -> str:
    """POST `payload` as JSON to `url` and say what became of it (see the module docstring).

    Wiring: ``allow``, ``retries`` and ``timeout_s`` are ``settings.jobs.callback_allow``,
    ``callback_retries`` and ``callback_timeout_s``; `payload` is ``job.public()`` of the job that
    `JobStore.finish` returned (a finish that returned None was not the first: do not deliver).
    `retries` counts attempts, the first included; waits between them start at `backoff_s` and
    double up to 5 s. `timeout_s` bounds each attempt. `client` lets a runner share one connection
    pool across deliveries (it is not closed here; redirects stay off whatever it is set to);
    without one, a client is made for this delivery and ignores proxy environment variables.
    `headers` go with every attempt (a job's ``Idempotency-Key``, see `idempotency_headers`).

    Never raises for anything the receiver or the network does; a payload that is not JSON-ready
    raises `TypeError` before any attempt, and cancellation propagates.
    """
    if retries < 1:
        raise ValueError("retries counts attempts and must be at least 1")
    body = orjson.dumps(payload)
    own_client = client is None
    http = client or httpx.AsyncClient(follow_redirects=False, trust_env=False, headers={"User-Agent": USER_AGENT})
    retrying = AsyncRetrying(
        stop=stop_after_attempt(retries),
        wait=wait_exponential(multiplier=backoff_s, max=MAX_BACKOFF_S),
        retry=retry_if_exception_type(_Retryable),
        reraise=True,
    )
    try:
        return await retrying(_attempt, http, url, body, list(allow), timeout_s, dict(headers or {}))
    except _Retryable as exc:
        attempts = retrying.statistics.get("attempt_number", retries)
        return f"failed: {exc.reason} after {attempts} attempt{'s' if attempts != 1 else ''}"
    except CallbackNotAllowed as exc:
        return f"refused: {exc.code}"
    except Exception:  # a bug of ours, not the receiver's: keep the traceback, tell the caller nothing
        log.exception("callback delivery to a job's URL failed unexpectedly")
        return "failed: internal_error"
    finally:
        if own_client:
            await http.aclose()


async def _attempt(
    http: httpx.AsyncClient, url: str, body: bytes, allow: list[str], timeout_s: float, extra: dict[str, str]
) -> str:
    try:  # resolved in a thread: getaddrinfo blocks
        await asyncio.to_thread(check_callback_url, url, allow)
    except CallbackNotAllowed as exc:
        if exc.code == "callback_unresolvable":  # DNS may answer next time
            raise _Retryable(exc.code) from None
        raise
    headers = {**extra, "Content-Type": "application/json"}
    try:
        # Streamed and closed unread: only the status matters, and a receiver cannot make us buffer
        # a large body.
        async with http.stream(
            "POST", url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False
        ) as response:
            status = response.status_code
    except httpx.TimeoutException:
        raise _Retryable("timeout") from None
    except httpx.ConnectError:
        raise _Retryable("connect_error") from None
    except httpx.TransportError:
        raise _Retryable("network_error") from None
    if 200 <= status < 300:
        return f"delivered: HTTP {status}"
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}")
    if 300 <= status < 400:
        return f"failed: HTTP {status} (redirects are not followed)"
    return f"failed: HTTP {status}"
