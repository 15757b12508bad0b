"""The attribute and value names of moorage's spans, pinned in one place.

OpenTelemetry's GenAI semantic conventions are incubating: names may change between releases of
the conventions (``gen_ai.system`` became ``gen_ai.provider.name``; ``gen_ai.usage.prompt_tokens``
became ``input_tokens``). moorage writes the names below, checked against
``opentelemetry-semantic-conventions`` 0.66b2 (tests/unit/test_tracing.py compares them with the
installed package), so a rename is one edit here and one line in the changelog. Nothing here
imports OpenTelemetry: these are plain strings, usable with tracing off.
"""

from __future__ import annotations

# -- GenAI attributes (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/) -------------
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_SEED = "gen_ai.request.seed"
REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
REQUEST_STREAM = "gen_ai.request.stream"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

# -- general attributes -------------------------------------------------------------------------------
ERROR_TYPE = "error.type"  # the stable error code (e.g. deadline_exceeded), or the exception class
SERVICE_NAME = "service.name"  # a resource attribute

# -- gen_ai.operation.name values ---------------------------------------------------------------------
OP_CHAT = "chat"
OP_TEXT_COMPLETION = "text_completion"
OP_EMBEDDINGS = "embeddings"
OP_CLASSIFY = "classify"  # not (yet) a GenAI operation: moorage's own name for classification

PROVIDER = "moorage"  # gen_ai.provider.name: the server that ran the model

# -- moorage's own attributes (a `moorage.` prefix, as the conventions ask of custom names) ---------
MODEL_VERSION = "moorage.model.version"
REQUEST_ID = "moorage.request_id"
INPUT_COUNT = "moorage.input.count"
BATCH_SIZE = "moorage.batch.size"
JOB_ID = "moorage.job.id"

# -- child span names (recorded after the fact from the engines' timings) --------------------------
SPAN_QUEUE_WAIT = "queue_wait"  # waiting in the engine's queue, until a batch or a free row took it
SPAN_BATCH = "batch"  # the batch (dynamic batching) or the running rows (generation) it was part of
SPAN_MODEL_CALL = "model_call"  # the handler's predict (embed, classify)
SPAN_PREFILL = "prefill"  # generation: the step that read the prompt and gave the first token
SPAN_DECODE = "decode"  # generation: the steps that gave the other tokens
