// The SDK against a real `custos serve` on loopback.
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { AgentKey, Client, CustosError, CustosSpanProcessor, EnforcementFeed, Signer } from "@custos/sdk";
import { startNode } from "./node.mjs";

let node;
before(async () => {
  node = await startNode();
});
after(() => node.stop());
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

test("events are accepted, a resend is a duplicate, and a restart goes on with the chain", async () => {
  const path = join(mkdtempSync(join(tmpdir(), "custos-ts-")), "agent.key");
  const key = AgentKey.generate();
  key.save(path);
  await node.enroll(key.did, "eng");
  const signer = Signer.open(path, "eng");
  const client = new Client(node.url, signer, { batchSize: 3 });
  for (let n = 0; n < 5; n++) await client.emit("tool_call", { action: "http.get", target: `https://example.com/${n}`, outcome: "ok" });
  assert.deepEqual((await client.flush()).map((r) => r.status), ["accepted", "accepted"]);
  assert.deepEqual(signer.pending(), []);
  const again = signer.sign("tool_call", { action: "http.get" });
  const [first] = await client.send([again.envelope]);
  const [second] = await client.send([again.envelope]);
  assert.equal(first.status, "accepted");
  assert.equal(second.status, "duplicate");
  assert.equal(first.log_index, second.log_index);
  signer.answered([again.envelope]);
  signer.sign("file_read", { target: "/etc/hosts" }); // unsent when the agent "restarts"
  const restarted = new Client(node.url, Signer.open(path, "eng"));
  await restarted.emit("file_write", { target: "/tmp/out" });
  assert.deepEqual((await restarted.flush()).map((r) => r.status), ["accepted", "accepted"]);
  const [status, agent] = await node.call("GET", `/v1/agents/${key.did}`);
  assert.equal(status, 200);
  assert.equal(agent.events, 8);
  assert.equal(agent.last_seq, 7);
});

test("a refused event is reported with its reason", async () => {
  const client = new Client(node.url, new Signer(AgentKey.generate(), "eng"));
  await client.emit("tool_call", { action: "x" });
  const results = await client.flush();
  assert.equal(results[0].status, "rejected");
  assert.equal(results[0].reason, "unknown_agent");
});

test("an unreachable node keeps events pending", async () => {
  const path = join(mkdtempSync(join(tmpdir(), "custos-ts-")), "agent.key");
  AgentKey.generate().save(path);
  const client = new Client("http://127.0.0.1:9", Signer.open(path, "eng"), { maxAttempts: 2, backoffMs: 10 });
  await client.emit("tool_call", { action: "x" });
  await assert.rejects(client.flush(), (error) => error instanceof CustosError && error.code === "unreachable");
  assert.equal(Signer.open(path, "eng").pending().length, 1);
});

test("a playbook revokes an SDK agent and its feed knows within a second", async () => {
  const key = AgentKey.generate();
  const bystander = AgentKey.generate();
  await node.enroll(key.did, "ops");
  await node.enroll(bystander.did, "ops");
  const token = await node.token("analyst", ["ops"]);
  const [, checkpoint] = await node.call("GET", "/v1/checkpoints/latest");
  const feed = await new EnforcementFeed(node.url, token, checkpoint.node_did).start();
  assert.equal(feed.isRevoked(key.did), false);
  const client = new Client(node.url, new Signer(key, "ops"));
  // Memory poisoning (docs/detection.md): the contain-compromised-agent playbook revokes.
  await client.emit("memory_write", { memory_id: "mem-ts-poisoned", attrs: { source_trust: "untrusted" } });
  await client.emit("memory_read", { memory_id: "mem-ts-poisoned" });
  await client.emit("credential_use", { target: "cred-db", attrs: { credential_owner: key.did } });
  assert.ok((await client.flush()).every((r) => r.status === "accepted"));
  let nodeSaw = null;
  let feedSaw = null;
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline && feedSaw === null) {
    const now = Date.now();
    if (nodeSaw === null && (await node.call("GET", `/v1/agents/${key.did}`))[1].status === "revoked") nodeSaw = now;
    if (feed.isRevoked(key.did)) feedSaw = now;
    await sleep(20);
  }
  assert.notEqual(feedSaw, null, `the feed never saw the revocation: ${feed.errors}`);
  assert.ok(nodeSaw === null || feedSaw - nodeSaw < 1000, `${nodeSaw} ${feedSaw}`);
  assert.equal(feed.isRevoked(bystander.did), false);
  const wait = Date.now() + 5000;
  while (!feed.isQuarantined("mem-ts-poisoned") && Date.now() < wait) await sleep(20);
  assert.ok(feed.isQuarantined("mem-ts-poisoned"));
  assert.equal((await feed.refresh()).issuer, checkpoint.node_did);
  feed.stop();
});

test("a feed refuses a list signed by another key", async () => {
  const token = await node.token("analyst", ["ops"]);
  const feed = new EnforcementFeed(node.url, token, AgentKey.generate().did);
  await assert.rejects(feed.refresh(), (error) => error.code === "wrong_signer");
});

test("spans through the processor become events signed by the agent", async () => {
  const key = AgentKey.generate();
  await node.enroll(key.did, "eng");
  const client = new Client(node.url, new Signer(key, "eng"));
  const processor = new CustosSpanProcessor(client);
  // A ReadableSpan as @opentelemetry/sdk-trace-base 1.x hands it over (kind 2 = CLIENT, status 2 = ERROR).
  const span = (name, kind, attributes, status, spanId) => ({
    name, kind, attributes, status: { code: status }, endTime: [Math.floor(Date.now() / 1000), 5e8],
    spanContext: () => ({ traceId: "4bf92f3577b34da6a3ce929d0e0e4736", spanId }), parentSpanId: undefined,
  });
  processor.onEnd(span("chat", 2, { "gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 10 }, 0, "00f067aa0ba902b7"));
  processor.onEnd(span("execute_tool lookup", 0, { "gen_ai.tool.name": "lookup" }, 2, "00f067aa0ba902b8"));
  processor.onEnd(span("GET /health", 1, {}, 0, "00f067aa0ba902b9"));
  await processor.forceFlush();
  const [status, rows] = await node.call("POST", "/v1/sql", { sql: `SELECT kind, action, outcome, tokens_in, span_id FROM events WHERE agent = '${key.did}' ORDER BY seq` });
  assert.equal(status, 200, JSON.stringify(rows));
  assert.deepEqual(rows.map((r) => [r.kind, r.action, r.outcome]), [["llm_call", "chat", "ok"], ["tool_call", "lookup", "error"]]);
  assert.equal(rows[0].tokens_in, 10);
  assert.equal(rows[1].span_id, "00f067aa0ba902b8");
});
