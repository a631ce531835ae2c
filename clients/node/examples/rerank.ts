// Example: list the served models, then rank three documents against a query.
//   RERANK_TARGET=127.0.0.1:50051 RERANK_API_KEY=... node dist/examples/rerank.js
// RERANK_MODEL names the model; without it the example uses the first model the
// server lists (all-minilm-l6-v2 under `make serve`), since the client's default,
// "qwen3-rerank", is served only by the upstream backend.
import { ConnectError, createRerankClient, fieldViolations } from "../src/index.js";

const target = process.env.RERANK_TARGET ?? "127.0.0.1:50051";
const apiKey = process.env.RERANK_API_KEY;

const client = createRerankClient(target, { apiKey, timeoutMs: 10_000 });
try {
  const models = await client.listModels();
  console.log("models:", models.map((m) => `${m.name} (max ${m.maxDocuments} docs)`).join(", "));
  const model = process.env.RERANK_MODEL || models[0]?.name;
  if (!model) throw new Error("the server serves no models");
  const response = await client.rerank("red apple", ["a red apple", "a car", "apple pie"], {
    model,
    topN: 2,
    returnDocuments: true,
  });
  console.log(`model ${model}, request ${response.requestId}, ${response.usage?.totalTokens ?? 0} tokens`);
  for (const r of response.output?.results ?? []) {
    console.log(`#${r.index}  ${r.relevanceScore.toFixed(3)}  ${r.document?.text ?? ""}`);
  }
} catch (err) {
  if (err instanceof ConnectError) {
    console.error(`rerank failed: ${err.rawMessage} [code ${err.code}]`, fieldViolations(err));
  } else {
    console.error(err);
  }
  process.exitCode = 1;
} finally {
  client.close();
}
