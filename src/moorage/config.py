"""One settings tree, built once at the edge and passed down.

Precedence, lowest first: defaults < config file (YAML or TOML) < environment ``MOORAGE_*``
(nested keys with ``__``, e.g. ``MOORAGE_REGISTRY__CATALOG_URL``) < explicit overrides (CLI flags).

The environment is read here and nowhere else, and `load_settings` takes it as an argument so that
tests inject it instead of patching ``os.environ``. The tree is frozen: another value means another
tree (``model_copy(update=...)``). People and logs see `Settings.redacted`, never a plain dump; a
parent process hands the settings, secrets included, to its workers in an owner-only file
(`write_settings_file`), not in the environment.
"""

from __future__ import annotations

import difflib
import getpass
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import to_json, to_jsonable_python
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .errors import ConfigError

ENV_PREFIX = "MOORAGE_"
CONFIG_NAMES = ("config.yaml", "config.yml", "config.toml")
SETTINGS_FILE_ENV = "MOORAGE_SETTINGS_FILE"  # where a worker process finds the settings its parent wrote
# MOORAGE_* variables that are not settings: which file to read, and scripts/install.sh's torch pin
NOT_SETTINGS_ENV = frozenset({"MOORAGE_CONFIG", SETTINGS_FILE_ENV, "MOORAGE_TORCH_SPEC"})
# Kubernetes' service links: a Service named moorage (or moorage-x) gives every pod of its namespace
# MOORAGE[_X]_SERVICE_HOST, MOORAGE[_X]_SERVICE_PORT[_NAME], MOORAGE[_X]_PORT=tcp://ADDR:PORT and
# MOORAGE[_X]_PORT_8000_TCP[_PROTO|_PORT|_ADDR]; none has a double underscore
_SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT(_\w+)?)$|_PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?$")

# Settings are read once and never change in a running process: a new value means a new tree
# (``model_copy(update=...)``), so no part of a process sees settings another part changed.
SECTION_CONFIG = ConfigDict(extra="forbid", frozen=True)


class RegistrySettings(BaseModel):
    model_config = SECTION_CONFIG

    catalog_url: str | None = Field(
        None, description="SQLAlchemy URL of the catalog; default: SQLite file in the home folder"
    )
    store_url: str | None = Field(
        None, description="fsspec URL or folder of the artifact store; default: <home>/artifacts"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the store (e.g. endpoint_url)"
    )
    lock_timeout_s: float = Field(30.0, gt=0, description="how long to wait for the catalog lock")


class RuntimeSettings(BaseModel):
    model_config = SECTION_CONFIG

    cache_dir: Path | None = Field(None, description="local copies of remote artifacts")
    max_loaded_bytes: int = Field(4 << 30, gt=0, description="memory bound of loaded models")
    device: str = Field("cpu", description="torch device for models")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and compute dtype; auto: bfloat16 where the hardware has it natively, else float32"
    )


