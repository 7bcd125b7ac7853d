/** DSSE envelopes as Custos writes them: one signature, compact JSON, fixed member order. */
import { CustosError } from "./errors.js";
import { type AgentKey, verify } from "./key.js";

export const EVENT_PAYLOAD_TYPE = "application/vnd.custos.event+json";
export const REVOCATIONS_PAYLOAD_TYPE = "application/vnd.custos.revocations+json";

/** The DSSE pre-authentication encoding the signature covers. */
export function pae(payloadType: string, body: Uint8Array): Uint8Array {
  const type = Buffer.from(payloadType, "utf8");
  return Buffer.concat([Buffer.from(`DSSEv1 ${type.length} `), type, Buffer.from(` ${body.length} `), body]);
}

/** The envelope exactly as the node and the test vectors spell it. */
export function envelopeJson(payloadType: string, payload: Uint8Array, keyid: string, sig: Uint8Array): string {
  return JSON.stringify({
    payloadType,
    payload: Buffer.from(payload).toString("base64"),
    signatures: [{ keyid, sig: Buffer.from(sig).toString("base64") }],
  });
}

export function signEnvelope(key: AgentKey, payloadType: string, payload: Uint8Array): string {
  return envelopeJson(payloadType, payload, key.did, key.sign(pae(payloadType, payload)));
}

function b64(text: unknown): Buffer {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/_-]*={0,2}$/.test(text)) throw new Error("not base64");
  return Buffer.from(text.replace(/-/g, "+").replace(/_/g, "/"), "base64");
}

/** The payload of `envelope` once its one signature verifies as `signerDid`'s over
 * `payloadType`; a CustosError naming what is wrong otherwise. */
export function openEnvelope(envelope: string | Record<string, unknown>, payloadType: string, signerDid: string): Uint8Array {
  let value: Record<string, unknown>;
  try {
    value = typeof envelope === "string" ? JSON.parse(envelope) : envelope;
  } catch (error) {
    throw new CustosError("bad_envelope", `the envelope is not JSON: ${(error as Error).message}`);
  }
  if (!value || Object.keys(value).sort().join(",") !== "payload,payloadType,signatures") {
    throw new CustosError("bad_envelope", "a DSSE envelope has exactly payloadType, payload and signatures");
  }
  if (value.payloadType !== payloadType) {
    throw new CustosError("bad_payload_type", `payloadType \`${value.payloadType}\`, expected \`${payloadType}\``);
  }
  const signatures = value.signatures as Array<Record<string, unknown>>;
  if (!Array.isArray(signatures) || signatures.length !== 1) throw new CustosError("bad_envelope", "exactly one signature is expected");
  if (signatures[0].keyid !== signerDid) {
    throw new CustosError("wrong_signer", `signed by \`${signatures[0].keyid}\`, expected \`${signerDid}\``);
  }
  let payload: Buffer, sig: Buffer;
  try {
    payload = b64(value.payload);
    sig = b64(signatures[0].sig);
  } catch {
    throw new CustosError("bad_envelope", "payload or sig is not base64");
  }
  if (sig.length !== 64 || !verify(signerDid, pae(payloadType, payload), sig)) {
    throw new CustosError("bad_signature", `the signature does not verify as \`${signerDid}\`'s`);
  }
  return Uint8Array.from(payload);
}
