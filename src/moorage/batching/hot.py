"""Putting new hot settings in force inside a running process (what a config center release changes).

Each object that holds hot values has ``stage(settings)``: it checks the values and builds what they
need (compiled filters, routers, engine configs) without changing anything, and returns the swap
that puts them in force, plain assignments that cannot fail. `apply_hot` stages every object first,
so a release that one of them refuses changes none of them, then swaps them all in one go on the
event loop: no request sees half a release, and a call already running finishes with the values it
started with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ..config import Settings
from .routing import RequestGray

Gray = Sequence[tuple[RequestGray, Settings]]
Stage = Callable[[Settings, Gray], Callable[[], None]]

# the loggers whose level is moorage's (`observability.logging.setup_logging` gives uvicorn's the same)
MOORAGE_LOGGERS = ("moorage", "uvicorn", "uvicorn.error")


def apply_hot(settings: Settings, *stages: Stage, gray: Gray = ()) -> None:
    """Stage `settings` on every object (e.g. ``guard.stage, service.stage``), then swap them all and
    set moorage's log level; raises, with nothing changed, if any refuses them. `gray`: request-share
    gray releases with the settings of their lane (`server.security.request_gray`)."""
    swaps = [stage(settings, gray) for stage in stages]
    for swap in swaps:
        swap()
    for name in MOORAGE_LOGGERS:
        logging.getLogger(name).setLevel(settings.log_level)
