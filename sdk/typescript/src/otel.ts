/**
 * OpenTelemetry GenAI spans as signed Custos events (docs/integrations.md,
 * "OpenTelemetry"). `mapSpan` is the mapping, the same as the Python bridge's and the
 * node's OTLP ingest (`sdk/otel-mapping.json` holds the cases all are tested against);
 * `CustosSpanProcessor` is a span processor for `@opentelemetry/sdk-trace-base` that
 * signs each mapped span with the agent's own key through a `Client`.
 */
import type { Client } from "./client.js";
import { formatTs, KINDS, type EventFields, type Kind } from "./payload.js";

export const OPERATIONS: Record<string, Kind> = {
  chat: "llm_call",
  text_completion: "llm_call",
  generate_content: "llm_call",
  embeddings: "llm_call",
  execute_tool: "tool_call",
  invoke_agent: "message_received",
  create_memory: "memory_write",
  update_memory: "memory_write",
  delete_memory: "memory_delete",
  search_memory: "memory_read",
};
const LLM = new Set(["chat", "text_completion", "generate_content", "embeddings"]);

/** A span in the shape `mapSpan` takes (hex ids, RFC 3339 end time). */
export interface SpanRecord {
  name: string;
  attributes: Record<string, unknown>;
  kind: "client" | "server" | "internal" | "producer" | "consumer";
  trace_id: string;
  span_id: string;
  parent_span_id: string | null;
  error: boolean;
  end_time: string;
}

const first = (attributes: Record<string, unknown>, names: string[]) => {
  for (const name of names) if (attributes[name] !== undefined && attributes[name] !== null && attributes[name] !== "") return attributes[name];
  return undefined;
};

/** The GenAI operation: `gen_ai.operation.name`, else the span name's first word. */
export function operationOf(name: string, attributes: Record<string, unknown>): string | null {
  const operation = (attributes["gen_ai.operation.name"] as string) || (name ?? "").split(" ")[0];
  return operation in OPERATIONS ? operation : null;
}

/** The payload members (kind and the optional ones) for one span, or null for a span that
 * is not a GenAI operation. */
export function mapSpan(span: SpanRecord): (EventFields & { kind: Kind }) | null {
  const attributes = span.attributes ?? {};
  const operation = operationOf(span.name, attributes);
  if (!operation) return null;
  let kind = OPERATIONS[operation];
  if (operation === "invoke_agent" && span.kind === "client") kind = "message_sent";
  const override = attributes["custos.kind"];
  if ((KINDS as readonly unknown[]).includes(override)) kind = override as Kind;
  const event: EventFields & { kind: Kind } = { kind, ts: span.end_time };
  const tool = operation === "execute_tool" ? attributes["gen_ai.tool.name"] : undefined;
  event.action = String(tool || operation);
  let target = attributes["custos.target"];
  if (target === undefined) {
    if (LLM.has(operation)) target = attributes["gen_ai.request.model"];
    else if (operation === "invoke_agent") target = first(attributes, ["gen_ai.agent.id", "gen_ai.agent.name"]);
  }
  if (target !== undefined && target !== null) event.target = String(target);
  event.outcome = span.error ? "error" : "ok";
  const integer = (value: unknown) => (Number.isSafeInteger(value) && (value as number) >= 0 ? (value as number) : undefined);
  const tokensIn = integer(first(attributes, ["gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"]));
  if (tokensIn !== undefined) event.tokens_in = tokensIn;
  const tokensOut = integer(first(attributes, ["gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"]));
  if (tokensOut !== undefined) event.tokens_out = tokensOut;
  const session = first(attributes, ["gen_ai.conversation.id", "session.id"]);
  if (session !== undefined) event.session = String(session).slice(0, 256);
  if (span.trace_id) event.trace_id = span.trace_id;
  if (span.span_id) event.span_id = span.span_id;
  if (span.parent_span_id) event.parent = span.parent_span_id;
  const memory = first(attributes, ["gen_ai.memory.record.id"]);
  if (memory !== undefined) event.memory_id = String(memory).slice(0, 256);
  const attrs: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("gen_ai.")) attrs[name] = value;
    else if (name.startsWith("custos.attrs.")) attrs[name.slice("custos.attrs.".length)] = value;
  }
  // Old and new names of the provider: both readable under the new one.
  const provider = first(attributes, ["gen_ai.provider.name", "gen_ai.system"]);
  if (provider !== undefined) attrs["gen_ai.provider.name"] = provider;
  delete attrs["gen_ai.system"];
  if (Object.keys(attrs).length) event.attrs = attrs;
  return event;
}

const SPAN_KINDS = ["internal", "server", "client", "producer", "consumer"] as const;

/** What `CustosSpanProcessor` reads of an OpenTelemetry `ReadableSpan` (1.x and 2.x). */
export interface ReadableSpanLike {
  name: string;
  kind: number;
  attributes: Record<string, unknown>;
  spanContext(): { traceId: string; spanId: string };
  parentSpanId?: string;
  parentSpanContext?: { spanId: string };
  status: { code: number };
  endTime: [number, number];
}

/** An OpenTelemetry ReadableSpan in the shape `mapSpan` takes. */
export function spanRecord(span: ReadableSpanLike): SpanRecord {
  const [seconds, nanos] = span.endTime;
  const end = new Date(seconds * 1000 + Math.floor(nanos / 1e6));
  return {
    name: span.name,
    attributes: { ...span.attributes },
    kind: SPAN_KINDS[span.kind] ?? "internal",
    trace_id: span.spanContext().traceId,
    span_id: span.spanContext().spanId,
    parent_span_id: span.parentSpanContext?.spanId ?? span.parentSpanId ?? null,
    error: span.status?.code === 2,
    end_time: formatTs(end),
  };
}

/** Signs every ended GenAI span as an event of the client's agent. */
export class CustosSpanProcessor {
  private sending: Promise<unknown> = Promise.resolve();
  constructor(private readonly client: Client) {}

  onStart(): void {}

  onEnd(span: ReadableSpanLike): void {
    const event = mapSpan(spanRecord(span));
    if (!event) return;
    const { kind, ...fields } = event;
    // Signed now (durably pending, in span order); sent by the next flush.
    this.client.signer?.sign(kind, fields);
  }

  async forceFlush(): Promise<void> {
    this.sending = this.client.flush();
    await this.sending;
  }

  async shutdown(): Promise<void> {
    await this.forceFlush();
  }
}
