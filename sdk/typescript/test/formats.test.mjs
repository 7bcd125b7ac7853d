// The SDK against the published formats: docs/test-vectors.json, byte for byte.
import assert from "node:assert/strict";
import { mkdtempSync, statSync, chmodSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { AgentKey, CustosError, Signer, blake3Hex, encode, mapSpan, openEnvelope, pae, publicKeyFromDid } from "@custos/sdk";
import { repoFile } from "./node.mjs";

const vectors = JSON.parse(repoFile("docs", "test-vectors.json"));
const hex = (bytes) => Buffer.from(bytes).toString("hex");

test("the key and did match the vectors", () => {
  const key = AgentKey.fromSeed(Buffer.from(vectors.agent.seed_hex, "hex"));
  assert.equal(hex(key.publicKey), vectors.agent.public_key_hex);
  assert.equal(key.did, vectors.agent.did);
  assert.equal(hex(publicKeyFromDid(key.did)), vectors.agent.public_key_hex);
});

test("a signer reproduces every vector envelope", () => {
  const signer = new Signer(AgentKey.fromSeed(Buffer.from(vectors.agent.seed_hex, "hex")), "eng");
  for (const vector of vectors.events) {
    const { agent, seq, prev, kind, ...fields } = JSON.parse(vector.payload);
    const event = signer.sign(kind, fields);
    assert.equal(Buffer.from(event.payload).toString("utf8"), vector.payload);
    assert.equal(hex(pae("application/vnd.custos.event+json", event.payload)), vector.pae_hex);
    assert.equal(event.envelope, vector.envelope);
  }
  assert.equal(JSON.parse(vectors.events[1].payload).prev, blake3Hex(Buffer.from(vectors.events[0].payload)));
});

test("payload encoding refuses what the node refuses", () => {
  const base = { agent: "did:key:z", seq: 0, prev: null, ts: "2026-01-15T09:30:00Z", realm: "eng" };
  for (const [bad, text] of [
    [{ kind: "teleport" }, "kind"],
    [{ kind: "tool_call", realm: "e ng" }, "realm"],
    [{ kind: "tool_call", outcome: "maybe" }, "outcome"],
    [{ kind: "tool_call", tokens_in: -1 }, "tokens_in"],
    [{ kind: "tool_call", trace_id: "XYZ" }, "trace_id"],
    [{ kind: "tool_call", colour: "red" }, "unknown"],
  ]) {
    assert.throws(() => encode({ ...base, ...bad }), (error) => error instanceof CustosError && error.code === "bad_payload" && error.detail.includes(text));
  }
  const body = encode({ ...base, seq: 1, prev: "p", kind: "tool_call", attrs: { z: 1, a: { y: "é", b: 2 } } });
  assert.equal(Buffer.from(body).toString("utf8"), '{"agent":"did:key:z","seq":1,"prev":"p","ts":"2026-01-15T09:30:00Z","realm":"eng","kind":"tool_call","attrs":{"z":1,"a":{"y":"é","b":2}}}');
});

test("a tampered envelope does not open", () => {
  const envelope = JSON.parse(vectors.events[0].envelope);
  const did = vectors.agent.did;
  const type = "application/vnd.custos.event+json";
  assert.equal(Buffer.from(openEnvelope(envelope, type, did)).toString("utf8"), vectors.events[0].payload);
  const altered = { ...envelope, payload: Buffer.from(vectors.events[0].payload.replace("512", "513")).toString("base64") };
  assert.throws(() => openEnvelope(altered, type, did), (error) => error.code === "bad_signature");
  assert.throws(() => openEnvelope(envelope, "application/vnd.custos.revocations+json", did), (error) => error.code === "bad_payload_type");
  assert.throws(() => openEnvelope(envelope, type, AgentKey.fromSeed(Buffer.alloc(32, 7)).did), (error) => error.code === "wrong_signer");
});

test("key files are the CLI's and owner-only", () => {
  const path = join(mkdtempSync(join(tmpdir(), "custos-key-")), "agent.key");
  const key = AgentKey.generate();
  key.save(path);
  assert.equal(statSync(path).mode & 0o777, 0o600);
  assert.equal(AgentKey.load(path).did, key.did);
  assert.throws(() => key.save(path), (error) => error.code === "key_exists");
  chmodSync(path, 0o644);
  assert.throws(() => AgentKey.load(path), (error) => error.code === "key_permissions");
});

test("the chain survives a crash between keeping and advancing", () => {
  const path = join(mkdtempSync(join(tmpdir(), "custos-key-")), "agent.key");
  AgentKey.fromSeed(Buffer.alloc(32, 5)).save(path);
  const signer = Signer.open(path, "eng");
  const first = signer.sign("tool_call", { action: "a" });
  const chain = readFileSync(`${path}.chain.json`, "utf8");
  const second = signer.sign("tool_call", { action: "b" });
  writeFileSync(`${path}.chain.json`, chain); // died before saving the chain past `second`
  const again = Signer.open(path, "eng");
  assert.deepEqual(again.pending(), [first.envelope, second.envelope]);
  const third = again.sign("tool_call", { action: "c" });
  assert.equal(third.seq, 2);
  assert.equal(JSON.parse(Buffer.from(third.payload).toString("utf8")).prev, blake3Hex(second.payload));
  again.answered([first.envelope, second.envelope]);
  assert.deepEqual(Signer.open(path, "eng").pending(), [third.envelope]);
});

test("every OpenTelemetry mapping case", () => {
  for (const { name, span, event } of JSON.parse(repoFile("sdk", "otel-mapping.json")).cases) {
    assert.deepEqual(mapSpan(span), event, name);
  }
});
