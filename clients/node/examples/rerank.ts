// Example: rank three documents against a query, then list the served models.
//   RERANK_TARGET=127.0.0.1:50051 RERANK_API_KEY=... node dist/examples/rerank.js
import { ConnectError, createRerankClient, fieldViolations } from "../src/index.js";

const target = process.env.RERANK_TARGET ?? "127.0.0.1:50051";
const apiKey = process.env.RERANK_API_KEY;

const client = createRerankClient(target, { apiKey, timeoutMs: 10_000 });
try {
  const response = await client.rerank("red apple", ["a red apple", "a car", "apple pie"], {
    model: "qwen3-rerank",
    topN: 2,
    returnDocuments: true,
  });
  console.log(`request ${response.requestId}, ${response.usage?.totalTokens ?? 0} tokens`);
  for (const r of response.output?.results ?? []) {
    console.log(`#${r.index}  ${r.relevanceScore.toFixed(3)}  ${r.document?.text ?? ""}`);
  }
  const models = await client.listModels();
  console.log("models:", models.map((m) => `${m.name} (max ${m.maxDocuments} docs)`).join(", "));
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
