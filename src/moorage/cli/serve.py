"""`moorage serve`: the HTTP server (uvicorn) for registry models."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Annotated, Optional

import typer

from ..config import Settings
from ..errors import MissingDependency, MoorageError
from .context import console, state

SETTINGS_ENV = "MOORAGE_SERVE_SETTINGS_JSON"  # how `--workers N` hands the settings to each worker


def serve(
    ctx: typer.Context,
    model: Annotated[
        Optional[list[str]], typer.Option("--model", "-m", help="reference to serve (repeat); default: serve.models")
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="listen address (default 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="TCP port (default 8000)")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="server processes, each loads the models")] = None,
) -> None:
    """Serve models over HTTP: REST, OpenAI-compatible API, /metrics, hot swaps when aliases move."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependency("serving needs: pip install 'moorage[serve]'") from None
    st = state(ctx)
    serve_opts = {"models": model, "host": host, "port": port, "workers": workers}
    serve_settings = st.settings.serve.model_copy(update={k: v for k, v in serve_opts.items() if v is not None})
    settings = st.settings.model_copy(update={"serve": serve_settings})
    if not serve_settings.models:
        raise MoorageError("no model to serve: pass --model NAME[@ALIAS|:VERSION] (or set serve.models)")
    for ref in serve_settings.models:  # fail here, in one line, rather than in every worker
        info = st.registry.resolve(ref)
        console.print(f"serving {ref} -> {info.name}:{info.version} ({info.task})", highlight=False)
    logging.getLogger("moorage").setLevel(settings.log_level)
    options = {
        "host": serve_settings.host,
        "port": serve_settings.port,
        "timeout_graceful_shutdown": int(serve_settings.graceful_timeout_s),
        "log_level": settings.log_level.lower(),
        "access_log": settings.log_level == "DEBUG",
    }
    if serve_settings.workers == 1:
        from ..server import create_app

        uvicorn.run(create_app(settings, registry=st.registry), **options)
        return
    metrics_dir = tempfile.mkdtemp(prefix="moorage-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client in each worker
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    try:
        uvicorn.run("moorage.cli.serve:app_from_env", factory=True, workers=serve_settings.workers, **options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def app_from_env():
    """Worker-process entry point for `--workers N` (settings arrive as JSON from the parent)."""
    from ..server import create_app

    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    return create_app(settings)
