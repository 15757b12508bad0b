"""`moorage serve`: the HTTP server (uvicorn) for registry models."""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config import SETTINGS_FILE_ENV, Settings, read_settings_file, write_settings_file
from ..errors import MissingDependency, MoorageError
from ..observability.logging import setup_logging
from .context import console, state


def serve(
    ctx: typer.Context,
    model: Annotated[
        Optional[list[str]], typer.Option("--model", "-m", help="reference to serve (repeat); default: serve.models")
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="listen address (default 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="TCP port (default 8000)")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="server processes, each loads the models")] = None,
    ssl_certfile: Annotated[Optional[Path], typer.Option(help="TLS certificate (PEM); serve HTTPS")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option(help="TLS private key (PEM)")] = None,
) -> None:
    """Serve models over HTTP: REST, OpenAI-compatible API, /metrics, hot swaps when aliases move."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependency("serving needs: pip install 'moorage[serve]'") from None
    st = state(ctx)
    serve_opts = {
        "models": model,
        "host": host,
        "port": port,
        "workers": workers,
        "ssl_certfile": ssl_certfile,
        "ssl_keyfile": ssl_keyfile,
    }
    serve_settings = st.settings.serve.model_copy(update={k: v for k, v in serve_opts.items() if v is not None})
    settings = st.settings.model_copy(update={"serve": serve_settings})
    if not serve_settings.models:
        raise MoorageError("no model to serve: pass --model NAME[@ALIAS|:VERSION] (or set serve.models)")
    for ref in serve_settings.models:  # fail here, in one line, rather than in every worker
        info = st.registry.resolve(ref)
        console.print(f"serving {ref} -> {info.name}:{info.version} ({info.task})", highlight=False)
    _check_tls(serve_settings)
    if not settings.security.auth:
        console.print(
            "[yellow]warning:[/] security.auth is false: anyone who reaches this server has admin rights "
            "(local development only)",
            highlight=False,
        )
    if serve_settings.workers > 1 and settings.security.auth and not settings.security.limits.redis_url:
        if _has_rate_limits(st.registry, settings):
            console.print(
                f"[yellow]warning:[/] rate limits are kept per worker process: a key may make up to "
                f"{serve_settings.workers}x its limit; set security.limits.redis_url to share them",
                highlight=False,
            )
    _setup_logging(settings)
    from ..server.connections import bounded_protocol

    options: dict[str, Any] = {
        "host": serve_settings.host,
        "port": serve_settings.port,
        "timeout_graceful_shutdown": int(serve_settings.graceful_timeout_s),
        "log_level": settings.log_level.lower(),
        "access_log": settings.log_level == "DEBUG",
        "log_config": None,  # uvicorn's loggers reach the one handler of `setup_logging` (JSON included)
        "limit_concurrency": serve_settings.limit_concurrency,
        "timeout_keep_alive": serve_settings.keep_alive_timeout_s,
        # uvicorn has no deadline for a request's headers, no bound on their size with httptools, and no
        # cap on connections that send no request
        "http": bounded_protocol(
            serve_settings.header_timeout_s, serve_settings.max_header_bytes, serve_settings.limit_concurrency
        ),
        "h11_max_incomplete_event_size": serve_settings.max_header_bytes,
    }
    if serve_settings.ssl_certfile:
        options |= {"ssl_certfile": str(serve_settings.ssl_certfile), "ssl_keyfile": str(serve_settings.ssl_keyfile)}
    if serve_settings.workers == 1:
        from ..server import create_app

        app = create_app(settings, registry=st.registry)
        # uvicorn stops gracefully on SIGTERM, then raises it again under the handler in place before it
        # ran: this one, so that a drained server exits 0 (a stop on request, as a supervisor expects),
        # and one that stopped itself because an engine died exits 1 (restart me, even on-failure)
        signal.signal(signal.SIGTERM, lambda signum, frame: _exit(app))
        uvicorn.run(app, **options)
        return
    # The workers get the settings, master key included, in a file only this user can read, inside
    # a folder only this user can enter (mode 0700), removed at exit; the environment of a process
    # is readable by much more (ps e, /proc, crash reports) and is inherited by everything it starts.
    with tempfile.TemporaryDirectory(prefix="moorage-serve-") as private:
        metrics_dir = serve_settings.metrics_dir or Path(private) / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        settings = settings.model_copy(update={"serve": serve_settings.model_copy(update={"metrics_dir": metrics_dir})})
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # prometheus_client reads it in each worker
        os.environ[SETTINGS_FILE_ENV] = str(write_settings_file(settings, Path(private) / "settings.json"))
        uvicorn.run("moorage.cli.serve:worker_app", factory=True, workers=serve_settings.workers, **options)


def _exit(app) -> None:
    raise SystemExit(0 if app.state.pool.engine_failure is None else 1)


def _has_rate_limits(registry, settings: Settings) -> bool:
    from ..security.keys import KeyStore

    limits = settings.security.limits
    if limits.requests_per_minute or limits.tokens_per_minute:
        return True
    return any(k.requests_per_minute or k.tokens_per_minute for k in KeyStore(registry.catalog).list())


def _check_tls(serve_settings) -> None:
    cert, key = serve_settings.ssl_certfile, serve_settings.ssl_keyfile
    if (cert is None) != (key is None):
        raise MoorageError("TLS needs both --ssl-certfile and --ssl-keyfile", code="invalid_tls")
    for path in (cert, key):
        if path is not None and not Path(path).is_file():
            raise MoorageError(f"TLS file {path} does not exist", code="invalid_tls")
    if cert is not None:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, ValueError) as exc:
            raise MoorageError(f"cannot use TLS certificate {cert} with key {key}: {exc}", code="invalid_tls") from None


def worker_app():
    """Worker-process entry point for `--workers N`: the app for the settings the parent wrote."""
    from ..observability import metrics
    from ..server import create_app

    faulthandler.enable()  # as in the parent (cli.main): a worker's crash shows its Python stacks
    settings = read_settings_file()  # the file that SETTINGS_FILE_ENV names
    metrics.merge_processes(settings.serve.metrics_dir)
    _forget_killed_workers(settings.serve.metrics_dir)
    _setup_logging(settings)
    # The workers share one listening socket and uvicorn accepts on it once the app has started: a
    # worker that started before its models loaded would take connections only to answer them 503
    # while the other workers could serve them.
    return create_app(settings, load_before_serving=True)


def _setup_logging(settings: Settings) -> None:
    """Libraries log their warnings; moorage and uvicorn log at ``log_level``."""
    root_level = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"
    setup_logging(root_level, settings.observability.log_format, moorage_level=settings.log_level)


def _forget_killed_workers(metrics_dir: Path | None) -> None:
    """A worker that stops drops its live gauges (in-flight, queue depth, running sequences); one
    that was killed (SIGKILL, out of memory) could not, and its last values would count forever.
    A worker starts after another one ended, so each start removes the gauges of workers that are gone."""
    from ..observability import metrics

    if metrics_dir is None:
        return
    pids = {int(m[1]) for f in metrics_dir.glob("gauge_live*.db") if (m := re.search(r"_(\d+)\.db$", f.name))}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            metrics.mark_process_dead(pid)
        except PermissionError:  # alive, another user's
            pass
