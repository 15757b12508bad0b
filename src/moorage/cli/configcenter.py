"""`moorage config ...`: the effective settings, and the config center's drafts, releases and status.

`moorage config` alone (or `moorage config show`) prints the settings this command runs with. The
other commands edit and publish releases through the same `ConfigCenter` the HTTP API uses, on the
backend of the settings (the catalog, or etcd); the actor in the history and the audit log is
``cli:USER``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..configcenter.releases import ConfigCenter, Release
from ..configcenter.schema import Change, InvalidConfig, pointer
from ..errors import BadRequest, MoorageError
from .context import AppState, console, parse_pairs, state

app = typer.Typer(
    help="The effective settings (alone: print them), and config releases: draft, diff, publish, approve, "
    "rollback, history, status, promote, abandon.",
    invoke_without_command=True,
)

Scope = Annotated[str, typer.Argument(help="global, group:GROUP (group:servers, group:stream:NAME) or model:NAME")]
Number = Annotated[int, typer.Argument(help="release number", min=1)]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]


@app.callback()
def config(
    ctx: typer.Context,
    url: Annotated[
        Optional[str], typer.Option(help="a moorage server: act through its /v1/config API instead of the backend")
    ] = None,
    key: Annotated[
        Optional[str], typer.Option(help="API key for --url (operator or admin; default: config.api_key)")
    ] = None,
) -> None:
    """Print the effective settings (defaults < file < MOORAGE_* < flags), credentials masked."""
    ctx.meta["config_remote"] = (url, key)
    if ctx.invoked_subcommand is None:
        show(ctx)


@app.command()
def show(ctx: typer.Context) -> None:
    """Print the effective settings (defaults < file < MOORAGE_* < flags), credentials masked."""
    print(json.dumps(state(ctx).settings.redacted(), indent=2))


@contextmanager
def _center(ctx: typer.Context) -> Iterator[ConfigCenter | RemoteCenter]:
    """The local `ConfigCenter` (the registry is opened only to check split targets), or with --url the
    server's, through `RemoteCenter`: the same calls either way; closed when the block ends."""
    st = state(ctx)
    url, key = ctx.meta.get("config_remote", (None, None))
    center: ConfigCenter | RemoteCenter
    if url:
        secret = st.settings.config.api_key
        center = RemoteCenter(url, key or (secret.get_secret_value() if secret else None))
    else:
        center = ConfigCenter.from_settings(st.settings)
    try:
        yield center
    finally:
        center.close()


def _actor(st: AppState) -> str:
    return f"cli:{st.settings.user}"


def _set(values: dict, key: str, value: Any) -> None:
    """Set `key` (``/serve/max_batch_size`` or ``serve.max_batch_size``) in nested `values`."""
    parts = (
        [p.replace("~1", "/").replace("~0", "~") for p in key[1:].split("/")] if key.startswith("/") else key.split(".")
    )
    if not all(parts):
        raise BadRequest(f"bad key {key!r}: use serve.max_batch_size or /serve/max_batch_size", code="invalid_key")
    node = values
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = child = child if isinstance(child, dict) else {}
        node = child
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _read_values(path: Path) -> dict:
    from ..config import read_config_file

    return read_config_file(path)


@app.command()
def draft(
    ctx: typer.Context,
    scope: Scope,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="KEY=VALUE (JSON or text), e.g. serve.max_batch_size=16")
    ] = None,
    unset: Annotated[Optional[list[str]], typer.Option(help="remove KEY from the draft")] = None,
    file: Annotated[Optional[Path], typer.Option(help="YAML or TOML file that replaces the whole draft")] = None,
) -> None:
    """Print the scope's draft; with --set/--unset/--file, change it (validated on save)."""
    st = state(ctx)
    with _center(ctx) as center:
        values = _read_values(file) if file else center.draft(scope)
        for key, value in parse_pairs(set_, "--set").items():
            _set(values, key, value)
        for key in unset or []:
            _set(values, key, None)
        if file or set_ or unset:
            values = center.edit_draft(scope, values, author=_actor(st))
    print(json.dumps(values, indent=2, sort_keys=True))


@app.command()
def diff(ctx: typer.Context, scope: Scope, as_json: AsJson = False) -> None:
    """The draft against the scope's current release, key by key; restart-only keys are flagged."""
    with _center(ctx) as center:
        changes = center.diff(scope)
    if as_json:
        print(json.dumps([c.__dict__ for c in changes], indent=2))
        return
    if not changes:
        console.print(f"no changes: the draft of {scope} equals its current release", highlight=False)
        return
    for c in changes:
        flag = "  [yellow](restart)[/]" if c.restart else ""
        console.print(f"{c.pointer}: {json.dumps(c.old)} -> {json.dumps(c.new)}{flag}", highlight=False)


def _gray(labels: list[str] | None, percent: int | None, by: str, key: str | None) -> dict | None:
    if labels:
        return {"labels": {k: str(v) for k, v in parse_pairs(labels, "--gray-label").items()}}
    if percent is not None:
        return {"percent": percent, "by": by} | ({"key": key} if key else {})
    return None


def _print_release(release: Release) -> None:
    state_ = release.state.replace("_", " ")
    extra = f", gray {json.dumps(release.gray)}" if release.gray else ""
    console.print(f"release {release.number} of {release.scope}: {state_}{extra}", highlight=False)


