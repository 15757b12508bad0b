"""The config center's schema: the hot part of the settings tree, typed by the models the process uses.

A release carries a partial, nested slice of the settings (``{"serve": {"max_batch_size": 16}}``).
`validate_values` checks it with the very pydantic sections a process is built from (`ServeSettings`,
`StreamSettings`, `LimitSettings`, `FilterSettings`, the routing model), so a value a process would
refuse at start-up is refused when it is saved, then applies the rules no single field can check:
split weights that sum to 100, split targets that exist in the registry, filter patterns that compile.
Every problem is named by the JSON pointer of its field (``/routing/minilm/split/0/weight``).

Keys are hot (`HOT_KEYS`: applied by a running process) or restart-flagged (`RESTART_KEYS`: kept in
the release, effective once a process restarts, and flagged so in every diff). Nothing else of the
settings tree (catalog URLs, secrets, the home folder) can travel in a release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..config import FilterSettings, LimitSettings, RouteSettings, ServeSettings, Settings, SplitArm, StreamSettings
from ..errors import MoorageError, Unprocessable

if TYPE_CHECKING:
    from ..registry import Registry

# what the engines, the inference service and the stream worker take in `stage` (batching/hot.py); the
# other keys of the same sections are read once, when a process starts (serve.max_inputs: by the routes)
_SERVE_HOT = ("max_batch_size", "max_wait_ms", "max_queue", "request_timeout_s", "max_num_seqs",
              "max_prefill_tokens", "max_waiting_seqs", "default_max_tokens")  # fmt: skip
_STREAM_HOT = ("batch_size", "max_wait_ms", "item_timeout_s", "max_text_chars", "model_retries", "sink_retries",
               "backoff_s", "max_backoff_s", "default_max_tokens")  # fmt: skip
_LIMITS_HOT = ("requests_per_minute", "tokens_per_minute", "max_text_chars", "max_tokens")

# JSON pointers; a pointer covers everything below it ("/security/filters" holds every model's filters)
HOT_KEYS: frozenset[str] = frozenset(
    [f"/serve/{k}" for k in _SERVE_HOT]
    + [f"/stream/{k}" for k in _STREAM_HOT]
    + [f"/security/limits/{k}" for k in _LIMITS_HOT]
    + ["/security/filters", "/routing", "/log_level"]
)
RESTART_KEYS: frozenset[str] = frozenset(
    [f"/serve/{k}" for k in ServeSettings.model_fields if k not in _SERVE_HOT]
    + [f"/stream/{k}" for k in StreamSettings.model_fields if k not in _STREAM_HOT]
    + [f"/security/limits/{k}" for k in LimitSettings.model_fields if k not in _LIMITS_HOT]
)
SCOPE_RE = re.compile(r"^(global|model:[a-z0-9][a-z0-9_.-]{0,62}|group:[A-Za-z0-9][A-Za-z0-9_.:-]{0,80})$")


class InvalidConfig(Unprocessable):
    """A release's values break the schema (422 ``invalid_config``): `errors` lists each problem as
    ``{"pointer": "/serve/max_batch_size", "message": ...}``."""

    code = "invalid_config"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        shown = "; ".join(f"{e['pointer'] or '/'}: {e['message']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"invalid config: {shown}{more}", param=errors[0]["pointer"] if errors else None)
        self.errors = errors


class InvalidScope(MoorageError):
    status = 400
    code = "invalid_scope"
    type = "invalid_request_error"


def check_scope(scope: str) -> str:
    if not isinstance(scope, str) or not SCOPE_RE.fullmatch(scope):
        raise InvalidScope(
            f"invalid scope {scope!r}: use global, model:NAME or group:GROUP (group:servers, group:stream:NAME)"
        )
    return scope


# ---- the release model -------------------------------------------------------------------------------


class _Security(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    limits: LimitSettings | None = None
    filters: dict[str, FilterSettings] | None = None


class _Release(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    log_level: str | None = None
    serve: ServeSettings | None = None
    stream: StreamSettings | None = None
    security: _Security | None = None
    routing: dict[str, RouteSettings] | None = None

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str | None) -> str | None:
        return None if value is None else Settings._check_level(value)


def pointer(loc: tuple[Any, ...] | list[Any]) -> str:
    """The JSON pointer (RFC 6901) of a pydantic error location."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in loc)


