"""`moorage keys ...`: API keys for the server (stored hashed in the catalog)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..security.keys import ROLES, KeyStore, parse_expiry
from .context import console, state

app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


@app.command()
def create(
    ctx: typer.Context,
    role: Annotated[str, typer.Option("--role", "-r", help=" | ".join(ROLES))],
    models: Annotated[
        Optional[list[str]], typer.Option("--models", "-m", help="model name pattern, e.g. 'chat-*' (repeat)")
    ] = None,
    name: Annotated[str, typer.Option(help="who or what uses it")] = "",
    expires: Annotated[Optional[str], typer.Option(help="30d, 12h, 90m or an ISO date")] = None,
    rpm: Annotated[Optional[int], typer.Option("--rpm", help="requests per minute (default: settings)")] = None,
    tpm: Annotated[Optional[int], typer.Option("--tpm", help="tokens per minute (default: settings)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print the key only")] = False,
) -> None:
    """Create a key and print it once: only its hash is kept."""
    st = state(ctx)
    info, key = KeyStore(st.registry.catalog).create(
        role,
        name=name,
        models=models or ["*"],
        expires_at=parse_expiry(expires) if expires else None,
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        created_by=f"cli:{st.settings.user}",
    )
    st.audit("create_key", created_key=info.id, role=role)
    if quiet:
        print(key)
        return
    console.print(f"created key [bold]{info.id}[/] ({role}, models {', '.join(info.models)})", highlight=False)
    console.print("store it now, it is not shown again:")
    print(key)


@app.command("list")
def list_(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The keys (ids, roles, patterns, state); never the secrets."""
    keys = KeyStore(state(ctx).registry.catalog).list(include_revoked=all_)
    if as_json:
        print(json.dumps([k.as_dict() for k in keys], indent=2))
        return
    table = Table("id", "name", "role", "models", "state", "expires", "rpm", "tpm", "created")
    for k in keys:
        table.add_row(
            k.id,
            k.name,
            k.role,
            ",".join(k.models),
            k.state,
            f"{k.expires_at:%Y-%m-%d %H:%M}" if k.expires_at else "-",
            str(k.requests_per_minute or "-"),
            str(k.tokens_per_minute or "-"),
            f"{k.created_at:%Y-%m-%d %H:%M} by {k.created_by}",
        )
    console.print(table)


@app.command()
def revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="the key's id (from keys list)")]) -> None:
    """Revoke a key (servers refuse it within seconds)."""
    st = state(ctx)
    info = KeyStore(st.registry.catalog).revoke(key_id)
    st.audit("revoke_key", revoked_key=info.id)
    console.print(f"revoked {info.id}")
