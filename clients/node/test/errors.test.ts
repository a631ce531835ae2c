// reasonOf, retryDelayOf and the retry advice of an error, against a scripted in-test
// server (no live rerank-service needed) that fails every call as rerank-service fails
// one after the upstream failed: UNAVAILABLE, ErrorInfo UPSTREAM_UNAVAILABLE, RetryInfo,
// and `grpc-retry-pushback-ms: -1` (docs/ERRORS.md).
import assert from "node:assert/strict";
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { connectNodeAdapter } from "@connectrpc/connect-node";

import {
  Code,
  ConnectError,
  createRerankClient,
  ErrorInfoSchema,
  reasonOf,
  RerankErrorSchema,
  RerankService,
  retryDelayOf,
  RetryInfoSchema,
} from "../src/index.js";

function upstreamUnavailable(): ConnectError {
  return new ConnectError(
    "upstream unavailable: HTTP 503",
    Code.Unavailable,
    { "grpc-retry-pushback-ms": "-1" },
    [
      {
        desc: ErrorInfoSchema,
        value: { reason: "UPSTREAM_UNAVAILABLE", domain: "rerank-service", metadata: { upstream_status: "503" } },
      },
      { desc: RetryInfoSchema, value: { retryDelay: { seconds: 1n, nanos: 500_000_000 } } },
    ],
  );
}

describe("error helpers", () => {
  let server: http2.Http2Server;
  let target = "";

  before(async () => {
    server = http2.createServer(
      connectNodeAdapter({
        routes(router) {
          router.service(RerankService, {
            rerank() {
              throw upstreamUnavailable();
            },
            listModels() {
              throw new ConnectError("draining", Code.Unavailable);
            },
          });
        },
      }),
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    target = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(() => {
    server.close();
  });

  test("reasonOf and retryDelayOf read the ErrorInfo and RetryInfo of a failed call", async () => {
    const client = createRerankClient(target, { timeoutMs: 10_000 });
    try {
      const err = await client.rerank("q", ["d"]).then(
        () => assert.fail("the call should fail"),
        (e: unknown) => e,
      );
      assert.ok(err instanceof ConnectError, `expected a ConnectError, got ${String(err)}`);
      assert.equal(err.code, Code.Unavailable);
      assert.equal(reasonOf(err), "UPSTREAM_UNAVAILABLE");
      assert.equal(retryDelayOf(err), 1500);
      // What tells a caller not to re-send this UNAVAILABLE: the server already called the upstream.
      assert.equal(err.metadata.get("grpc-retry-pushback-ms"), "-1");
      assert.equal(err.findDetails(ErrorInfoSchema)[0]?.metadata.upstream_status, "503");

      const plain = await client.listModels().then(
        () => assert.fail("the call should fail"),
        (e: unknown) => e,
      );
      assert.equal(reasonOf(plain), undefined);
      assert.equal(retryDelayOf(plain), undefined);
      assert.equal((plain as ConnectError).metadata.get("grpc-retry-pushback-ms"), null);
    } finally {
      client.close();
    }
  });

  test("reasonOf and retryDelayOf read a RerankStream item's RerankError", () => {
    const itemError = create(RerankErrorSchema, {
      code: Code.ResourceExhausted,
      reason: "UPSTREAM_RATE_LIMITED",
      retryDelay: { seconds: 7n },
    });
    assert.equal(reasonOf(itemError), "UPSTREAM_RATE_LIMITED");
    assert.equal(retryDelayOf(itemError), 7000);
    assert.equal(retryDelayOf(create(RerankErrorSchema, { code: Code.InvalidArgument })), undefined);
    assert.equal(reasonOf(new Error("not a gRPC error")), undefined);
  });
});
