"""The `moorage` command. Every user error ends as one line on stderr and exit code 2; a usage mistake
(unknown command, bad option) as click shows it: the usage line, a hint and the error, also exit code 2."""

from __future__ import annotations

import faulthandler
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import __version__
from ..errors import MoorageError
from ..observability.logging import quiet_libraries, setup_logging
from . import audit, compress, configcenter, datasets, keys, models, report, serve, spark, stream
from .context import AppState, RichProgress, console, err_console, state
from .jobs import app as jobs_app
from .train import app as train_app
from .train import evaluate

try:  # typer >= 0.22 carries its own copy of click, whose errors are TyperExceptions
    from typer import TyperException as CommandLineError
except ImportError:  # older typer raises click's own
    from click import ClickException as CommandLineError  # type: ignore[assignment]

app = typer.Typer(
    name="moorage",
    help="Put language models into production: registry, runtime and serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models.app, name="models")
app.add_typer(datasets.app, name="datasets")
app.add_typer(stream.app, name="stream")
app.add_typer(spark.app, name="spark")
app.add_typer(keys.app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.add_typer(train_app, name="train")
app.add_typer(audit.app, name="audit")
app.add_typer(configcenter.app, name="config")
app.command()(serve.serve)
app.command()(report.report)
app.command()(evaluate)
app.command(name="compress")(compress.compress)


def _version(value: bool) -> None:
    if value:
        console.print(f"moorage {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML or TOML settings file")] = None,
    home: Annotated[Optional[Path], typer.Option(help="moorage home (catalog, artifacts)")] = None,
    catalog_url: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL of the catalog")] = None,
    store_url: Annotated[Optional[str], typer.Option(help="folder or fsspec URL of the artifact store")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    registry = {k: v for k, v in {"catalog_url": catalog_url, "store_url": store_url}.items() if v}
    overrides = {"home": home, "log_level": "DEBUG" if verbose else None, "registry": registry or None}
    ctx.obj = AppState(config_file=config, overrides=overrides)
    setup_logging("DEBUG" if verbose else "WARNING")  # `serve` and `stream run` redo it with their settings


@app.command()
def predict(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME:VERSION")],
    texts: Annotated[list[str], typer.Argument(help="input texts")],
    max_tokens: Annotated[int, typer.Option(help="generation: new tokens")] = 32,
) -> None:
    """Run a model on a few texts (loads it, checksums first)."""
    from ..runtime import GenerateInput, GenerationParams, Runtime

    st = state(ctx)
    runtime = Runtime(st.registry, st.settings.runtime)
    model = runtime.get(ref)
    inputs: list = texts
    if model.task == "generate":
        if max_tokens < 1:
            raise MoorageError("--max-tokens must be at least 1", code="invalid_max_tokens")
        params = GenerationParams(max_new_tokens=max_tokens)
        inputs = [GenerateInput(messages=({"role": "user", "content": t},), params=params) for t in texts]
    for text, out in zip(texts, model.predict(inputs)):
        console.print(f"[bold]{text}[/] → {_render(out)}")


@app.command()
def demo(ctx: typer.Context) -> None:
    """Register the demo models (MiniLM embeddings, SmolLM2 chat) and the BBC News dataset."""
    from ..demo.run import run_demo

    quiet_libraries(every_tqdm_bar=True)  # the GGUF conversion's bar; moorage draws its own (rich)
    run_demo(state(ctx), RichProgress, console)


def _render(out) -> str:
    if hasattr(out, "text"):
        return repr(out.text)
    if hasattr(out, "label"):
        return f"{out.label} ({out.score:.3f})"
    values = list(map(float, out))
    return f"[{', '.join(f'{v:.4f}' for v in values[:4])}, ...] (dim {len(values)})"


def main() -> None:
    faulthandler.enable()  # a crash in a C extension prints every thread's Python stack, not just "Segmentation fault"
    try:
        # Non-standalone mode hands errors to us; `typer.Exit(n)` comes back as the return value.
        result = app(standalone_mode=False)
    except MoorageError as exc:
        err_console.print(f"[red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except CommandLineError as exc:  # a usage mistake: click's usage line, the error, exit status 2
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            err_console.print(f"[red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug, not a user error: one line, the traceback only with -v
        logging.getLogger("moorage").debug("unexpected error", exc_info=True)
        err_console.print(
            f"[red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc))} (rerun with -v for details)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