class ServeSettings(BaseModel):
    model_config = SECTION_CONFIG

    host: str = Field("127.0.0.1", description="address the server listens on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    workers: int = Field(1, ge=1, description="server processes (each loads the models)")
    models: list[str] = Field(default_factory=list, description="references to serve, e.g. minilm@production")
    max_batch_size: int = Field(32, ge=1, description="inputs per embedding/classification batch")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    max_queue: int = Field(1024, ge=1, description="inputs queued per model before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a queued request (504 after)")
    max_num_seqs: int = Field(32, ge=1, description="sequences decoded together per generation model")
    max_prefill_tokens: int = Field(4096, ge=1, description="prompt tokens prefilled per step")
    max_waiting_seqs: int = Field(256, ge=1, description="generation requests queued before 429")
    poll_interval_s: float = Field(2.0, ge=0, description="how often served aliases are re-resolved (0: never)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (413 above)")
    max_inputs: int = Field(2048, ge=1, description="texts per request")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request names none")
    graceful_timeout_s: float = Field(30.0, gt=0, description="how long SIGTERM waits for in-flight work")
    limit_concurrency: int | None = Field(
        1000,
        ge=1,
        description="per worker process: most open connections and requests at once; beyond, a request is "
        "answered 503 and a new connection is answered 503 and closed at once (none: no limit)",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection that has not sent a request's complete headers this long after connecting "
        "(or after the first byte of its next request) is closed",
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after this")
    max_header_bytes: int = Field(64 << 10, ge=1024, description="largest request line and headers (431 above)")
    exit_on_engine_failure: bool = Field(
        True,
        description="when a model's engine dies, stop the process so its supervisor restarts it "
        "(false: stay up and answer 503 until restarted by hand)",
    )
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM): serve HTTPS")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM)")
    metrics_dir: Path | None = Field(
        None,
        description="with several workers: an empty folder where each worker writes the metrics /metrics merges "
        "(default: a private temporary folder, removed at exit)",
    )
    load_budget_s: float = Field(
        300.0,
        gt=0,
        description="how long loading the served models may take at start-up (the Kubernetes startup probe "
        "allows this much before restarting the pod)",
    )
    cold_start_hold_s: float = Field(
        10.0,
        ge=0,
        description="while the served models load, a request waits up to this for them, then gets 503 with "
        "Retry-After (0: answer 503 at once)",
    )
    cold_start_queue: int = Field(
        64, ge=0, description="requests held at once while the models load; beyond, 503 with Retry-After at once"
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="after SIGTERM: /readyz answers 503 and new requests are still served this long (time for a "
        "load balancer to stop sending), then the listener closes and in-flight work gets graceful_timeout_s. "
        "0 by default: on Kubernetes the pod's preStop sleep covers the endpoint removal before SIGTERM comes, and "
        "a server with nothing in front loses only time; behind a balancer that probes /readyz, set it to the "
        "probe's interval times its failure count",
    )
    ignore_unsupported: list[str] = Field(
        default_factory=list,
        description="request fields the OpenAI routes accept and ignore although they do not implement them "
        "(e.g. frequency_penalty for a client that always sends one); any other unsupported field answers 400 "
        "unsupported_parameter naming it",
    )


class StreamSettings(BaseModel):
    model_config = SECTION_CONFIG

    batch_size: int = Field(64, ge=1, description="messages received and batched together")
    max_wait_ms: float = Field(20.0, ge=0, description="how long a model batch waits to fill")
    max_in_flight: int = Field(2, ge=1, description="batches between receive and ack (pipelining)")
    receive_timeout_s: float = Field(0.5, gt=0, description="how long one receive waits for a first message")
    max_text_chars: int = Field(20_000, ge=1, description="longer texts are dead-lettered (text_too_long)")
    item_timeout_s: float = Field(600.0, gt=0, description="deadline of one message in the model queue")
    model_retries: int = Field(3, ge=0, description="in-place retries of a transient model error")
    sink_retries: int = Field(
        5,
        ge=1,
        description="attempts of a sink write that the sink refuses before the batch goes back; an "
        "unreachable sink (an outage, a full disk) is waited out instead",
    )
    backoff_s: float = Field(0.2, gt=0, description="first retry delay (doubles each time)")
    max_backoff_s: float = Field(10.0, gt=0, description="longest retry delay")
    log_interval_s: float = Field(10.0, gt=0, description="how often progress and lag are logged")
    lease_heartbeat_s: float = Field(
        10.0,
        gt=0,
        description="how often a worker renews the lease of messages it is still working on; keep it well "
        "under the broker's visibility_timeout / claim_idle_ms",
    )
    default_max_tokens: int = Field(128, ge=1, description="generation: max_new_tokens when a message names none")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics and /healthz (503 while stuck) on metrics_host:PORT"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="address of the metrics port (0.0.0.0 in a container, for probes and scrapers)"
    )
    stop_grace_s: float = Field(
        10.0,
        gt=0,
        description="after SIGTERM, how long a worker may finish and acknowledge what it holds; what is "
        "still unsettled then goes back to the broker",
    )
    jobs_url: str | None = Field(None, description="queue of /v1/jobs; default: sqlite queue in the home folder")


