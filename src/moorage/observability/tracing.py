"""OpenTelemetry spans of inference calls: off by default, and free when off.

With ``observability.tracing`` off nothing of OpenTelemetry is imported, and `begin` answers None at
the cost of one attribute read: every caller then skips the rest. With it on (the ``tracing``
extra), each inference call becomes one span named ``"{operation} {model}"`` (e.g. ``chat smollm``)
with the GenAI attributes (`semconv`), and the engines' `Timings` of each input become its child
spans (queue wait, batch, model call or prefill and decode). The spans are recorded when the call
has ended, with the times the engines noted: no span is open while a batch computes, and the
engines' loops hold no tracing code.

Context: a W3C ``traceparent`` coming with a request (HTTP header, job row, stream message) is
held in `incoming` and becomes the parent of the call's span; a malformed one is ignored (the
span starts a new trace). Spans are exported over OTLP/HTTP in the background (a batch processor);
`exporting_to` is the hook tests use to receive them synchronously (the SDK's in-memory exporter).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MissingDependency
from . import semconv
from .logging import request_id

if TYPE_CHECKING:
    from ..config import ObservabilitySettings

_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")

# the traceparent that came with the request being handled (HTTP: set by the request middleware)
incoming: ContextVar[str | None] = ContextVar("moorage_traceparent", default=None)


class _State:
    """What tracing runs on. `tracer` None: off, and every function here returns at once."""

    tracer: Any = None
    provider: Any = None
    api: Any = None  # the opentelemetry.trace module, imported once when tracing is turned on
    propagator: Any = None
    pinned = False  # a test's exporter is installed: `configure` leaves it in place


_state = _State()


@dataclass(slots=True)
class Trace:
    """A call being traced: when it began (``perf_counter``), its parent and its request id."""

    started: float
    parent: str | None
    request_id: str | None


def is_enabled() -> bool:
    return _state.tracer is not None


def configure(settings: ObservabilitySettings) -> None:
    """Turn tracing on (OTLP exporter) or off as `settings` say; a test's exporter stays in place."""
    if _state.pinned:
        return
    if not settings.tracing:
        shutdown()
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise MissingDependency("observability.tracing needs OpenTelemetry: pip install 'moorage[tracing]'") from None
    exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    _install(settings.service_name, settings.sample_ratio, BatchSpanProcessor(exporter))


@contextmanager
def exporting_to(exporter: Any, sample_ratio: float = 1.0, service_name: str = "moorage") -> Iterator[None]:
    """Tests: spans go to `exporter` as each one ends (e.g. ``InMemorySpanExporter``), whatever the
    settings of the apps built meanwhile say; tracing is off again afterwards."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    _install(service_name, sample_ratio, SimpleSpanProcessor(exporter))
    _state.pinned = True
    try:
        yield
    finally:
        _state.pinned = False
        shutdown()


def _install(service_name: str, sample_ratio: float, processor: Any) -> None:
    from opentelemetry import trace as api
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from .. import __version__

    shutdown()
    provider = TracerProvider(
        resource=Resource.create({semconv.SERVICE_NAME: service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(processor)
    _state.api, _state.propagator, _state.provider = api, TraceContextTextMapPropagator(), provider
    _state.tracer = provider.get_tracer("moorage", __version__)


def shutdown() -> None:
    """Export what is still buffered and turn tracing off."""
    provider, _state.provider, _state.tracer = _state.provider, None, None
    if provider is not None:
        provider.shutdown()


def flush() -> None:
    """Export the spans still buffered (a server stopping), leaving tracing on."""
    if _state.provider is not None:
        _state.provider.force_flush()


def valid_traceparent(value: str | None) -> str | None:
    """`value` if it is a W3C traceparent moorage can continue (version 00), else None."""
    if value is None or len(value) != 55:
        return None
    value = value.lower()
    return value if _TRACEPARENT.fullmatch(value) else None


def begin(parent: str | None = None) -> Trace | None:
    """Start timing a call (None when tracing is off). `parent`: a traceparent; default: the
    request's (`incoming`)."""
    if _state.tracer is None:
        return None
    return Trace(time.perf_counter(), parent if parent is not None else incoming.get(), request_id.get())


def record(
    trace: Trace,
    name: str,
    attributes: Mapping[str, Any],
    timings: Sequence[Any],
    error: BaseException | None = None,
    kind: str = "SERVER",
) -> str | None:
    """The call's span (`name`, `attributes`) from `trace.started` until now, with one set of child
    spans per distinct engine `Timings` of its inputs; marked failed with ``error.type`` if `error`.
    Answers the span's traceparent (None if tracing was turned off meanwhile)."""
    tracer, api = _state.tracer, _state.api
    if tracer is None:
        return None
    offset = time.time_ns() - time.perf_counter_ns()

    def ns(t: float) -> int:
        return int(t * 1e9) + offset

    ended = time.perf_counter()
    attrs = dict(attributes)
    if trace.request_id is not None:
        attrs[semconv.REQUEST_ID] = trace.request_id
    if error is not None:
        attrs[semconv.ERROR_TYPE] = error_type(error)
    span = tracer.start_span(
        name,
        context=_parent_context(trace.parent),
        kind=getattr(api.SpanKind, kind),
        attributes=attrs,
        start_time=ns(trace.started),
    )
    if error is not None:
        span.set_status(api.Status(api.StatusCode.ERROR))
    inside = api.set_span_in_context(span)
    for t in _distinct(timings):
        _children(tracer, inside, t, ns, api)
    span.end(end_time=ns(ended))
    return _format(span.get_span_context())


def _children(tracer: Any, inside: Any, t: Any, ns: Any, api: Any) -> None:
    tracer.start_span(semconv.SPAN_QUEUE_WAIT, context=inside, start_time=ns(t.queued)).end(ns(t.started))
    batch = tracer.start_span(
        semconv.SPAN_BATCH, context=inside, start_time=ns(t.started), attributes={semconv.BATCH_SIZE: t.batch_size}
    )
    in_batch = api.set_span_in_context(batch)
    if t.first_token is None:
        model = tracer.start_span(semconv.SPAN_MODEL_CALL, context=in_batch, start_time=ns(t.model_started))
        model.end(ns(t.model_finished))
    else:
        tracer.start_span(semconv.SPAN_PREFILL, context=in_batch, start_time=ns(t.started)).end(ns(t.first_token))
        tracer.start_span(semconv.SPAN_DECODE, context=in_batch, start_time=ns(t.first_token)).end(ns(t.finished))
    batch.end(ns(t.finished))


def _distinct(timings: Sequence[Any]) -> list[Any]:
    """One set of children per input, except inputs that waited and computed together (the same
    batch, taken at once): an embedding call of 32 texts in one batch has one set, not 32."""
    seen: dict[tuple[float, float], Any] = {}
    for t in timings:
        if t is not None:
            seen.setdefault((t.started, t.finished), t)
    return list(seen.values())


def error_type(error: BaseException) -> str:
    code = getattr(error, "code", None)
    return code if isinstance(code, str) else type(error).__name__


def _parent_context(traceparent: str | None) -> Any:
    if traceparent is None:
        return None
    return _state.propagator.extract({"traceparent": traceparent})


def _format(ctx: Any) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def link_point(name: str, attributes: Mapping[str, Any], parent: str | None = None) -> str | None:
    """A span that ends at once and whose traceparent later work continues (e.g. a job created by a
    request: its run, on any server, is a child of this span, in the request's trace). None when off."""
    trace = begin(parent)
    if trace is None:
        return None
    return record(trace, name, attributes, ())
