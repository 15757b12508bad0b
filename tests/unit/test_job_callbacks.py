"""Callback delivery against a real HTTP receiver on 127.0.0.1: retries on 5xx, 429 and connection
errors only, no redirects, the egress policy before every attempt, short stable answers, the job's
idempotency key on every attempt."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from moorage.jobs import callbacks
from moorage.jobs.callbacks import deliver, idempotency_headers

pytestmark = pytest.mark.anyio
LOCAL = ["127.0.0.1"]
JOB = {"id": "job-1", "status": "succeeded", "result": {"outputs": [[0.25, 0.5]]}, "error": None}


@dataclass
class Receiver:
    """Answers each path from a script of statuses (the last one repeats) and counts its hits."""

    port: int = 0
    script: dict[str, list[int]] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)
    bodies: list[dict] = field(default_factory=list)
    keys: list[tuple[str | None, str | None]] = field(default_factory=list)  # Idempotency-Key, delivery
    release: threading.Event = field(default_factory=threading.Event)  # for the path that hangs
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str) -> int:
        with self.lock:
            self.hits[path] += 1
            statuses = self.script.get(path, [204])
            return statuses.pop(0) if len(statuses) > 1 else statuses[0]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = state.answer(self.path)
            if self.path == "/hang":
                state.release.wait(30)
            with state.lock:
                state.bodies.append({"type": self.headers["Content-Type"], "json": json.loads(body)})
                state.keys.append((self.headers.get("Idempotency-Key"), self.headers.get("Moorage-Callback-Delivery")))
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", state.url("/landing"))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_port
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


async def test_an_allowed_receiver_gets_the_job_as_json(receiver):
    status = await deliver(receiver.url("/hook"), JOB, allow=LOCAL, retries=3, timeout_s=5, backoff_s=0)
    assert status == "delivered: HTTP 204"
    assert receiver.bodies == [{"type": "application/json", "json": JOB}]


async def test_two_server_errors_then_success_is_delivered_on_the_third_attempt(receiver):
    receiver.script["/flaky"] = [500, 503, 200]
    status = await deliver(receiver.url("/flaky"), JOB, allow=LOCAL, retries=3, timeout_s=5, backoff_s=0)
    assert status == "delivered: HTTP 200"
    assert receiver.hits["/flaky"] == 3


async def test_every_attempt_carries_the_jobs_idempotency_key(receiver):
    receiver.script["/flaky"] = [503, 200]
    headers = idempotency_headers("job-1", 2)
    status = await deliver(
        receiver.url("/flaky"), JOB, allow=LOCAL, retries=3, timeout_s=5, backoff_s=0, headers=headers
    )
    assert status == "delivered: HTTP 200"
    assert receiver.keys == [("job-1", "2"), ("job-1", "2")]
    assert {b["type"] for b in receiver.bodies} == {"application/json"}  # not replaced by the extra headers


async def test_a_receiver_that_keeps_failing_gets_exactly_retries_attempts(receiver):
    receiver.script["/down"] = [500]
    receiver.script["/busy"] = [429]
    status = await deliver(receiver.url("/down"), JOB, allow=LOCAL, retries=4, timeout_s=5, backoff_s=0)
    assert (status, receiver.hits["/down"]) == ("failed: HTTP 500 after 4 attempts", 4)
    status = await deliver(receiver.url("/busy"), JOB, allow=LOCAL, retries=1, timeout_s=5, backoff_s=0)
    assert (status, receiver.hits["/busy"]) == ("failed: HTTP 429 after 1 attempt", 1)


async def test_other_client_errors_are_not_retried(receiver):
    receiver.script["/gone"] = [404]
    status = await deliver(receiver.url("/gone"), JOB, allow=LOCAL, retries=3, timeout_s=5, backoff_s=0)
    assert (status, receiver.hits["/gone"]) == ("failed: HTTP 404", 1)


async def test_redirects_are_not_followed(receiver):
    receiver.script["/moved"] = [302]
    status = await deliver(receiver.url("/moved"), JOB, allow=LOCAL, retries=3, timeout_s=5, backoff_s=0)
    assert status == "failed: HTTP 302 (redirects are not followed)"
    assert receiver.hits == Counter({"/moved": 1})  # /landing never asked


async def test_a_shared_client_that_follows_redirects_still_does_not(receiver):
    receiver.script["/moved"] = [307]
    async with httpx.AsyncClient(follow_redirects=True) as client:
        status = await deliver(
            receiver.url("/moved"), JOB, allow=LOCAL, retries=3, timeout_s=5, client=client, backoff_s=0
        )
        assert not client.is_closed  # the caller's client stays the caller's
    assert status == "failed: HTTP 307 (redirects are not followed)"
    assert receiver.hits["/landing"] == 0


async def test_loopback_without_allow_is_refused_and_never_called(receiver):
    status = await deliver(receiver.url("/hook"), JOB, allow=[], retries=3, timeout_s=5, backoff_s=0)
    assert status == "refused: callback_not_allowed"
    assert receiver.hits == Counter()


async def test_the_policy_is_checked_before_every_attempt(receiver, monkeypatch):
    receiver.script["/flaky"] = [500, 500, 200]
    checks: list[str] = []
    real_check = callbacks.check_callback_url

    def counting_check(url, allow):
        checks.append(url)
        real_check(url, allow)

    monkeypatch.setattr(callbacks, "check_callback_url", counting_check)
    status = await deliver(receiver.url("/flaky"), JOB, allow=LOCAL, retries=3, timeout_s=5, backoff_s=0)
    assert status == "delivered: HTTP 200"
    assert len(checks) == receiver.hits["/flaky"] == 3


async def test_connection_errors_are_retried_and_reported_without_their_text():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    requests: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        requests.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [count]}) as client:
        status = await deliver(
            f"http://127.0.0.1:{port}/x", JOB, allow=LOCAL, retries=3, timeout_s=5, client=client, backoff_s=0
        )
    assert status == "failed: connect_error after 3 attempts"
    assert len(requests) == 3


async def test_a_receiver_that_hangs_times_out_per_attempt(receiver):
    status = await deliver(receiver.url("/hang"), JOB, allow=LOCAL, retries=2, timeout_s=0.2, backoff_s=0)
    assert status == "failed: timeout after 2 attempts"
    assert receiver.hits["/hang"] == 2


async def test_an_unresolvable_name_is_retried(monkeypatch):
    lookups: list[str] = []

    def no_such_host(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    status = await deliver("https://hooks.example/x", JOB, allow=[], retries=2, timeout_s=5, backoff_s=0)
    assert status == "failed: callback_unresolvable after 2 attempts"
    assert lookups == ["hooks.example", "hooks.example"]


async def test_a_payload_that_is_not_json_is_a_bug_raised_before_any_attempt(receiver):
    with pytest.raises(TypeError):
        await deliver(receiver.url("/hook"), {"x": object()}, allow=LOCAL, retries=3, timeout_s=5)
    with pytest.raises(ValueError):
        await deliver(receiver.url("/hook"), JOB, allow=LOCAL, retries=0, timeout_s=5)
    assert receiver.hits == Counter()
