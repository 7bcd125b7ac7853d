"""OTLP ingest: a real OpenTelemetry SDK and OTLP/HTTP exporter sending to `POST /v1/traces`."""

import json
import time
import urllib.request

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

OTHER_AGENT = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"


def provider_for(node, token, service):
    exporter = OTLPSpanExporter(endpoint=f"{node.url}/v1/traces", headers={"Authorization": f"Bearer {token}"},
                                compression=Compression.Gzip)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def post_json(node, token, body):
    req = urllib.request.Request(f"{node.url}/v1/traces", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_spans_land_as_attested_events_and_credential_misuse_is_found(node):
    token = node.token("collector", ["eng"])
    provider = provider_for(node, token, "billing-agent")
    tracer = provider.get_tracer("billing")
    with tracer.start_as_current_span("invoke_agent billing", attributes={"gen_ai.operation.name": "invoke_agent"}):
        with tracer.start_as_current_span("chat", kind=SpanKind.CLIENT, attributes={
                "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
                "gen_ai.usage.input_tokens": 812, "gen_ai.usage.output_tokens": 64, "gen_ai.conversation.id": "conv-9"}):
            pass
        with tracer.start_as_current_span("execute_tool lookup_invoice", attributes={
                "gen_ai.tool.name": "lookup_invoice", "gen_ai.tool.call.id": "call_1"}):
            pass
        with tracer.start_as_current_span("search_memory", attributes={"gen_ai.memory.record.id": "mem-invoices"}):
            pass
    provider.force_flush()
    # The injected misuse: a tool span that used another agent's credential.
    with tracer.start_as_current_span("execute_tool vault.read", attributes={
            "gen_ai.tool.name": "vault.read", "custos.kind": "credential_use", "custos.target": "cred-prod-db",
            "custos.attrs.credential_owner": OTHER_AGENT}):
        pass
    provider.force_flush()

    rows = node.sql("SELECT agent, kind, action, tokens_in, session, memory_id, attrs FROM events "
                     "WHERE realm = 'eng' ORDER BY log_index")
    attested = [row for row in rows if row["kind"] != "delegation"]
    assert [(r["kind"], r["action"]) for r in attested] == [
        ("llm_call", "chat"), ("tool_call", "lookup_invoice"), ("memory_read", "search_memory"),
        ("message_received", "invoke_agent"), ("credential_use", "vault.read")], rows
    agent = attested[0]["agent"]
    assert all(r["agent"] == agent for r in attested), "one attested agent per service"
    attrs = [json.loads(r["attrs"]) if isinstance(r["attrs"], str) else r["attrs"] for r in attested]
    assert all(a["custos.source"] == "otlp" for a in attrs)
    assert all(a["custos.attested_for"] == "billing-agent" for a in attrs)
    adapter = attrs[0]["custos.attested_by"]
    assert adapter != agent and adapter.startswith("did:key:z6Mk")
    assert attested[0]["tokens_in"] == 812 and attested[0]["session"] == "conv-9"
    # The adapter key is enrolled in the token's realm; the agent key is its sub-agent.
    status, record = node.call("GET", f"/v1/agents/{agent}")
    assert status == 200 and record["parent"] == adapter and record["realm"] == "eng", record
    status, root = node.call("GET", f"/v1/agents/{adapter}")
    assert status == 200 and root["labels"]["custos.source"] == "otlp", root

    deadline = time.monotonic() + 60
    found = []
    answer = None
    while time.monotonic() < deadline and not found:
        _, answer = node.call("GET", "/v1/findings?limit=100")
        found = [f for f in answer["findings"] if f["type"] == "credential_misuse" and f["agent"] == agent]
        time.sleep(0.1)
    assert found, answer
    assert found[0]["rule_id"] == "custos-credential-non-owner"


def test_json_bodies_partial_success_and_refusals(node):
    token = node.token("collector", ["ops"])
    now = time.time_ns()
    span = lambda name, span_id, attrs: {
        "traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": span_id, "name": name, "kind": 1,
        "startTimeUnixNano": str(now - 1000), "endTimeUnixNano": str(now),
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()]}
    request = lambda chat_id, health_id: {
        "resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "ops-bot"}}]},
                           "scopeSpans": [{"spans": [
                               span("chat", chat_id, {"gen_ai.operation.name": "chat"}),
                               span("GET /health", health_id, {})]}]}]}
    body = request("00f067aa0ba902b7", "00f067aa0ba902b8")
    status, answer = post_json(node, token, body)
    assert status == 200, answer
    assert answer["partialSuccess"]["rejectedSpans"] == 0
    assert "1 spans were not GenAI operations" in answer["partialSuccess"]["errorMessage"]

    # The same request again (an exporter's retry): its span is stored once.
    status, answer = post_json(node, token, body)
    assert status == 200 and answer["partialSuccess"]["rejectedSpans"] == 0, answer
    assert len(node.sql("SELECT agent FROM events WHERE realm = 'ops' AND kind = 'llm_call'")) == 1

    # A revoked attested agent's new spans are rejected and counted, not silently dropped.
    rows = node.sql("SELECT agent FROM events WHERE realm = 'ops' AND kind = 'llm_call'")
    status, revoked = node.call("POST", f"/v1/agents/{rows[0]['agent']}/revoke", {"reason": "test"})
    assert status == 200, revoked
    status, answer = post_json(node, token, request("00f067aa0ba902c7", "00f067aa0ba902c8"))
    assert status == 200 and answer["partialSuccess"]["rejectedSpans"] == 1, answer
    assert "revoked_agent" in answer["partialSuccess"]["errorMessage"]

    # Who may send, and what.
    analyst = node.token("analyst", ["ops"])
    assert post_json(node, analyst, body)[0] == 403
    assert post_json(node, "cus_" + "A" * 43, body)[0] == 401
    status, answer = post_json(node, token, {"resourceSpans": "nope"})
    assert status == 400 and answer["error"] == "bad_otlp", answer
    status, answer = node.call("POST", "/v1/tokens", {"role": "collector", "realms": []})
    assert status == 400 and answer["error"] == "bad_realm"
