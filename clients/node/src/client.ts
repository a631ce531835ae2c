// A small, typed wrapper over the generated rerank.v1 stubs (Connect-ES v2 over gRPC/HTTP2).
import { create } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { durationMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import type { CallOptions, Client, Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
import {
  RerankErrorSchema,
  RerankRequestSchema,
  RerankService,
} from "./gen/rerank/v1/rerank_pb.js";
import type {
  LongDocuments,
  ModelInfo,
  RerankError,
  RerankResponse,
  RerankStreamRequestSchema,
  RerankStreamResponse,
} from "./gen/rerank/v1/rerank_pb.js";

/** The metadata key every response (success or error) carries the request id under. */
export const REQUEST_ID_KEY = "x-request-id";

export interface RerankClientOptions {
  /**
   * Sent as `authorization: Bearer <apiKey>` on every call. Omit for a server without keys.
   * Surrounding whitespace (the newline of a key read from a file) is dropped; any other
   * character than printable ASCII makes createRerankClient throw.
   */
  apiKey?: string;
  /**
   * Default deadline of each unary call (Rerank, ListModels), in milliseconds.
   * Unset or 0: no deadline (unlike Python's timeout=0, a deadline already past).
   * RerankStream does not use it (streams are long); pass `timeoutMs` to
   * rerankStream() to bound a stream.
   */
  timeoutMs?: number;
  /**
   * Use TLS. Default: false for a bare `host:port` target (plaintext HTTP/2, h2c);
   * a target starting with `https://` or `http://` decides by itself.
   */
  tls?: boolean;
}

/** Per-call options of rerank(). */
export interface RerankOptions {
  /** The model, one of the names listModels() returns. Default "qwen3-rerank". */
  model?: string;
  /** How many of the best documents to return. Unset returns all of them. */
  topN?: number;
  /** A task instruction that steers the ranking. */
  instruct?: string;
  /** Whether each result carries the document text. Default false. */
  returnDocuments?: boolean;
  /**
   * A document longer than the model's window: TRUNCATE, CHUNK (rank by the best
   * chunk; results say bestChunk) or REJECT. Unset: the route's default.
   */
  longDocuments?: LongDocuments;
  /** The window a document is cut or chunked to, in tokens. */
  maxTokensPerDoc?: number;
  /** Tokens neighbouring chunks share. */
  chunkOverlapTokens?: number;
}

/** Deadline and cancellation of one call. */
export interface CallControl {
  /** Overrides the client's default deadline for this call, in milliseconds (0: none). */
  timeoutMs?: number;
  /** Cancels the call when aborted. */
  signal?: AbortSignal;
}

/** One item of a RerankStream: a client-chosen id plus the request. */
export interface RerankStreamItem extends RerankOptions {
  /** Echoed on this item's response; unique among the items in flight. */
  id: string;
  query: string;
  documents: string[];
}

/** A google.rpc.BadRequest field violation, or a RerankError one. */
export interface FieldViolation {
  field: string;
  description: string;
}

export interface RerankClient {
  /** Ranks `documents` against `query`; results are ordered by relevanceScore, highest first. */
  rerank(
    query: string,
    documents: string[],
    options?: RerankOptions & CallControl,
  ): Promise<RerankResponse>;
  /**
   * Ranks many requests over one bidirectional stream. Responses arrive as items
   * finish (out of order): match them by `id`. A failing item is answered with
   * `result.case === "error"` and the stream goes on. The stream ends after the
   * input is exhausted and every item has been answered. Leaving the loop over it
   * early (break, return, a throw) cancels the stream.
   */
  rerankStream(
    items: Iterable<RerankStreamItem> | AsyncIterable<RerankStreamItem>,
    options?: CallControl,
  ): AsyncIterable<RerankStreamResponse>;
  /** The models the deployment serves, with their limits. */
  listModels(options?: CallControl): Promise<ModelInfo[]>;
  /** The generated Connect client, for anything the wrapper does not cover. */
  readonly raw: Client<typeof RerankService>;
  /** Closes the HTTP/2 connection. Calls made afterwards open a new one. */
  close(): void;
}

export const DEFAULT_MODEL = "qwen3-rerank";

/** `host:port` (plaintext h2c by default) or a full `http://` / `https://` URL. */
function baseUrlOf(target: string, tls: boolean | undefined): string {
  if (/^https?:\/\//i.test(target)) {
    return target;
  }
  return `${tls ? "https" : "http"}://${target}`;
}

function requestInit(
  query: string,
  documents: string[],
  options: RerankOptions,
): MessageInitShape<typeof RerankRequestSchema> {
  return {
    model: options.model ?? DEFAULT_MODEL,
    query,
    documents,
    topN: options.topN,
    instruct: options.instruct,
    returnDocuments: options.returnDocuments ?? false,
    longDocuments: options.longDocuments,
    maxTokensPerDoc: options.maxTokensPerDoc,
    chunkOverlapTokens: options.chunkOverlapTokens,
  };
}

/**
 * The key without surrounding whitespace. Throws, never quoting the key, for one no
 * header can carry: each call would fail (Code.Unknown) with an error quoting it whole.
 */
function checkedApiKey(apiKey: string | undefined): string | undefined {
  const key = apiKey?.trim();
  if (key && !/^[\x21-\x7e]+$/.test(key)) {
    throw new TypeError(
      "apiKey must be printable ASCII (letters, digits, punctuation; no spaces or control characters)",
    );
  }
  return key || undefined;
}

/** Creates a client for the RerankService at `target` (for example "127.0.0.1:50051"). */
export function createRerankClient(
  target: string,
  options: RerankClientOptions = {},
): RerankClient {
  const baseUrl = baseUrlOf(target, options.tls);
  const interceptors: Interceptor[] = [];
  const apiKey = checkedApiKey(options.apiKey);
  if (apiKey) {
    const authorization = `Bearer ${apiKey}`;
    interceptors.push((next) => (req) => {
      req.header.set("authorization", authorization);
      return next(req);
    });
  }
  const sessionManager = new Http2SessionManager(baseUrl);
  // gRPC over HTTP/2. (Connect-ES v2's createGrpcTransport always uses HTTP/2 —
  // it sets httpVersion "2" itself and no longer accepts the option.)
  const transport = createGrpcTransport({
    baseUrl,
    sessionManager,
    interceptors,
  });
  const raw = createClient(RerankService, transport);

  const unary = (control: CallControl | undefined): CallOptions => ({
    timeoutMs: control?.timeoutMs ?? options.timeoutMs,
    signal: control?.signal,
  });

  return {
    raw,
    rerank(query, documents, callOptions = {}) {
      return raw.rerank(requestInit(query, documents, callOptions), unary(callOptions));
    },
    async *rerankStream(items, control) {
      // Connect-ES cancels a stream only through its signal: leaving the loop early
      // (break, return, a throw) must cancel it here, or the items in flight run on
      // (and are billed) and an open-ended `items` keeps the stream open.
      const controller = new AbortController();
      const { signal } = controller;
      async function* requests(): AsyncIterable<MessageInitShape<typeof RerankStreamRequestSchema>> {
        // `items` is read by hand: a `for await` waiting on an open-ended producer's
        // next() could neither stop nor close it when the stream is cancelled.
        const iterator =
          Symbol.asyncIterator in items ? items[Symbol.asyncIterator]() : items[Symbol.iterator]();
        let done = false;
        try {
          for (;;) {
            // Each pull listens for the cancel only while it waits: racing one promise
            // that settles when the stream ends would keep every item pulled (its
            // query and documents) until then.
            const next = await new Promise<IteratorResult<RerankStreamItem> | "cancelled">(
              (resolve, reject) => {
                if (signal.aborted) {
                  resolve("cancelled");
                  return;
                }
                const onAbort = () => resolve("cancelled");
                signal.addEventListener("abort", onAbort, { once: true });
                // (A next() that throws rejects here too, so the listener still goes.)
                new Promise<IteratorResult<RerankStreamItem>>((pull) => pull(iterator.next()))
                  .then(resolve, reject)
                  .finally(() => signal.removeEventListener("abort", onAbort));
              },
            );
            if (next === "cancelled") {
              return;
            }
            if (next.done) {
              done = true;
              return;
            }
            const item = next.value;
            yield { id: item.id, request: requestInit(item.query, item.documents, item) };
          }
        } finally {
          if (!done) {
            // Not awaited: a producer busy in next() finishes that first.
            Promise.resolve(iterator.return?.()).catch(() => {});
          }
        }
      }
      const callerSignal = control?.signal;
      const forward = () => controller.abort(callerSignal?.reason);
      if (callerSignal?.aborted) {
        forward();
      } else {
        callerSignal?.addEventListener("abort", forward, { once: true });
      }
      try {
        yield* raw.rerankStream(requests(), {
          timeoutMs: control?.timeoutMs,
          signal: controller.signal,
        });
      } finally {
        callerSignal?.removeEventListener("abort", forward);
        controller.abort(); // a no-op once the stream has ended
      }
    },
    async listModels(control) {
      const response = await raw.listModels({}, unary(control));
      return response.models;
    },
    close() {
      sessionManager.abort();
    },
  };
}

/**
 * The field violations of an error: the google.rpc.BadRequest details of a
 * ConnectError (INVALID_ARGUMENT), or the field_violations of a RerankStream
 * item's RerankError. Empty when there are none.
 */
export function fieldViolations(err: unknown): FieldViolation[] {
  if (isRerankError(err)) {
    return err.fieldViolations.map(({ field, description }) => ({ field, description }));
  }
  if (err instanceof ConnectError || err instanceof Error) {
    const connectErr = ConnectError.from(err);
    return connectErr
      .findDetails(BadRequestSchema)
      .flatMap((badRequest) => badRequest.fieldViolations)
      .map(({ field, description }) => ({ field, description }));
  }
  return [];
}

/** The request id (`x-request-id` trailer) an error carries, if any. */
export function requestIdOf(err: unknown): string | undefined {
  if (isRerankError(err)) {
    return err.requestId || undefined;
  }
  if (err instanceof ConnectError) {
    return err.metadata.get(REQUEST_ID_KEY) ?? undefined;
  }
  return undefined;
}

/**
 * The machine-readable reason of an error (docs/ERRORS.md): the google.rpc.ErrorInfo
 * reason of a ConnectError, for example "UPSTREAM_UNAVAILABLE" or "MODEL_NOT_FOUND", or
 * the reason of a RerankStream item's RerankError. Undefined when there is none.
 */
export function reasonOf(err: unknown): string | undefined {
  if (isRerankError(err)) {
    return err.reason || undefined;
  }
  if (err instanceof ConnectError) {
    return err.findDetails(ErrorInfoSchema)[0]?.reason || undefined;
  }
  return undefined;
}

/**
 * How long to wait before a retry can succeed, in milliseconds: the google.rpc.RetryInfo
 * of a ConnectError, or the retryDelay of a RerankStream item's RerankError. Undefined
 * when the error gives no such advice.
 */
export function retryDelayOf(err: unknown): number | undefined {
  if (isRerankError(err)) {
    return err.retryDelay ? durationMs(err.retryDelay) : undefined;
  }
  if (err instanceof ConnectError) {
    const delay = err.findDetails(RetryInfoSchema)[0]?.retryDelay;
    return delay ? durationMs(delay) : undefined;
  }
  return undefined;
}

/** The gRPC status code of an error (Code.Unknown for non-Connect errors). */
export function codeOf(err: unknown): Code {
  if (isRerankError(err)) {
    return err.code as Code;
  }
  return ConnectError.from(err).code;
}

function isRerankError(err: unknown): err is RerankError {
  return (
    typeof err === "object" &&
    err !== null &&
    (err as { $typeName?: unknown }).$typeName === RerankErrorSchema.typeName
  );
}

/** Builds a RerankRequest message (for use with the raw client). */
export function rerankRequest(query: string, documents: string[], options: RerankOptions = {}) {
  return create(RerankRequestSchema, requestInit(query, documents, options));
}
