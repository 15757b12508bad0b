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
_now = {"test": "no test", "budget": None}


def _watchdog(config, after_s: float, why: str, status: int) -> threading.Timer:
    """After `after_s`, unless cancelled: say `why` and print every thread's stack on the real
    stderr (the running test's capture gives it back first), then end the process with `status`."""

    def fire() -> None:
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.suspend_global_capture(in_=True)
        print(f"\n{why.format(test=_now['test'])}; its threads:", file=sys.__stderr__, flush=True)
        faulthandler.dump_traceback(file=sys.__stderr__)
        os._exit(status)

    timer = threading.Timer(after_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def pytest_sessionstart(session):
    """pytest-timeout ends one slow test, but not one blocked inside a C call (its alarm waits for
    the call to return): past the session's budget the run ends red (3) naming the running test,
    instead of being cut off with no word of why."""
    why = f"the test session ran past its budget of {SESSION_BUDGET_S:.0f} s (MOORAGE_TEST_BUDGET_S) in {{test}}"
    _now["budget"] = _watchdog(session.config, SESSION_BUDGET_S, why, 3)


def pytest_runtest_logstart(nodeid, location):
    _now["test"] = nodeid


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """After the last test the interpreter waits for every non-daemon thread. One left blocked (a
    broker client's call on a server the session has stopped) would hang the run: a minute on, the
    process prints its threads and ends with the tests' own status (their verdict stands; the
    stacks say what to fix)."""
    if _now["budget"] is not None:
        _now["budget"].cancel()
    why = f"the test process did not exit within {EXIT_GRACE_S:.0f} s of the session's end (status {int(exitstatus)})"
    _watchdog(session.config, EXIT_GRACE_S, why, int(exitstatus))


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
