// Integration tests against a LIVE rerank-service.
//   RERANK_TARGET   host:port of the server (plaintext HTTP/2, h2c). Required: the
//                   tests FAIL (never skip) when it is unset.
//   RERANK_API_KEY  a key the server accepts.
// The server must use the test upstream (rerank_service.testing.fake_upstream), which
// scores documents deterministically and delays queries tagged "[[delay=N]]".
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";

import {
  Code,
  ConnectError,
  createRerankClient,
  fieldViolations,
  LongDocuments,
  reasonOf,
  type RerankClient,
  type RerankStreamItem,
  type RerankStreamResponse,
} from "../src/index.js";

const target = process.env.RERANK_TARGET ?? "";
const apiKey = process.env.RERANK_API_KEY ?? "";
const MODEL = "qwen3-rerank";
const DOCS = ["a red apple", "a car", "apple pie"];

function requireTarget(): void {
  assert.ok(
    target !== "",
    "RERANK_TARGET is not set: these tests need a live rerank-service " +
      "(set RERANK_TARGET=host:port and RERANK_API_KEY=<key>)",
  );
}

async function rejectsWithCode(promise: Promise<unknown>, code: Code): Promise<ConnectError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof ConnectError, `expected a ConnectError, got ${String(err)}`);
    assert.equal(err.code, code, `expected ${Code[code]}, got ${Code[err.code]}: ${err.message}`);
    return err;
  }
  assert.fail(`expected the call to fail with ${Code[code]}, it succeeded`);
}

