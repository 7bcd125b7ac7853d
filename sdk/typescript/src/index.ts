/**
 * Custos SDK: sign agent events, send them, and obey the node's revocations.
 *
 * ```ts
 * import { AgentKey, Client, EnforcementFeed, Signer } from "@custos/sdk";
 * ```
 */
export { AgentKey, base58Decode, base58Encode, didFromPublicKey, publicKeyFromDid, verify } from "./key.js";
export { Client, RETRYABLE, type ClientOptions, type Result } from "./client.js";
export { EVENT_PAYLOAD_TYPE, REVOCATIONS_PAYLOAD_TYPE, envelopeJson, openEnvelope, pae, signEnvelope } from "./dsse.js";
export { CustosError } from "./errors.js";
export { EnforcementFeed } from "./feed.js";
export { CustosSpanProcessor, mapSpan, spanRecord, type SpanRecord } from "./otel.js";
export { FIELDS, KINDS, encode, formatTs, type EventFields, type Kind } from "./payload.js";
export { Signer, blake3Hex, type SignedEvent } from "./signer.js";
