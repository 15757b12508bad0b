"""A server's stop: SIGTERM turns ``/readyz`` 503 at once, the server keeps serving for
``serve.drain_delay_s``, then uvicorn's own graceful stop closes the listener and waits up to
``serve.graceful_timeout_s`` for what is in flight, streams included.

A load balancer or a Kubernetes Service keeps sending to a pod for a moment after it is told to stop
(the endpoint removal reaches every node's proxy asynchronously); a server that closed its listener
at the signal would answer those requests with a connection error. The drain delay keeps it serving
them, while ``/readyz`` tells every prober that it is going away.

uvicorn installs its SIGTERM/SIGINT handler before the app starts; this one is installed on top of
whatever the app's start-up left (uvicorn's, and the config delivery's, which ends every held
long-poll): it marks the server as stopping, and calls the handler below it once the delay has
passed. So the config long-polls keep being served during the delay and end at once when the
listener closes, not at the end of their 25 s hold.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from ..observability import metrics

log = logging.getLogger("moorage.server")


class Drain:
    """The server's stopping state and its signal hook. `shutting_down` is set from the first
    SIGTERM or SIGINT on. SIGTERM waits `delay_s` before the server stops; SIGINT (Ctrl+C), a second
    signal, or a server whose engine died (nothing left to serve) stop without waiting."""

    def __init__(self, delay_s: float, *, can_serve: Callable[[], bool] = lambda: True) -> None:
        self.delay_s = delay_s
        self.can_serve = can_serve
        self.shutting_down = False
        self._handlers: list[tuple[int, Any, Any]] = []
        self._timer: asyncio.TimerHandle | None = None

    def install(self) -> None:
        """Hook SIGTERM and SIGINT on top of the handlers in place (only a program's main thread has
        signals; an app driven by a test or a server without signal handlers is left alone)."""
        self._handlers = []
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            below = signal.getsignal(sig)
            if not callable(below) or below is signal.default_int_handler:  # no server's: left alone
                continue

            def on_signal(signum: int, frame: Any, below: Callable = below) -> None:
                try:
                    loop.call_soon_threadsafe(self.begin, signum, below)
                except RuntimeError:  # the loop has closed: the server has stopped already
                    below(signum, frame)

            signal.signal(sig, on_signal)
            self._handlers.append((sig, below, on_signal))

    def uninstall(self) -> None:
        """Put the handlers below back (if nothing replaced this one meanwhile)."""
        for sig, below, mine in self._handlers:
            if signal.getsignal(sig) is mine:
                signal.signal(sig, below)
        self._handlers = []
        if self._timer is not None:
            self._timer.cancel()

    def begin(self, signum: int, stop: Callable[[int, Any], None]) -> None:
        """Not ready from now on; `stop(signum, None)` (the server's own stop) after the delay."""
        first = not self.shutting_down
        self.shutting_down = True
        metrics.READY.set(0)
        delay = self.delay_s if first and signum == signal.SIGTERM and self.can_serve() else 0.0
        if self._timer is not None:  # a second signal: stop now
            self._timer.cancel()
            self._timer = None
        if delay > 0:
            log.info(
                "stopping: /readyz answers 503; new requests are served %g s more (serve.drain_delay_s), "
                "then the listener closes",
                delay,
            )
            self._timer = asyncio.get_running_loop().call_later(delay, self._stop, signum, stop)
        else:
            self._stop(signum, stop)

    def _stop(self, signum: int, stop: Callable[[int, Any], None]) -> None:
        self._timer = None
        log.info("stopping: /readyz answers 503, the listener closes, in-flight requests finish")
        stop(signum, None)
