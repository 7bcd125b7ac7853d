/**
 * The agent's side of the hash chain: `seq` and `prev`, kept durably.
 *
 * With files (`Signer.open(keyFile, realm)`), the state lives beside the key exactly as
 * `custos emit` keeps it: `<key>.chain.json` (`{"next_seq":N,"prev":"<blake3 hex>"|null}`)
 * and `<key>.pending.ndjson` (every signed envelope not yet answered). An envelope is in
 * the pending file (fsynced) before the chain state moves past it, and at open the state
 * is taken past the last pending envelope too, so a crash never signs one `seq` twice.
 */
import { blake3 } from "@noble/hashes/blake3";
import { closeSync, existsSync, fsyncSync, openSync, readFileSync, renameSync, writeSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { EVENT_PAYLOAD_TYPE, signEnvelope } from "./dsse.js";
import { CustosError } from "./errors.js";
import { AgentKey } from "./key.js";
import { encode, type EventFields, type Kind } from "./payload.js";

export interface SignedEvent {
  seq: number;
  payload: Uint8Array;
  envelope: string;
}

export const blake3Hex = (bytes: Uint8Array) => Buffer.from(blake3(bytes)).toString("hex");

function writeAtomic(path: string, data: string): void {
  const temporary = `${path}.tmp`;
  const fd = openSync(temporary, "w");
  try {
    writeSync(fd, data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(temporary, path);
  const directory = openSync(dirname(resolve(path)), "r");
  try {
    fsyncSync(directory);
  } finally {
    closeSync(directory);
  }
}

function envelopePayload(line: string): Buffer {
  try {
    return Buffer.from(JSON.parse(line).payload, "base64");
  } catch {
    throw new CustosError("bad_pending", `a pending line is not a Custos envelope: ${line.slice(0, 80)}`);
  }
}

export interface SignerOptions {
  chainPath?: string;
  pendingPath?: string;
}

/** Signs payloads as `key`, filling in `agent`, `seq`, `prev`, `realm` and `ts`. */
export class Signer {
  nextSeq = 0;
  prev: string | null = null;
  private pendingLines: string[] = [];

  constructor(readonly key: AgentKey, readonly realm: string, readonly options: SignerOptions = {}) {
    const { chainPath, pendingPath } = options;
    if (chainPath && existsSync(chainPath)) {
      try {
        const state = JSON.parse(readFileSync(chainPath, "utf8"));
        if (!Number.isSafeInteger(state.next_seq)) throw new Error("next_seq");
        this.nextSeq = state.next_seq;
        this.prev = state.prev ?? null;
      } catch {
        throw new CustosError("bad_chain_state", `\`${chainPath}\` is not chain state`);
      }
    }
    if (pendingPath && existsSync(pendingPath)) {
      this.pendingLines = readFileSync(pendingPath, "utf8").split("\n").filter((line) => line.trim());
      const last = this.pendingLines.at(-1);
      if (last) {
        const payload = envelopePayload(last);
        const seq = JSON.parse(payload.toString("utf8")).seq ?? -1;
        if (seq + 1 > this.nextSeq) {
          // Signed and kept, but the chain state was not saved after it.
          this.nextSeq = seq + 1;
          this.prev = blake3Hex(payload);
          this.saveChain();
        }
      }
    }
  }

  /** The key in `keyFile`, with its chain state and pending envelopes beside it. */
  static open(keyFile: string, realm: string): Signer {
    return new Signer(AgentKey.load(keyFile), realm, {
      chainPath: `${keyFile}.chain.json`,
      pendingPath: `${keyFile}.pending.ndjson`,
    });
  }

  private saveChain(): void {
    if (this.options.chainPath) writeAtomic(this.options.chainPath, JSON.stringify({ next_seq: this.nextSeq, prev: this.prev }));
  }

  private savePending(): void {
    if (this.options.pendingPath) writeAtomic(this.options.pendingPath, this.pendingLines.join("\n"));
  }

  /** Signs one event. */
  sign(kind: Kind, fields: EventFields = {}): SignedEvent {
    return this.signMany([{ ...fields, kind }])[0];
  }

  /** Signs several events in order, with one fsync for them all. */
  signMany(events: Array<EventFields & { kind: Kind }>): SignedEvent[] {
    let seq = this.nextSeq;
    let prev = this.prev;
    const signed: SignedEvent[] = [];
    for (const event of events) {
      const fields: Record<string, unknown> = { ...event };
      if ("agent" in fields || "seq" in fields || "prev" in fields) {
        throw new CustosError("bad_payload", "agent, seq and prev are the signer's to fill in");
      }
      fields.realm ??= this.realm;
      fields.ts ??= new Date();
      Object.assign(fields, { agent: this.key.did, seq, prev });
      const payload = encode(fields);
      signed.push({ seq, payload, envelope: signEnvelope(this.key, EVENT_PAYLOAD_TYPE, payload) });
      seq += 1;
      prev = blake3Hex(payload);
    }
    this.pendingLines.push(...signed.map((event) => event.envelope));
    this.savePending();
    this.nextSeq = seq;
    this.prev = prev;
    this.saveChain();
    return signed;
  }

  /** Signed envelopes the node has not answered yet, oldest first. */
  pending(): string[] {
    return [...this.pendingLines];
  }

  /** Drops envelopes the node answered (accepted, duplicate or rejected). */
  answered(envelopes: string[]): void {
    const done = new Set(envelopes);
    this.pendingLines = this.pendingLines.filter((line) => !done.has(line));
    this.savePending();
  }
}