@app.command()
def publish(
    ctx: typer.Context,
    scope: Scope,
    comment: Annotated[str, typer.Option("--comment", "-m", help="why")] = "",
    gray_label: Annotated[
        Optional[list[str]], typer.Option("--gray-label", help="gray release to instances with LABEL=VALUE")
    ] = None,
    gray_percent: Annotated[Optional[int], typer.Option(help="gray release to a sticky share (1-99)")] = None,
    gray_by: Annotated[str, typer.Option(help="the share is of: instance | request")] = "instance",
    gray_key: Annotated[Optional[str], typer.Option(help="by request: api_key | header:NAME")] = None,
    as_json: AsJson = False,
) -> None:
    """Publish the scope's draft as a numbered release (pending approval when config.require_approval)."""
    st = state(ctx)
    with _center(ctx) as center:
        gray = _gray(gray_label, gray_percent, gray_by, gray_key)
        release = center.publish(scope, author=_actor(st), comment=comment, gray=gray)
    _output(release, as_json)


def _output(release: Release, as_json: bool) -> None:
    if as_json:
        from dataclasses import asdict

        print(json.dumps(asdict(release), indent=2))
    else:
        _print_release(release)


@app.command()
def approve(ctx: typer.Context, number: Number, as_json: AsJson = False) -> None:
    """Approve a pending release (not its author)."""
    st = state(ctx)
    with _center(ctx) as center:
        release = center.approve(number, approver=_actor(st))
    _output(release, as_json)


@app.command()
def rollback(
    ctx: typer.Context,
    scope: Scope,
    to: Annotated[int, typer.Option("--to", help="the release to return to", min=1)],
    comment: Annotated[str, typer.Option("--comment", "-m", help="why")] = "",
    as_json: AsJson = False,
) -> None:
    """Publish a new release of the scope equal to release --to."""
    st = state(ctx)
    with _center(ctx) as center:
        release = center.rollback(scope, to, author=_actor(st), comment=comment)
    _output(release, as_json)


@app.command()
def promote(ctx: typer.Context, number: Number, as_json: AsJson = False) -> None:
    """Merge a gray release into the main line."""
    st = state(ctx)
    with _center(ctx) as center:
        release = center.promote(number, author=_actor(st))
    _output(release, as_json)


@app.command()
def abandon(ctx: typer.Context, number: Number, as_json: AsJson = False) -> None:
    """Drop a gray (or pending) release."""
    st = state(ctx)
    with _center(ctx) as center:
        release = center.abandon(number, author=_actor(st))
    _output(release, as_json)


@app.command()
def history(
    ctx: typer.Context,
    scope: Annotated[Optional[str], typer.Argument(help="only this scope")] = None,
    as_json: AsJson = False,
) -> None:
    """Releases, newest first."""
    with _center(ctx) as center:
        releases = center.history(scope)
    if as_json:
        from dataclasses import asdict

        print(json.dumps([asdict(r) for r in releases], indent=2))
        return
    table = Table("release", "scope", "state", "author", "created", "comment", "keys")
    for r in releases:
        keys = ", ".join(sorted(pointer((k,)) for k in r.values)) or "-"
        note = r.comment + (f" (approved by {r.approved_by})" if r.approved_by else "")
        table.add_row(str(r.number), r.scope, r.state, r.author, r.created_at[:19], note, keys)
    console.print(table)


@app.command()
def status(ctx: typer.Context, as_json: AsJson = False) -> None:
    """M of N instances on the current revision, K rejected (with their reasons)."""
    with _center(ctx) as center:
        report = center.status()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(report["summary"], highlight=False)
    for i in report["instances"]:
        if i["status"] == "rejected" and not i["gone"]:
            console.print(f"  {i['instance_id']} ({i['group']}) rejected revision {i['revision']}: {i['reason']}",
                          highlight=False)  # fmt: skip


class RemoteError(MoorageError):
    """What a server answered an error with (its status and code)."""


class RemoteCenter:
    """`ConfigCenter`'s calls over a server's ``/v1/config`` API; the server acts as the key's id."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url + "/v1/config", headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach {self.url}: {exc}", code="unreachable") from None
        if response.status_code < 400:
            return response.json()
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"message": response.text[:200] or response.reason_phrase, "code": "http_error"}
        if error.get("code") == "invalid_config" and error.get("errors"):
            raise InvalidConfig(error["errors"])
        failure = RemoteError(
            f"{self.url} answered {response.status_code}: {error.get('message')}", code=error.get("code")
        )
        failure.status = response.status_code
        raise failure

    def draft(self, scope: str) -> dict:
        return self._call("GET", f"/drafts/{scope}")["values"]

    def edit_draft(self, scope: str, values: dict, *, author: str) -> dict:
        return self._call("PUT", f"/drafts/{scope}", json={"values": values})["values"]

    def diff(self, scope: str) -> list[Change]:
        return [Change(**c) for c in self._call("GET", f"/drafts/{scope}/diff")["changes"]]

    def publish(self, scope: str, *, author: str, comment: str = "", gray: dict | None = None) -> Release:
        return Release(**self._call("POST", "/releases", json={"scope": scope, "comment": comment, "gray": gray}))

    def approve(self, number: int, *, approver: str) -> Release:
        return Release(**self._call("POST", f"/releases/{number}/approve"))

    def rollback(self, scope: str, to: int, *, author: str, comment: str = "") -> Release:
        return Release(**self._call("POST", "/rollback", json={"scope": scope, "to": to, "comment": comment}))

    def promote(self, number: int, *, author: str) -> Release:
        return Release(**self._call("POST", f"/releases/{number}/promote"))

    def abandon(self, number: int, *, author: str) -> Release:
        return Release(**self._call("POST", f"/releases/{number}/abandon"))

    def history(self, scope: str | None = None) -> list[Release]:
        params = {"scope": scope} if scope else {}
        return [Release(**r) for r in self._call("GET", "/releases", params=params)["data"]]

    def status(self) -> dict:
        return self._call("GET", "/status")

    def close(self) -> None:
        self._client.close()
