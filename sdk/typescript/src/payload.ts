/**
 * Event payloads, serialised as the Rust `custos-event` crate serialises them: members in
 * the order of docs/event-format.md's table, absent optional members left out, `attrs`
 * in the caller's order, compact JSON, UTF-8 without escaping non-ASCII.
 */
import { CustosError } from "./errors.js";

export const KINDS = [
  "tool_call", "tool_result", "llm_call", "memory_read", "memory_write", "memory_delete",
  "credential_use", "delegation", "message_sent", "message_received", "file_read",
  "file_write", "policy_change", "auth",
] as const;
export type Kind = (typeof KINDS)[number];
export const FIELDS = [
  "agent", "seq", "prev", "ts", "realm", "kind", "action", "target", "outcome",
  "bytes_in", "bytes_out", "tokens_in", "tokens_out", "session", "trace_id", "span_id",
  "parent", "memory_id", "attrs",
] as const;

/** The optional members an event may carry (agent, seq, prev are the signer's). */
export interface EventFields {
  ts?: Date | string;
  realm?: string;
  action?: string;
  target?: string;
  outcome?: "ok" | "denied" | "error";
  bytes_in?: number;
  bytes_out?: number;
  tokens_in?: number;
  tokens_out?: number;
  session?: string;
  trace_id?: string;
  span_id?: string;
  parent?: string;
  memory_id?: string;
  attrs?: Record<string, unknown>;
}

/** RFC 3339 in UTC with `Z`: whole seconds bare, else milliseconds (a Date has no more). */
export function formatTs(ts: Date | string): string {
  if (typeof ts === "string") return ts;
  const text = ts.toISOString(); // 2026-01-15T09:30:00.000Z
  return text.endsWith(".000Z") ? text.slice(0, -5) + "Z" : text;
}

const bad = (message: string) => new CustosError("bad_payload", message);
const bytes = (text: string) => Buffer.byteLength(text, "utf8");

/** Refuses, before signing, what the node would refuse as `bad_payload`. */
export function check(fields: Record<string, unknown>): void {
  const unknown = Object.keys(fields).filter((name) => !(FIELDS as readonly string[]).includes(name));
  if (unknown.length) throw bad(`unknown field(s) ${unknown.join(", ")}; put extra data in attrs`);
  if (!(KINDS as readonly unknown[]).includes(fields.kind)) throw bad(`kind \`${fields.kind}\` is not one of ${KINDS.join(", ")}`);
  if (typeof fields.realm !== "string" || !/^[A-Za-z0-9._-]{1,64}$/.test(fields.realm)) {
    throw bad(`realm \`${fields.realm}\` is not 1-64 characters of [A-Za-z0-9._-]`);
  }
  if (fields.outcome != null && !["ok", "denied", "error"].includes(fields.outcome as string)) {
    throw bad(`outcome \`${fields.outcome}\` is not ok, denied or error`);
  }
  for (const name of ["bytes_in", "bytes_out", "tokens_in", "tokens_out"]) {
    const value = fields[name];
    if (value != null && !(Number.isSafeInteger(value) && (value as number) >= 0)) throw bad(`${name} \`${value}\` is not an unsigned integer`);
  }
  for (const name of ["action", "session", "parent", "memory_id"]) {
    const value = fields[name];
    if (value != null && (typeof value !== "string" || bytes(value) > 256)) throw bad(`${name} must be a string of at most 256 bytes`);
  }
  if (fields.target != null && (typeof fields.target !== "string" || bytes(fields.target) > 4096)) {
    throw bad("target must be a string of at most 4096 bytes");
  }
  if (fields.trace_id != null && !/^[0-9a-f]{32}$/.test(String(fields.trace_id))) throw bad(`trace_id \`${fields.trace_id}\` is not 32 lowercase hex digits`);
  if (fields.span_id != null && !/^[0-9a-f]{16}$/.test(String(fields.span_id))) throw bad(`span_id \`${fields.span_id}\` is not 16 lowercase hex digits`);
  if (fields.attrs != null && (typeof fields.attrs !== "object" || Array.isArray(fields.attrs))) throw bad("attrs must be an object");
}

/** The payload bytes: members in FIELDS order, absent (undefined or null) optional members left out. */
export function encode(fields: Record<string, unknown>): Uint8Array {
  check(fields);
  const ordered: Record<string, unknown> = {};
  for (const name of FIELDS) {
    const value = fields[name];
    if (name === "prev") ordered.prev = value ?? null;
    else if (value !== undefined && value !== null) ordered[name] = value;
  }
  ordered.ts = formatTs(ordered.ts as Date | string);
  let text: string;
  try {
    text = JSON.stringify(ordered);
  } catch (error) {
    throw bad(`the payload cannot be JSON: ${(error as Error).message}`);
  }
  return Buffer.from(text, "utf8");
}