class JobSettings(BaseModel):
    model_config = SECTION_CONFIG

    callback_allow: list[str] = Field(
        default_factory=list,
        description="callback hosts exempt from the egress policy, which otherwise refuses loopback, private, "
        "link-local and metadata addresses: hostnames ('hooks.internal', '*.hooks.internal'), addresses or "
        "networks ('127.0.0.1', '10.0.0.0/8')",
    )
    callback_retries: int = Field(3, ge=1, description="attempts of one callback delivery, the first included")
    callback_timeout_s: float = Field(10.0, gt=0, description="deadline of one callback attempt")
    lease_s: float = Field(
        20.0,
        ge=1,
        description="how long a server's hold on a job lasts without renewal (renewed every lease_s / 4); "
        "the jobs of a server that died are taken over by another once it expires",
    )

    @field_validator("callback_allow")
    @classmethod
    def _check_allow(cls, entries: list[str]) -> list[str]:
        import ipaddress  # only this validator parses addresses

        cleaned = []
        for entry in entries:
            value = entry.strip().lower().rstrip(".")
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                labels = value.removeprefix("*.").split(".")
                if "/" in value or not all(label.replace("-", "").isalnum() for label in labels):
                    raise ValueError(
                        f"{entry!r} is neither a hostname ('hooks.internal', '*.hooks.internal') "
                        "nor an address or network ('10.0.0.1', '10.0.0.0/8')"
                    ) from None
            cleaned.append(value)
        return cleaned


class TrainingSettings(BaseModel):
    """``training.*``: fine-tuning jobs, their checkpoints and the promotion gate."""

    model_config = SECTION_CONFIG

    max_concurrent: int = Field(1, ge=1, description="training jobs run at once on one host (the others wait queued)")
    work_dir: Path | None = Field(None, description="checkpoints of running jobs (default: HOME/training)")
    promotion_metric: str = Field(
        "accuracy", min_length=1, description="test metric a challenger must match to be promoted (loss: lower wins)"
    )
    promotion_min_delta: float = Field(
        0.0, description="how much better than production the challenger's metric must be (negative: a tolerance)"
    )
    run_in_server: bool = Field(
        False, description="the HTTP server also runs queued jobs (default: only `moorage jobs worker` processes)"
    )


class CompressionSettings(BaseModel):
    """``compression.*``: the quality gates a derived (compressed) version must pass to be registered."""

    model_config = SECTION_CONFIG

    min_mean_cosine: float = Field(0.99, ge=-1, le=1, description="embeddings: mean cosine to the parent's")
    min_min_cosine: float = Field(0.98, ge=-1, le=1, description="embeddings: lowest cosine to the parent's")
    max_accuracy_loss: float = Field(
        0.005, ge=0, le=1, description="classifiers: most test accuracy lost against the parent (0.005 = 0.5 points)"
    )
    min_speedup: float = Field(1.2, gt=0, description="throughput at batch 32 over the parent's, in-process")
    max_perplexity_ratio: float = Field(
        1.05, ge=1, description="language models: most held-out perplexity over the parent's (1.05 = 5 % higher)"
    )
    max_texts: int = Field(512, ge=2, description="held-out texts (or rows) the report measures on, at most")


