/**
 * Sends signed events to a node: batched, retried, never lost, never forked. A batch is
 * resent byte for byte until the node answers it; after a timeout the node may already
 * have stored it, and then answers `duplicate` for those events.
 */
import { CustosError } from "./errors.js";
import type { EventFields, Kind } from "./payload.js";
import type { SignedEvent, Signer } from "./signer.js";

/** Answers that mean "try the same bytes again later". */
export const RETRYABLE = new Set([408, 429, 500, 502, 503, 504]);

/** The node's answer for one envelope (docs/api.md, POST /v1/events). */
export interface Result {
  index: number;
  status: "accepted" | "duplicate" | "rejected";
  reason: string | null;
  message?: string | null;
  log_index: number | null;
  flags?: string[];
}

export interface ClientOptions {
  batchSize?: number;
  timeoutMs?: number;
  maxAttempts?: number;
  backoffMs?: number;
}

const sleep = (ms: number) => new Promise((done) => setTimeout(done, ms));

export async function errorOf(response: Response): Promise<CustosError> {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return new CustosError(body.error ?? "http_error", body.message ?? "", response.status);
  } catch {
    return new CustosError("http_error", `HTTP ${response.status}: ${text.slice(0, 200)}`, response.status);
  }
}

export class Client {
  readonly url: string;
  readonly rejected: Result[] = [];
  private readonly batchSize: number;
  private readonly timeoutMs: number;
  private readonly maxAttempts: number;
  private readonly backoffMs: number;
  private flushing: Promise<Result[]> | null = null;

  constructor(url: string, readonly signer?: Signer, options: ClientOptions = {}) {
    this.url = url.replace(/\/+$/, "");
    this.batchSize = options.batchSize ?? 500;
    if (this.batchSize < 1 || this.batchSize > 10_000) {
      throw new CustosError("bad_batch_size", `batchSize ${this.batchSize} is not 1..10000 (the node's limit)`);
    }
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.maxAttempts = options.maxAttempts ?? 8;
    this.backoffMs = options.backoffMs ?? 200;
  }

  /** Signs one event (durably pending) and flushes when a batch is full. */
  async emit(kind: Kind, fields: EventFields = {}): Promise<SignedEvent> {
    if (!this.signer) throw new CustosError("no_signer", "this client was made without a Signer");
    const event = this.signer.sign(kind, fields);
    if (this.signer.pending().length >= this.batchSize) await this.flush();
    return event;
  }

  /** Sends everything pending; answers one Result per envelope sent. */
  async flush(): Promise<Result[]> {
    // One flush at a time: a second caller waits for the first, then sends what is left.
    while (this.flushing) await this.flushing.catch(() => undefined);
    this.flushing = this.flushAll();
    try {
      return await this.flushing;
    } finally {
      this.flushing = null;
    }
  }

  private async flushAll(): Promise<Result[]> {
    const results: Result[] = [];
    if (!this.signer) return results;
    for (;;) {
      const batch = this.signer.pending().slice(0, this.batchSize);
      if (!batch.length) return results;
      results.push(...(await this.send(batch)));
      this.signer.answered(batch);
    }
  }

  /** Posts envelopes (JSON strings) as one NDJSON request, retrying what may be retried;
   * throws CustosError when the node refuses the request itself. */
  async send(envelopes: string[]): Promise<Result[]> {
    const body = envelopes.join("\n");
    for (let attempt = 1; ; attempt++) {
      let wait = this.backoffMs * 2 ** Math.min(attempt - 1, 6) * (0.5 + Math.random());
      let response: Response;
      try {
        response = await fetch(`${this.url}/v1/events`, {
          method: "POST",
          headers: { "Content-Type": "application/x-ndjson", Accept: "application/json" },
          body,
          signal: AbortSignal.timeout(this.timeoutMs),
        });
      } catch (error) {
        if (attempt >= this.maxAttempts) {
          throw new CustosError("unreachable", `${this.url} did not answer after ${attempt} attempts: ${(error as Error).message}`);
        }
        await sleep(wait);
        continue;
      }
      if (response.status === 200) {
        const results = (await response.json()) as Result[];
        if (results.length !== envelopes.length) {
          throw new CustosError("bad_answer", `${results.length} results for ${envelopes.length} envelopes`);
        }
        this.rejected.push(...results.filter((result) => result.status === "rejected"));
        return results;
      }
      if (RETRYABLE.has(response.status) && attempt < this.maxAttempts) {
        const retryAfter = Number(response.headers.get("retry-after"));
        if (Number.isFinite(retryAfter) && retryAfter > 0) wait = Math.max(wait, retryAfter * 1000);
        await response.body?.cancel();
        await sleep(wait);
        continue;
      }
      throw await errorOf(response);
    }
  }
}
