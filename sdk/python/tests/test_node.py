"""The SDK against a real `custos serve` on loopback."""

import json
import time

import pytest

from custos_sdk import AgentKey, Client, CustosError, EnforcementFeed, Signer


def test_events_are_accepted_and_a_resend_is_answered_duplicate(node, tmp_path):
    key = AgentKey.generate()
    key.save(tmp_path / "agent.key")
    node.enroll(key.did, "eng")
    signer = Signer.open(str(tmp_path / "agent.key"), "eng")
    client = Client(node.url, signer, batch_size=3)
    for n in range(5):
        client.emit("tool_call", action="http.get", target=f"https://example.com/{n}", outcome="ok")
    results = client.flush()
    # Three went when the batch filled; the flush sends the other two.
    assert [r.status for r in results] == ["accepted"] * 2
    assert signer.pending() == []
    # A resend of the same bytes (as after a timeout) is a duplicate, never a second copy.
    again = signer.sign("tool_call", action="http.get")
    first = client.send([again.envelope])
    second = client.send([again.envelope])
    assert first[0].status == "accepted" and second[0].status == "duplicate"
    assert first[0].log_index == second[0].log_index
    signer.answered([again.envelope])
    # The agent restarts with unsent events: they go first, and the chain goes on.
    signer.sign("file_read", target="/etc/hosts")
    restarted = Signer.open(str(tmp_path / "agent.key"), "eng")
    client = Client(node.url, restarted)
    client.emit("file_write", target="/tmp/out")
    results = client.flush()
    assert [r.status for r in results] == ["accepted", "accepted"], results
    status, agent = node.call("GET", f"/v1/agents/{key.did}")
    assert status == 200 and agent["events"] == 8 and agent["last_seq"] == 7


def test_a_refused_event_is_reported_not_retried(node):
    key = AgentKey.generate()  # never enrolled
    client = Client(node.url, Signer(key, "eng"))
    client.emit("tool_call", action="x")
    results = client.flush()
    assert results[0].status == "rejected" and results[0].reason == "unknown_agent", results
    assert client.rejected == results


def test_an_unreachable_node_keeps_events_pending(tmp_path):
    key = AgentKey.generate()
    key.save(tmp_path / "agent.key")
    signer = Signer.open(str(tmp_path / "agent.key"), "eng")
    client = Client("http://127.0.0.1:9", signer, max_attempts=2, backoff=0.01)
    with pytest.raises(CustosError) as error:
        client.emit("tool_call", action="x")
        client.flush()
    assert error.value.code == "unreachable"
    assert len(Signer.open(str(tmp_path / "agent.key"), "eng").pending()) == 1


def test_a_playbook_revokes_an_sdk_agent_and_its_feed_knows_within_a_second(node):
    key = AgentKey.generate()
    node.enroll(key.did, "ops")
    bystander = AgentKey.generate()
    node.enroll(bystander.did, "ops")
    token = node.token("analyst", ["ops"])
    _, checkpoint = node.call("GET", "/v1/checkpoints/latest")
    feed = EnforcementFeed(node.url, token, checkpoint["node_did"]).start()
    assert not feed.is_revoked(key.did)
    client = Client(node.url, Signer(key, "ops"))
    # Memory poisoning (docs/detection.md): untrusted content written to memory, read
    # back, then a credential used. The contain-compromised-agent playbook revokes.
    client.emit("memory_write", memory_id="mem-sdk-poisoned", attrs={"source_trust": "untrusted"})
    client.emit("memory_read", memory_id="mem-sdk-poisoned")
    client.emit("credential_use", target="cred-db", attrs={"credential_owner": key.did})
    assert all(r.status == "accepted" for r in client.flush())

    node_saw = feed_saw = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and feed_saw is None:
        now = time.monotonic()
        if node_saw is None and node.call("GET", f"/v1/agents/{key.did}")[1]["status"] == "revoked":
            node_saw = now
        if feed.is_revoked(key.did):
            feed_saw = now
        time.sleep(0.02)
    assert feed_saw is not None, f"the feed never saw the revocation: {feed.errors}"
    # The node's answer is checked before the feed's in each round, so a feed that is
    # first is not late.
    assert node_saw is None or feed_saw - node_saw < 1.0, (node_saw, feed_saw)
    assert feed.agent_status(key.did) == "revoked"
    assert not feed.is_revoked(bystander.did)
    wait = time.monotonic() + 5
    while not feed.is_quarantined("mem-sdk-poisoned") and time.monotonic() < wait:
        time.sleep(0.02)
    assert feed.is_quarantined("mem-sdk-poisoned")
    assert feed.log_size > 0
    # What the feed holds came from a list the node key signed.
    assert feed.refresh()["issuer"] == checkpoint["node_did"]
    feed.stop()


def test_a_feed_refuses_a_list_signed_by_another_key(node):
    token = node.token("analyst", ["ops"])
    impostor = AgentKey.generate().did
    feed = EnforcementFeed(node.url, token, impostor)
    with pytest.raises(CustosError) as error:
        feed.refresh()
    assert error.value.code == "wrong_signer"


def test_otel_spans_become_events_signed_by_the_agent(node):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from custos_sdk.otel import CustosSpanProcessor

    key = AgentKey.generate()
    node.enroll(key.did, "eng")
    client = Client(node.url, Signer(key, "eng"))
    provider = TracerProvider()
    provider.add_span_processor(CustosSpanProcessor(client))
    tracer = provider.get_tracer("agent")
    with tracer.start_as_current_span("invoke_agent planner", attributes={"gen_ai.operation.name": "invoke_agent"}):
        with tracer.start_as_current_span("chat", kind=SpanKind.CLIENT, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 4, "gen_ai.conversation.id": "c-1"}):
            pass
        with tracer.start_as_current_span("execute_tool lookup", attributes={"gen_ai.tool.name": "lookup",
                                                                              "gen_ai.tool.call.id": "call-1"}) as span:
            span.set_status(Status(StatusCode.ERROR))
        with tracer.start_as_current_span("GET /health"):
            pass  # not GenAI: no event
    provider.force_flush()
    rows = node.sql(f"SELECT kind, action, outcome, tokens_in, session FROM events WHERE agent = '{key.did}' ORDER BY seq")
    assert [(r["kind"], r["action"], r["outcome"]) for r in rows] == [
        ("llm_call", "chat", "ok"), ("tool_call", "lookup", "error"), ("message_received", "invoke_agent", "ok")]
    assert rows[0]["tokens_in"] == 10 and rows[0]["session"] == "c-1"
