"""Shared fixtures. Markers come from the folder a test lives in (unit, integration, e2e, faults)."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from moorage.config import load_settings
from moorage.registry import Registry
from moorage.runtime import make_fake_model

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts[0] in ("integration", "e2e", "faults"):
            item.add_marker(getattr(pytest.mark, parts[0]))


EXIT_GRACE_S = 60.0
SESSION_BUDGET_S = float(os.environ.get("MOORAGE_TEST_BUDGET_S", "4500"))  # CI stops the whole job at 90 min
_running: list[str] = []


def pytest_sessionstart(session):
    """pytest-timeout ends one slow test, but not one blocked inside a C call (its alarm waits for
    the call to return): past the session's budget a watchdog names the running test, prints every
    thread's stack and fails the run, so that it ends red with a reason instead of being cut off."""

    def watchdog() -> None:
        capture = session.config.pluginmanager.getplugin("capturemanager")
        if capture is not None:  # the running test's output capture holds stderr: give it back first
            capture.suspend_global_capture(in_=True)
        where = _running[-1] if _running else "no test"
        print(f"\nthe test session ran past its budget of {SESSION_BUDGET_S:.0f} s (MOORAGE_TEST_BUDGET_S) "
              f"in {where}; its threads:", file=sys.__stderr__, flush=True)  # fmt: skip
        faulthandler.dump_traceback(file=sys.__stderr__)
        os._exit(3)

    timer = threading.Timer(SESSION_BUDGET_S, watchdog)
    timer.daemon = True
    timer.start()
    session.config._moorage_budget = timer


def pytest_runtest_logstart(nodeid, location):
    _running[:] = [nodeid]


def pytest_unconfigure(config):
    """After the last test the interpreter waits for every non-daemon thread. One left blocked (a
    broker client's call on a server the session has stopped) would hang the run with no word of
    why: a watchdog gives the exit a minute, then prints every thread's stack and ends the process
    with the session's own status (the tests' verdict stands; the stacks say what to fix)."""
    status = int(getattr(config, "_moorage_exitstatus", 1))
    if budget := getattr(config, "_moorage_budget", None):
        budget.cancel()

    def watchdog() -> None:  # still here a minute on: something blocks the exit
        print(f"\nthe test process did not exit within {EXIT_GRACE_S:.0f} s of the session's end "
              f"(status {status}); its threads:", file=sys.__stderr__, flush=True)  # fmt: skip
        faulthandler.dump_traceback(file=sys.__stderr__)
        os._exit(status)

    timer = threading.Timer(EXIT_GRACE_S, watchdog)
    timer.daemon = True
    timer.start()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._moorage_exitstatus = exitstatus


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def settings(home: Path):
    """Auth off (the serving tests are about serving); tests/unit/test_security_*.py turn it on."""
    return load_settings(
        environ={"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", "MOORAGE_SECURITY__AUTH": "false"}
    )


@pytest.fixture
def registry(settings):
    reg = Registry.from_settings(settings)
    yield reg
    reg.close()


@pytest.fixture
def fake_model(tmp_path: Path):
    """Factory: a fake model folder for a task; `seed` makes different weights."""

    def make(task: str = "embed", seed: int = 0, **kwargs) -> Path:
        return make_fake_model(tmp_path / f"src-{task}-{seed}", task, seed=seed, **kwargs)

    return make


def registry_snapshot(reg: Registry, name: str):
    """Everything export/import must keep: versions, checksums, aliases, tags and history rows."""
    versions = [
        (
            v.version,
            v.task,
            v.framework,
            v.manifest_sha256,
            v.created_by,
            v.created_at,
            v.tags,
            v.aliases,
            [(f.path, f.sha256, f.size) for f in v.manifest.files],
        )
        for v in reg.list_versions(name)
    ]
    history = [(h.alias, h.action, h.from_version, h.to_version, h.actor, h.reason, h.at) for h in reg.history(name)]
    return versions, history


@pytest.fixture(name="registry_snapshot")
def _registry_snapshot_fixture():
    return registry_snapshot


@pytest.fixture
def serving():
    """Async context manager: the HTTP app in-process, models loaded, and an httpx client on it."""
    import httpx
    from asgi_lifespan import LifespanManager

    from moorage.server import create_app

    @asynccontextmanager
    async def serve(settings, registry, refs=("emb@production", "cls", "gen"), **serve_settings):
        settings = settings.model_copy(update={"serve": settings.serve.model_copy(update=serve_settings)})
        app = create_app(settings, list(refs), registry=registry)
        async with LifespanManager(app) as manager:
            await app.state.loading
            transport = httpx.ASGITransport(manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://moorage") as client:
                yield app, client

    return serve


@pytest.fixture
def anyio_backend():
    """`pytestmark = pytest.mark.anyio` runs a module's async tests on asyncio."""
    return "asyncio"


@pytest.fixture(scope="session")
def smollm2_folder(request, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF file once per test session (about 2 minutes on
    2 cores), kept in pytest's cache so later runs in the same checkout reuse it."""
    from moorage.demo import assets

    cache = request.config.cache
    folder = cache.mkdir("moorage-demo") if cache is not None else tmp_path_factory.mktemp("moorage-demo")
    return assets.smollm2_folder(folder)
