/**
 * Enforcement at the agent platform. `EnforcementFeed` holds the node's signed revocation
 * list (`GET /v1/control/revocations`, a DSSE envelope the node key signs) and follows
 * `GET /v1/control/stream`. A stream event that makes things stricter (a revocation, a
 * quarantine) is applied at once; every event also fetches the signed list again, and
 * only a list whose signature verifies can lift anything. A list older than the one held
 * (a smaller `log_size`) is refused, so a replayed list cannot un-revoke an agent.
 */
import { errorOf } from "./client.js";
import { REVOCATIONS_PAYLOAD_TYPE, openEnvelope } from "./dsse.js";
import { CustosError } from "./errors.js";

const STRICTER: Record<string, string> = { agent_revoked: "revoked", agent_quarantined: "quarantined" };

export class EnforcementFeed {
  readonly url: string;
  logSize = -1;
  readonly errors: CustosError[] = [];
  private agents = new Map<string, string>();
  private memories = new Set<string>();
  private stopped = false;
  private abort: AbortController | null = null;

  /** Pass `nodeDid` (printed by `custos serve`, and in `GET /v1/checkpoints/latest`) so a
   * substituted list is refused; without it the feed trusts the node's on first use. */
  constructor(url: string, readonly token: string, public nodeDid?: string) {
    this.url = url.replace(/\/+$/, "");
  }

  isRevoked(did: string): boolean {
    return this.agents.get(did) === "revoked";
  }

  /** `revoked`, `quarantined`, or `active` (not listed). */
  agentStatus(did: string): string {
    return this.agents.get(did) ?? "active";
  }

  isQuarantined(memoryId: string): boolean {
    return this.memories.has(memoryId);
  }

  private async get(path: string): Promise<Response> {
    const response = await fetch(`${this.url}${path}`, {
      headers: { Authorization: `Bearer ${this.token}` },
      signal: AbortSignal.timeout(10_000),
    });
    if (response.status !== 200) throw await errorOf(response);
    return response;
  }

  /** Fetches and verifies the signed list, and holds it; answers its payload. */
  async refresh(): Promise<any> {
    if (!this.nodeDid) this.nodeDid = (await (await this.get("/v1/checkpoints/latest")).json()).node_did as string;
    const envelope = await (await this.get("/v1/control/revocations")).text();
    const listing = JSON.parse(Buffer.from(openEnvelope(envelope, REVOCATIONS_PAYLOAD_TYPE, this.nodeDid)).toString("utf8"));
    if (listing.issuer !== this.nodeDid) {
      throw new CustosError("wrong_issuer", `the list names issuer \`${listing.issuer}\`, not \`${this.nodeDid}\``);
    }
    if (listing.log_size < this.logSize) {
      throw new CustosError("stale_list", `the list reflects log size ${listing.log_size}, older than the ${this.logSize} already held`);
    }
    const agents = new Map<string, string>();
    for (const entry of listing.quarantined_agents ?? []) agents.set(entry.did, "quarantined");
    for (const entry of listing.revoked_agents ?? []) agents.set(entry.did, "revoked");
    this.agents = agents;
    this.memories = new Set(
      (listing.quarantined_memories ?? []).filter((entry: any) => entry.status === "quarantined").map((entry: any) => entry.id),
    );
    this.logSize = listing.log_size;
    return listing;
  }

  /** Fetches the list, then follows the stream in the background (reconnecting). */
  async start(): Promise<this> {
    await this.refresh();
    let connected!: () => void;
    const opened = new Promise<void>((done) => (connected = done));
    void this.follow(connected);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([opened, new Promise((done) => (timer = setTimeout(done, 10_000)))]);
    clearTimeout(timer);
    return this;
  }

  stop(): void {
    this.stopped = true;
    this.abort?.abort();
  }

  private note(error: unknown): void {
    this.errors.push(error instanceof CustosError ? error : new CustosError("stream", String(error)));
  }

  private async follow(connected: () => void): Promise<void> {
    let delay = 100;
    while (!this.stopped) {
      try {
        await this.readStream(connected);
        delay = 100;
      } catch (error) {
        if (!this.stopped) this.note(error);
      }
      if (this.stopped) return;
      await new Promise((done) => setTimeout(done, delay));
      delay = Math.min(delay * 2, 5_000);
      await this.refresh().catch((error) => this.note(error));
    }
  }

  private async readStream(connected: () => void): Promise<void> {
    this.abort = new AbortController();
    const response = await fetch(`${this.url}/v1/control/stream`, {
      headers: { Authorization: `Bearer ${this.token}`, Accept: "text/event-stream" },
      signal: this.abort.signal,
    });
    if (response.status !== 200 || !response.body) throw await errorOf(response);
    connected();
    const decoder = new TextDecoder();
    let buffered = "";
    let name: string | null = null;
    let data: string[] = [];
    for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
      buffered += decoder.decode(chunk, { stream: true });
      let newline: number;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline).replace(/\r$/, "");
        buffered = buffered.slice(newline + 1);
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        else if (line === "" && name) {
          await this.event(name, data.join("\n"));
          name = null;
          data = [];
        }
      }
    }
  }

  private async event(name: string, data: string): Promise<void> {
    if (name === "token_invalid") throw new CustosError("token_invalid", "the node ended the stream: the token is no longer valid");
    if (name !== "lagged") {
      try {
        const change = JSON.parse(data);
        if (STRICTER[name] && change.agent && this.agents.get(change.agent) !== "revoked") this.agents.set(change.agent, STRICTER[name]);
        if (name === "memory_quarantined" && change.subject) this.memories.add(change.subject);
      } catch {
        // not JSON: the signed list below decides
      }
    }
    // Only the signed list is authoritative; fetch it after every change.
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await this.refresh();
        return;
      } catch (error) {
        if (error instanceof CustosError && error.code === "stale_list") return;
        await new Promise((done) => setTimeout(done, 50 * (attempt + 1)));
      }
    }
  }
}