describe("rerank-service client (live server)", () => {
  // Created on first use, so that every test fails with the clear message (rather
  // than being cancelled by a failed hook) when RERANK_TARGET is unset.
  let shared: RerankClient | undefined;
  function client(): RerankClient {
    requireTarget();
    shared ??= createRerankClient(target, { apiKey, timeoutMs: 10_000 });
    return shared;
  }

  after(() => {
    shared?.close();
  });

  test("Rerank returns the top documents with scores, texts, usage and request id", async () => {
    const response = await client().rerank("red apple", DOCS, {
      model: MODEL,
      topN: 2,
      returnDocuments: true,
    });
    const results = response.output?.results ?? [];
    assert.deepEqual(
      results.map((r) => r.index),
      [0, 2],
    );
    assert.deepEqual(
      results.map((r) => r.relevanceScore),
      [1.0, 0.5],
    );
    assert.deepEqual(
      results.map((r) => r.document?.text),
      ["a red apple", "apple pie"],
    );
    // Another suite may have scored these pairs already: the server's cache then answers them.
    const used = (response.usage?.totalTokens ?? 0) + (response.usage?.cachedTokens ?? 0);
    assert.ok(used > 0, "usage.totalTokens + usage.cachedTokens should be > 0");
    assert.ok(response.requestId.length > 0, "requestId should be non-empty");
    const again = await client().rerank("red apple", DOCS, {
      model: MODEL,
      topN: 2,
      returnDocuments: true,
    });
    assert.deepEqual(again.output?.results, response.output?.results);
    assert.equal(again.usage?.totalTokens ?? 0, 0, "a repeated call is answered from the cache");
    assert.ok((again.usage?.cachedTokens ?? 0) > 0, "usage.cachedTokens should be > 0");
  });

  test("an answer over 4 MiB is received (the server allows 16 MiB)", async () => {
    const docs = Array.from(
      { length: 5 }, // 1 MiB each, echoed back
      (_, i) => `doc ${i} ` + "lorem ipsum dolor sit amet ".repeat(40_000),
    );
    const response = await client().rerank("lorem node", docs, { model: MODEL, returnDocuments: true });
    assert.deepEqual((response.output?.results ?? []).map((r) => r.document?.text).sort(), [...docs].sort());
  });

  test("reasonOf reads the ErrorInfo reason of a call and of a stream item", async () => {
    const err = await rejectsWithCode(client().rerank("red apple", DOCS, { model: "no-such-model" }), Code.NotFound);
    assert.equal(reasonOf(err), "MODEL_NOT_FOUND");
    const answers: RerankStreamResponse[] = [];
    for await (const response of client().rerankStream(
      [{ id: "m", query: "red apple", documents: DOCS, model: "no-such-model" }],
      { timeoutMs: 10_000 },
    )) {
      answers.push(response);
    }
    assert.equal(answers.length, 1);
    const item = answers[0]!.result;
    assert.equal(item.case, "error");
    assert.equal(reasonOf(item.value), "MODEL_NOT_FOUND");
  });

  test("a long document is chunked and its best chunk located in the document", async () => {
    const long = "pear plum grape ".repeat(300) + "red apple";
    const response = await client().rerank("red apple", [long, "a car"], {
      model: MODEL,
      longDocuments: LongDocuments.CHUNK,
      maxTokensPerDoc: 200,
    });
    const best = response.output?.results[0];
    assert.equal(best?.index, 0);
    assert.ok((best?.chunks ?? 0) > 1, "the long document should be scored in several chunks");
    assert.equal(best?.truncated, false);
    const chunk = Array.from(long).slice(best?.bestChunk?.start, best?.bestChunk?.end).join("");
    assert.ok(chunk.endsWith("red apple"), `best chunk ${chunk} should end with the answer`);
    assert.equal(response.output?.results[1]?.chunks, 1);
  });

  test("an empty query is INVALID_ARGUMENT with a BadRequest violation on 'query'", async () => {
    const err = await rejectsWithCode(client().rerank("", DOCS, { model: MODEL }), Code.InvalidArgument);
    const fields = fieldViolations(err).map((v) => v.field);
    assert.ok(fields.includes("query"), `expected a field violation on "query", got ${JSON.stringify(fields)}`);
  });

  test("a call without the API key is UNAUTHENTICATED", async () => {
    requireTarget();
    const anonymous = createRerankClient(target, { timeoutMs: 10_000 });
    try {
      await rejectsWithCode(anonymous.rerank("red apple", DOCS, { model: MODEL }), Code.Unauthenticated);
    } finally {
      anonymous.close();
    }
  });

  test("a call past its deadline is DEADLINE_EXCEEDED", async () => {
    await rejectsWithCode(
      client().rerank("[[delay=2]] red apple", DOCS, { model: MODEL, timeoutMs: 300 }),
      Code.DeadlineExceeded,
    );
  });

  test("RerankStream answers every item by id, failing items with their error", async () => {
    const items: RerankStreamItem[] = [
      { id: "a", query: "red apple", documents: DOCS, model: MODEL },
      { id: "b", query: "", documents: DOCS, model: MODEL },
      { id: "c", query: "apple pie", documents: DOCS, model: MODEL },
    ];
    const received: RerankStreamResponse[] = [];
    for await (const response of client().rerankStream(items, { timeoutMs: 10_000 })) {
      received.push(response);
    }
    assert.equal(received.length, 3, `expected 3 responses, got ${received.length}`);
    const byId = new Map(received.map((r) => [r.id, r]));
    assert.deepEqual([...byId.keys()].sort(), ["a", "b", "c"]);

    const b = byId.get("b")!;
    assert.equal(b.result.case, "error", "item b should carry an error");
    if (b.result.case === "error") {
      assert.equal(b.result.value.code, 3);
      assert.equal(b.result.value.fieldViolations[0]?.field, "query");
      assert.equal(fieldViolations(b.result.value)[0]?.field, "query");
    }
    for (const id of ["a", "c"]) {
      const r = byId.get(id)!;
      assert.equal(r.result.case, "response", `item ${id} should carry a response`);
      if (r.result.case === "response") {
        assert.equal(r.result.value.output?.results.length, 3);
      }
    }
  });

  test("an API key is sent without its surrounding whitespace (a key file's newline)", async () => {
    requireTarget();
    const fromFile = createRerankClient(target, { apiKey: ` ${apiKey}\n`, timeoutMs: 10_000 });
    try {
      const response = await fromFile.rerank("red apple", DOCS, { model: MODEL });
      assert.equal(response.output?.results.length, DOCS.length);
    } finally {
      fromFile.close();
    }
  });

  test("an API key that is not printable ASCII is refused up front, without quoting it", () => {
    requireTarget();
    for (const key of ["sk-mid\nline-secret", "sk-ключ-secret", "sk-nul\u0000-secret", "sk-space secret"]) {
      assert.throws(
        () => createRerankClient(target, { apiKey: key }),
        (err: unknown) => {
          assert.ok(err instanceof TypeError, `expected a TypeError, got ${String(err)}`);
          assert.match(err.message, /printable ASCII/);
          assert.ok(!err.message.includes("secret"), `the error quotes the key: ${err.message}`);
          return true;
        },
        `apiKey ${JSON.stringify(key)} should be refused`,
      );
    }
  });

  // Without the cancel, the stream stays open (its items running, and billed) until
  // close(): `items` is never closed, so the test times out.
  test("leaving a RerankStream loop early cancels the stream", { timeout: 20_000 }, async () => {
    let itemsClosed!: () => void;
    const closed = new Promise<void>((resolve) => (itemsClosed = resolve));
    const queued: RerankStreamItem[] = [
      { id: "fast", query: "red apple", documents: DOCS, model: MODEL },
      { id: "slow", query: "[[delay=60]] red apple", documents: DOCS, model: MODEL },
    ];
    // An open-ended producer: two items, then none yet (its next() never settles).
    const items: AsyncIterableIterator<RerankStreamItem> = {
      [Symbol.asyncIterator]() {
        return this;
      },
      next() {
        const item = queued.shift();
        return item ? Promise.resolve({ done: false, value: item }) : new Promise(() => {});
      },
      return() {
        itemsClosed();
        return Promise.resolve({ done: true, value: undefined });
      },
    };
    const received: string[] = [];
    for await (const response of client().rerankStream(items)) {
      received.push(response.id);
      break;
    }
    assert.deepEqual(received, ["fast"]);
    await closed; // the cancelled stream closes `items`, though its next() never settles
  });

  // A long-lived stream must not hold the items it has sent: each pull of `items` raced
  // one promise that settled only when the stream ended, and every race kept its item.
  test("an open RerankStream keeps no item it has sent and had answered", async () => {
    const gc = exposedGc();
    const N = 20;
    const sent: WeakRef<string[]>[] = [];
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    async function* items(): AsyncGenerator<RerankStreamItem> {
      for (let i = 0; i < N; i++) {
        const documents = [`a red apple ${i}`, "a car"];
        sent.push(new WeakRef(documents));
        yield { id: String(i), query: "red apple", documents, model: MODEL };
      }
      await held; // the stream stays open, as an open-ended producer's does
    }
    let answered = 0;
    let alive = -1;
    for await (const response of client().rerankStream(items())) {
      assert.equal(response.result.case, "response");
      if (++answered === N) {
        // The latest item may still be referenced inside Connect's request pipeline
        // (one item, not a growth): the ones before it must be gone.
        alive = await aliveAfterGc(sent.slice(0, -1), gc);
        release();
      }
    }
    assert.equal(answered, N);
    assert.equal(alive, 0, `${alive} of the first ${N - 1} items sent and answered are still held by the open stream`);
  });

  test("a RerankStream that ends normally, and one cancelled by the caller's signal", async () => {
    const done: string[] = [];
    for await (const response of client().rerankStream(
      [{ id: "a", query: "red apple", documents: DOCS, model: MODEL }],
      { signal: new AbortController().signal },
    )) {
      done.push(response.id);
    }
    assert.deepEqual(done, ["a"]);

    const controller = new AbortController();
    const slow = [{ id: "s", query: "[[delay=60]] red apple", documents: DOCS, model: MODEL }];
    const draining = (async () => {
      for await (const response of client().rerankStream(slow, { signal: controller.signal })) {
        assert.fail(`no answer expected, got ${response.id}`);
      }
    })();
    controller.abort();
    await rejectsWithCode(draining, Code.Canceled);
  });

  test("ListModels includes qwen3-rerank", async () => {
    const models = await client().listModels();
    assert.ok(
      models.some((m) => m.name === MODEL),
      `expected ${MODEL} among ${JSON.stringify(models.map((m) => m.name))}`,
    );
  });
});

/** global.gc, without --expose-gc on node's command line (test.sh runs plain `node --test`). */
function exposedGc(): () => void {
  setFlagsFromString("--expose-gc");
  return runInNewContext("gc") as () => void;
}

/** How many of refs' targets survive full collections (a WeakRef holds its target until its job ends). */
async function aliveAfterGc(refs: WeakRef<object>[], gc: () => void): Promise<number> {
  let alive = refs.length;
  for (let round = 0; round < 5 && alive > 0; round++) {
    await new Promise((resolve) => setImmediate(resolve));
    gc();
    alive = refs.filter((ref) => ref.deref() !== undefined).length;
  }
  return alive;
}
