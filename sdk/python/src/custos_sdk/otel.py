"""OpenTelemetry GenAI spans as signed Custos events (docs/integrations.md, "OpenTelemetry").

`map_span` is the mapping (the node's OTLP ingest applies the same one, and
`sdk/otel-mapping.json` holds the cases every implementation is tested against);
`CustosSpanProcessor` is a span processor that signs each mapped span with the agent's
own key through a `Client`.
"""

from __future__ import annotations

import datetime as _dt

from .payload import KINDS

# gen_ai.operation.name → Custos kind. invoke_agent depends on the span kind: a CLIENT
# span invokes another agent (message_sent); otherwise this agent was invoked.
OPERATIONS = {
    "chat": "llm_call",
    "text_completion": "llm_call",
    "generate_content": "llm_call",
    "embeddings": "llm_call",
    "execute_tool": "tool_call",
    "invoke_agent": "message_received",
    "create_memory": "memory_write",
    "update_memory": "memory_write",
    "delete_memory": "memory_delete",
    "search_memory": "memory_read",
}
# Span attributes → top-level payload members (first present wins).
INTEGER_FIELDS = {
    "tokens_in": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
    "tokens_out": ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"),
}
SESSION = ("gen_ai.conversation.id", "session.id")
MEMORY_ID = ("gen_ai.memory.record.id",)


def _first(attributes: dict, names) -> object:
    for name in names:
        if attributes.get(name) not in (None, ""):
            return attributes[name]
    return None


def operation_of(name: str, attributes: dict) -> str | None:
    """The GenAI operation: `gen_ai.operation.name`, else the span name's first word."""
    operation = attributes.get("gen_ai.operation.name")
    if not operation and name:
        operation = name.split(" ", 1)[0]
    return operation if operation in OPERATIONS else None


def map_span(span: dict) -> dict | None:
    """The payload members (without agent, seq, prev, realm) for one span, or None for a
    span that is not a GenAI operation. `span` holds `name`, `attributes`, `kind`
    (`client`, `server`, `internal`, `producer`, `consumer`), `trace_id` and `span_id`
    (lowercase hex), `parent_span_id` (hex or None), `error` (bool) and `end_time`
    (RFC 3339)."""
    attributes = span.get("attributes") or {}
    operation = operation_of(span.get("name", ""), attributes)
    if operation is None:
        return None
    kind = OPERATIONS[operation]
    if operation == "invoke_agent" and span.get("kind") == "client":
        kind = "message_sent"
    override = attributes.get("custos.kind")
    if override in KINDS:
        kind = override
    event = {"kind": kind, "ts": span["end_time"]}
    action = attributes.get("gen_ai.tool.name") if operation == "execute_tool" else None
    event["action"] = str(action or operation)
    target = attributes.get("custos.target")
    if target is None:
        if operation in ("chat", "text_completion", "generate_content", "embeddings"):
            target = attributes.get("gen_ai.request.model")
        elif operation == "invoke_agent":
            target = _first(attributes, ("gen_ai.agent.id", "gen_ai.agent.name"))
    if target is not None:
        event["target"] = str(target)
    event["outcome"] = "error" if span.get("error") else "ok"
    for field, names in INTEGER_FIELDS.items():
        value = _first(attributes, names)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            event[field] = value
    session = _first(attributes, SESSION)
    if session is not None:
        event["session"] = str(session)[:256]
    if span.get("trace_id"):
        event["trace_id"] = span["trace_id"]
    if span.get("span_id"):
        event["span_id"] = span["span_id"]
    if span.get("parent_span_id"):
        event["parent"] = span["parent_span_id"]
    memory_id = _first(attributes, MEMORY_ID)
    if memory_id is not None:
        event["memory_id"] = str(memory_id)[:256]
    attrs = {}
    for name, value in attributes.items():
        if name.startswith("gen_ai."):
            attrs[name] = list(value) if isinstance(value, tuple) else value
        elif name.startswith("custos.attrs."):
            attrs[name[len("custos.attrs."):]] = list(value) if isinstance(value, tuple) else value
    # Old and new names of the provider: both readable under the new one.
    provider = _first(attributes, ("gen_ai.provider.name", "gen_ai.system"))
    if provider is not None:
        attrs["gen_ai.provider.name"] = provider
    attrs.pop("gen_ai.system", None)
    if attrs:
        event["attrs"] = attrs
    return event


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def span_dict(span) -> dict:
    """An OpenTelemetry SDK `ReadableSpan` in the shape `map_span` takes."""
    context = span.get_span_context()
    parent = span.parent
    end = span.end_time or span.start_time or 0
    ts = _dt.datetime.fromtimestamp(end // 1_000_000_000, _dt.timezone.utc).replace(
        microsecond=(end % 1_000_000_000) // 1000
    )
    from .payload import format_ts

    return {
        "name": span.name,
        "attributes": dict(span.attributes or {}),
        "kind": span.kind.name.lower(),
        "trace_id": _hex(context.trace_id, 32),
        "span_id": _hex(context.span_id, 16),
        "parent_span_id": _hex(parent.span_id, 16) if parent is not None else None,
        "error": span.status.status_code.name == "ERROR",
        "end_time": format_ts(ts),
    }


try:
    from opentelemetry.sdk.trace import SpanProcessor as _Base
except ImportError:  # the bridge is optional: pip install custos-sdk[otel]
    _Base = object


class CustosSpanProcessor(_Base):
    """Signs every ended GenAI span as an event of the client's agent."""

    def __init__(self, client):
        self.client = client

    def on_start(self, span, parent_context=None):
        pass

    def on_end(self, span):
        event = map_span(span_dict(span))
        if event is not None:
            kind = event.pop("kind")
            self.client.emit(kind, **event)

    def shutdown(self):
        self.client.flush()

    def force_flush(self, timeout_millis: int = 30000):
        self.client.flush()
        return True