class ConfigCenterSettings(BaseModel):
    """``config.*``: where releases of the hot settings are kept, and how this process follows them."""

    model_config = SECTION_CONFIG

    backend: Literal["catalog", "etcd"] = Field(
        "catalog", description="where releases live: the catalog database (no new service) or etcd"
    )
    etcd_url: str = Field("http://127.0.0.1:2379", description="etcd's JSON gateway (backend etcd)")
    etcd_prefix: str = Field("/moorage/config/", min_length=1, description="etcd keys of the config center")
    require_approval: bool = Field(
        False, description="a published release takes effect only once a different key approves it"
    )
    center_url: str | None = Field(
        None, description="server this process long-polls for releases (none: read the backend in-process)"
    )
    api_key: SecretStr | None = Field(None, description="key this process subscribes and reports with")
    group: str | None = Field(None, description="worker group (default: servers, or stream:<worker name>)")
    labels: dict[str, str] = Field(default_factory=dict, description="labels a gray release can target")
    hold_s: float = Field(
        25.0, gt=0, le=55, description="how long a long-poll is held open (well under load balancers' 60 s)"
    )
    poll_interval_s: float = Field(300.0, gt=0, description="fallback pull when no push arrives this long")
    instance_ttl_s: float = Field(
        90.0, gt=0, description="an instance that has not reported this long counts as gone in the status"
    )
    snapshot_dir: Path | None = Field(None, description="last applied release (default: HOME/config-snapshots)")


class FilterSettings(BaseModel):
    """Content filters of one model. A rule is a keyword (case-insensitive, whole words) or
    ``re:PATTERN`` (a Python regular expression, case-insensitive)."""

    model_config = SECTION_CONFIG

    input_deny: list[str] = Field(default_factory=list, description="inputs matching any rule are refused (400)")
    input_allow: list[str] = Field(
        default_factory=list, description="if set, an input must match one of these rules (400 otherwise)"
    )
    output_deny: list[str] = Field(default_factory=list, description="outputs matching any rule are withheld")
    output_allow: list[str] = Field(default_factory=list, description="if set, other outputs are withheld")
    mask_email: bool = Field(False, description="replace e-mail addresses in inputs and outputs by [EMAIL]")
    mask_phone: bool = Field(False, description="replace phone numbers in inputs and outputs by [PHONE]")


class LimitSettings(BaseModel):
    model_config = SECTION_CONFIG

    requests_per_minute: int | None = Field(None, ge=1, description="per key, unless the key sets its own")
    tokens_per_minute: int | None = Field(None, ge=1, description="input + output tokens per key and minute")
    max_text_chars: int = Field(100_000, ge=1, description="longest text of one input (413 above)")
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for (422 above)")
    redis_url: str | None = Field(
        None,
        description="redis://HOST:PORT/DB: share the per-key buckets among server workers and replicas "
        "(default: each server process enforces the whole limit on its own)",
    )


class SecuritySettings(BaseModel):
    model_config = SECTION_CONFIG

    auth: bool = Field(True, description="require an API key; false only for local development (warned at start)")
    metrics_auth: bool = Field(True, description="require a key for /metrics (false: open to scrapers)")
    limits: LimitSettings = Field(default_factory=LimitSettings)
    filters: dict[str, FilterSettings] = Field(
        default_factory=dict, description="content filters by model name (glob patterns allowed, e.g. 'chat-*')"
    )
    key_cache_s: float = Field(
        5.0, gt=0, description="a key's catalog row is re-read after this long (revocation elsewhere takes effect)"
    )
    key_stale_s: float = Field(
        300.0, ge=0, description="while the catalog is down, a known key keeps working from its last row this long"
    )
    audit: bool = Field(True, description="hash-chained audit rows for admin actions and inference calls")
    audit_inputs: bool = Field(False, description="store the raw input text in the audit (default: sha256 only)")
    audit_flush_ms: float = Field(200.0, ge=0, description="inference audit rows are written in batches this often")
    audit_streams: bool = Field(
        True, description="an audit row per stream message (processed or dead-lettered); off for firehose topics"
    )
    encrypt_artifacts: bool = Field(False, description="encrypt new versions at rest (AES-256-GCM)")
    master_key: SecretStr | None = Field(None, description="base64 master key (32 bytes) that wraps data keys")
    master_key_file: Path | None = Field(None, description="file holding the base64 master key")
    max_upload_bytes: int = Field(8 << 30, ge=1024, description="largest model upload over HTTP (413 above)")