def validate_values(values: dict, *, registry: Registry | None = None, scope: str = "global") -> dict:
    """`values` as a release may carry them, or `InvalidConfig` naming every bad field by pointer.

    Types and bounds come from the settings models, unknown keys are refused, and the cross-key rules
    apply: split weights sum to 100, split targets exist in `registry` (when given), regexes compile.
    A ``model:NAME`` scope holds only that model's ``/routing/NAME`` and ``/security/filters/NAME``."""
    if not isinstance(values, dict):
        raise InvalidConfig([{"pointer": "", "message": "a release's values are an object of settings sections"}])
    try:
        _Release.model_validate(values)
    except ValidationError as exc:
        raise InvalidConfig(
            [{"pointer": pointer(e["loc"]), "message": _message(e)} for e in exc.errors(include_url=False)]
        ) from None
    errors = _scope_errors(values, scope) + _split_errors(values, registry) + _regex_errors(values)
    if errors:
        raise InvalidConfig(errors)
    return values


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        if len(error["loc"]) == 1:
            return "unknown key: a release holds only " + ", ".join(_TOP)
        return "unknown key"
    return str(error["msg"])


_TOP = ("log_level", "serve", "stream", "security/limits", "security/filters", "routing")


def _scope_errors(values: dict, scope: str) -> list[dict[str, str]]:
    if not scope.startswith("model:"):
        return []
    name = scope.removeprefix("model:")
    allowed = {f"/routing/{name}", f"/security/filters/{name}"}
    return [
        {"pointer": p, "message": f"scope {scope} holds only /routing/{name} and /security/filters/{name}"}
        for p in flatten(values, depth=3)
        if not any(p == a or p.startswith(a + "/") for a in allowed)
    ]


def _split_errors(values: dict, registry: Registry | None) -> list[dict[str, str]]:
    """Every split target must resolve in the registry (the weights were checked by `RouteSettings`)."""
    if registry is None:
        return []
    errors = []
    for model, route in (values.get("routing") or {}).items():
        for i, arm in enumerate(route["split"]):
            ref = SplitArm.model_validate(arm).ref(model)
            try:
                registry.resolve(ref)
            except MoorageError as exc:  # unknown model, alias or version, or a malformed reference
                errors.append(
                    {
                        "pointer": f"/routing/{model}/split/{i}/target",
                        "message": f"{ref} is not in the registry: {exc.message}",
                    }
                )
    return errors


def _regex_errors(values: dict) -> list[dict[str, str]]:
    errors = []
    for model, rules in ((values.get("security") or {}).get("filters") or {}).items():
        for side in ("input_deny", "input_allow", "output_deny", "output_allow"):
            for i, rule in enumerate(rules.get(side) or []):
                if not isinstance(rule, str) or not rule.startswith("re:"):
                    continue
                try:
                    re.compile(f"(?:{rule[3:]})", re.IGNORECASE)  # as the filter joins its rules
                except re.error as exc:
                    where = pointer(("security", "filters", model, side, i))
                    errors.append({"pointer": where, "message": f"pattern does not compile: {exc}"})
    return errors


# ---- keys, diffs, merging ----------------------------------------------------------------------------


def is_restart(ptr: str) -> bool:
    """Whether a change at `ptr` takes effect only after a restart."""
    return any(ptr == k or ptr.startswith(k + "/") for k in RESTART_KEYS)


def flatten(values: Any, prefix: str = "", depth: int | None = None) -> dict[str, Any]:
    """Leaf pointers of nested dicts (lists are leaves), at most `depth` levels deep."""
    if not isinstance(values, dict) or not values or depth == 0:
        return {prefix: values} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(flatten(value, pointer((*_unpoint(prefix), key)), None if depth is None else depth - 1))
    return out


def _unpoint(ptr: str) -> tuple[str, ...]:
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in ptr.split("/")[1:]) if ptr else ()


@dataclass(frozen=True)
class Change:
    pointer: str
    old: Any
    new: Any
    restart: bool


def diff(old: dict, new: dict) -> list[Change]:
    """Key-level changes from `old` to `new` (absent: None), sorted by pointer; restart keys flagged."""
    before, after = flatten(old), flatten(new)
    return [
        Change(p, before.get(p), after.get(p), is_restart(p))
        for p in sorted(before.keys() | after.keys())
        if before.get(p) != after.get(p) or (p in before) != (p in after)
    ]


def merge(base: dict, top: dict) -> dict:
    """`top` deep-merged over `base` (dicts merge, every other value replaces)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_values(settings: Settings, values: dict) -> Settings:
    """The process's settings with a release's values merged in, validated again as a whole."""
    merged = merge(settings.model_dump(), values)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise InvalidConfig(
            [{"pointer": pointer(e["loc"]), "message": _message(e)} for e in exc.errors(include_url=False)]
        ) from None