class ObservabilitySettings(BaseModel):
    model_config = SECTION_CONFIG

    tracing: bool = Field(False, description="OpenTelemetry spans of every inference call (needs the tracing extra)")
    otlp_endpoint: str = Field(
        "http://localhost:4318/v1/traces", description="OTLP/HTTP traces endpoint spans are exported to"
    )
    service_name: str = Field("moorage", min_length=1, description="service.name of the exported spans")
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="share of new traces sampled (parents decide theirs)")
    log_format: Literal["console", "json"] = Field("console", description="console lines, or one JSON object a line")


class CacheSettings(BaseModel):
    """The response cache: repeated deterministic requests (embed and classify always; generation when
    greedy or seeded) answered from a cache keyed by the model version and the whole request."""

    model_config = SECTION_CONFIG

    enabled: bool = Field(False, description="answer repeated deterministic requests from the cache")
    models: list[str] = Field(
        default_factory=lambda: ["*"], description="model names whose responses are cached ('*': every model)"
    )
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: an LRU in each process; redis: one cache shared by every process"
    )
    redis_url: str | None = Field(None, description="redis://HOST:PORT/DB of the redis backend")
    max_entries: int = Field(10_000, ge=1, description="memory backend: entries kept, least recently used out")
    max_entry_bytes: int = Field(1 << 20, ge=1, description="larger responses are not cached")
    ttl_s: float = Field(3600.0, gt=0, description="an entry is dropped this long after it was stored")

    @field_validator("models")
    @classmethod
    def _check_models(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or any(c in name for c in "@:/ "):
                raise ValueError(
                    f"{name!r} is not a model name: give names ('smollm2', not 'smollm2@production') or '*'; "
                    "each version is cached apart, so an alias move never serves the old version's answers"
                )
        return names

    @model_validator(mode="after")
    def _check_backend(self) -> CacheSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend 'redis' needs redis_url: set cache.redis_url to redis://HOST:PORT/DB")
        return self


class SplitArm(BaseModel):
    """One arm of a traffic split: a target of the routed model and its share of the requests."""

    model_config = SECTION_CONFIG

    target: str = Field(
        min_length=1,
        description="an alias ('canary'), a version ('2') of the routed model, or a reference ('minilm@canary')",
    )
    weight: int = Field(ge=0, le=100, description="percent of the model's requests sent here")

    def ref(self, name: str) -> str:
        """The reference this arm serves for model `name`: NAME@ALIAS, NAME:VERSION, or the target as given."""
        if "@" in self.target or ":" in self.target:
            return self.target
        return f"{name}:{self.target}" if self.target.isdigit() else f"{name}@{self.target}"


class RouteSettings(BaseModel):
    """``routing.<model>``: requests naming the bare model are split between targets by weight (a
    request naming a reference, ``minilm@production``, is never split)."""

    model_config = SECTION_CONFIG

    split: list[SplitArm] = Field(min_length=1, description="the arms; their weights sum to 100")
    sticky: str | None = Field(
        None,
        description="'api_key' or 'header:NAME': requests with the same key land on the same arm, and stay on it "
        "while its share grows; none: each request is drawn at random",
    )

    @field_validator("split")
    @classmethod
    def _check_weights(cls, arms: list[SplitArm]) -> list[SplitArm]:
        total = sum(arm.weight for arm in arms)
        if total != 100:
            raise ValueError(f"the split's weights sum to {total}; they must sum to 100")
        targets = [arm.target for arm in arms]
        if len(set(targets)) != len(targets):
            raise ValueError(f"each target may appear once in a split: {', '.join(targets)}")
        return arms

    @field_validator("sticky")
    @classmethod
    def _check_sticky(cls, sticky: str | None) -> str | None:
        if sticky is None or sticky == "api_key":
            return sticky
        kind, _, header = sticky.partition(":")
        if kind != "header" or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", header):
            raise ValueError(f"{sticky!r}: use 'api_key' or 'header:NAME' (e.g. 'header:X-User')")
        return f"header:{header.lower()}"


class Settings(BaseSettings):
    """Everything a moorage process needs to know, validated at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True, frozen=True
    )

    home: Path = Field(Path("~/.moorage"), description="catalog, artifacts and caches")
    user: str = Field(default_factory=lambda: _current_user(), description="actor in the history")
    log_level: str = "INFO"
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    compression: CompressionSettings = Field(default_factory=CompressionSettings)
    routing: dict[str, RouteSettings] = Field(
        default_factory=dict, description="traffic splits by model name (canary, A/B) between its aliases or versions"
    )
    config: ConfigCenterSettings = Field(default_factory=ConfigCenterSettings)

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("routing")
    @classmethod
    def _check_routes(cls, routes: dict[str, RouteSettings]) -> dict[str, RouteSettings]:
        for name in routes:
            if not name or any(c in name for c in "@:/ "):
                raise ValueError(f"{name!r}: routes are keyed by model name ('minilm', not 'minilm@production')")
        return routes

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("use DEBUG, INFO, WARNING or ERROR")
        return value

    @property
    def catalog_url(self) -> str:
        return self.registry.catalog_url or f"sqlite:///{self.home / 'catalog.db'}"

    @property
    def store_url(self) -> str:
        return self.registry.store_url or str(self.home / "artifacts")

    @property
    def cache_dir(self) -> Path:
        return (self.runtime.cache_dir or self.home / "cache").expanduser()

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able data with every credential masked: the one view that
        `/admin/settings`, `moorage config` and log lines show. See `redact`."""
        return redact(self.model_dump())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Outside `load_settings` (``Settings(...)``, a worker's settings file) nothing is read:
        # the environment is read by `load_settings` alone.
        environ, file_data = _LOAD_CONTEXT.get(({}, {}))
        return (
            init_settings,
            _MappingEnvSource(settings_cls, environ),
            _DictSource(settings_cls, file_data),
        )


class _MappingEnvSource(EnvSettingsSource):
    """The stock environment source, reading from an injected mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = {k: v for k, v in environ.items() if k.upper() != "MOORAGE_CONFIG"}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


class _DictSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


_LOAD_CONTEXT: ContextVar[tuple[Mapping[str, str], dict[str, Any]]] = ContextVar("settings_load")


def load_settings(
    config_file: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings tree; raise `ConfigError` naming the bad key or file."""
    environ = os.environ if environ is None else environ
    _refuse_unknown_sections(environ)
    path = _find_config_file(config_file, environ)
    file_data = read_config_file(path) if path else {}
    token = _LOAD_CONTEXT.set((environ, file_data))
    try:
        return Settings(**{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    finally:
        _LOAD_CONTEXT.reset(token)


def _refuse_unknown_sections(environ: Mapping[str, str]) -> None:
    """pydantic-settings reads only the variables of known fields, so a mistyped section
    (``MOORAGE_SERVR__PORT``, ``MOORAGE_SERVE_PORT``) would be ignored without a word; unknown keys
    inside a known section are refused by the section itself (``extra="forbid"``)."""
    known = list(Settings.model_fields)
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_SETTINGS_ENV or _is_service_link(upper, environ[name]):
            continue
        section, sep, rest = upper.removeprefix(ENV_PREFIX).partition("__")
        if section.lower() in known:
            continue
        hint = ""
        joined = next((k for k in known if section.lower().startswith(k + "_")), None)
        close = difflib.get_close_matches(section.lower(), known, n=1)
        if joined:  # one underscore where the nesting takes two
            hint = f"; did you mean {ENV_PREFIX}{joined.upper()}__{section[len(joined) + 1 :]}{sep}{rest}?"
        elif close:
            hint = f"; did you mean {ENV_PREFIX}{close[0].upper()}{sep}{rest}?"
        raise ConfigError(
            f"environment variable {name} names no setting: {section.lower()!r} is neither a setting nor a section"
            f"{hint} (known: {', '.join(known)}; nested keys take '__', e.g. {ENV_PREFIX}SERVE__PORT)"
        )


def _is_service_link(name: str, value: str | None) -> bool:
    if "__" in name:
        return False
    return bool(_SERVICE_LINK.search(name)) or (
        name.endswith("_PORT") and str(value).startswith(("tcp://", "udp://", "sctp://"))
    )


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {path} is not valid {_kind(path)}: {first_line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings at its top level")
    return data


def _find_config_file(explicit: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    if explicit is None:
        explicit = environ.get("MOORAGE_CONFIG") or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    home = Path(environ.get("MOORAGE_HOME") or "~/.moorage").expanduser()
    return next((home / n for n in CONFIG_NAMES if (home / n).is_file()), None)


def _kind(path: Path) -> str:
    return "TOML" if path.suffix == ".toml" else "YAML"


def _describe(exc: ValidationError, path: Path | None) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        problems.append(f"setting '{key}' ({env}): {err['msg']}")
    where = f" (config file {path})" if path else ""
    return "invalid settings" + where + ": " + "; ".join(problems)


# ---- what a person or a log may see -------------------------------------------------------------

MASK = "***"
# storage_options go to fsspec as they are and each backend names its credentials its own way
# (key, secret, token, account_key, sas_token, client_secret, ...): show only options known to be safe.
SHOWN_STORAGE_OPTIONS = frozenset(
    {"endpoint_url", "region_name", "anon", "use_ssl", "requester_pays", "version_aware", "client_kwargs"}
)
_CREDENTIAL_NAME = re.compile(r"pass(word|wd)?|pwd|secret|token|credential|session|signature|auth|(^|_)key($|_)", re.I)
# scheme://user:password@host: the password runs to the last "@" before the query, so that an
# unescaped "@" or "/" inside it is masked too
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/?#@:]*:)[^\s]*@")
_QUERY_CREDENTIAL = re.compile(
    r"(?P<head>[?&;][^=&#\s]*(pass|pwd|secret|token|key|credential|session|signature|auth)[^=&#\s]*=)[^&#\s]*", re.I
)


def redact(data: Any) -> Any:
    """`data` (a settings dump) as JSON-able values with every credential masked: secrets
    (``SecretStr``), the password of every URL (``scheme://user:***@host``) and its credential-named
    query parameters, string values under credential-like names (``*_token``, ``api_key``, ...),
    and every ``storage_options`` value but those in `SHOWN_STORAGE_OPTIONS`."""
    return to_jsonable_python(_redact(data, "", opaque=False))


def redact_url(text: str) -> str:
    """`text` with the passwords of its URLs and their credential-named query parameters masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + "@", text)
    return _QUERY_CREDENTIAL.sub(lambda m: m["head"] + MASK, text)


def _redact(value: Any, name: str, opaque: bool) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if isinstance(value, Mapping):
        inner = opaque or name == "storage_options"
        return {key: _redact(item, str(key), inner) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(item, name, opaque) for item in value]
    if opaque and name not in SHOWN_STORAGE_OPTIONS and value is not None and not isinstance(value, bool):
        return MASK
    if isinstance(value, str):
        if _CREDENTIAL_NAME.search(name) and not name.endswith(("_file", "_dir", "_path")):
            return MASK
        return redact_url(value)
    return value


# ---- settings handed to worker processes --------------------------------------------------------


def write_settings_file(settings: Settings, path: Path) -> Path:
    """Write `settings`, secrets included, to a new file that only its owner can read (mode 0600):
    how a parent process hands its settings to its workers. The caller puts it in a private folder
    and removes it when the workers are done."""
    data = to_json(_reveal(settings.model_dump()))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def read_settings_file(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings `write_settings_file` wrote; by default to the file ``MOORAGE_SETTINGS_FILE`` names."""
    if path is None:
        path = (os.environ if environ is None else environ).get(SETTINGS_FILE_ENV)
        if not path:
            raise ConfigError(
                f"{SETTINGS_FILE_ENV} names no settings file: server workers are started by `moorage serve --workers N`"
            )
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ConfigError(f"settings file {path} holds secrets: it must be readable by its owner only (chmod 600)")
    try:
        return Settings.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return value.get_secret_value()
    if isinstance(value, Mapping):
        return {key: _reveal(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_reveal(item) for item in value]
    return value


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. in a container
        return "unknown"
