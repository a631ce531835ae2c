package io.rerankservice.client.example;

import io.grpc.StatusRuntimeException;
import io.rerankservice.client.RerankClient;
import io.rerankservice.rerank.v1.ModelInfo;
import io.rerankservice.rerank.v1.RerankResponse;
import io.rerankservice.rerank.v1.RerankResult;
import java.util.List;

/**
 * Ranks three documents against a query. Reads RERANK_TARGET (host:port, default
 * localhost:50051) and RERANK_API_KEY; set RERANK_TLS=1 to use TLS instead of plaintext.
 * RERANK_MODEL names the model; without it the example uses the first model the server
 * lists (all-minilm-l6-v2 under {@code make serve}), since the client's default,
 * qwen3-rerank, is served only by the upstream backend.
 */
public final class RerankExample {
  private RerankExample() {}

  public static void main(String[] args) {
    String target = envOr("RERANK_TARGET", "localhost:50051");
    String apiKey = System.getenv("RERANK_API_KEY");
    boolean tls = "1".equals(System.getenv("RERANK_TLS"));
    String query = args.length > 0 ? args[0] : "red apple";
    List<String> docs = List.of("a red apple", "a car", "apple pie");

    try (RerankClient client =
        RerankClient.builder(target).apiKey(apiKey).plaintext(!tls).build()) {
      List<ModelInfo> models = client.listModels().getModelsList();
      for (ModelInfo m : models) {
        System.out.printf("model %s (max_documents=%d)%n", m.getName(), m.getMaxDocuments());
      }
      String served = models.isEmpty() ? RerankClient.DEFAULT_MODEL : models.get(0).getName();
      String model = envOr("RERANK_MODEL", served);
      RerankResponse resp =
          client.rerank(
              query,
              docs,
              RerankClient.Options.defaults().model(model).topN(2).returnDocuments(true));
      System.out.printf("model=%s request_id=%s total_tokens=%d%n",
          model, resp.getRequestId(), resp.getUsage().getTotalTokens());
      for (RerankResult r : resp.getOutput().getResultsList()) {
        System.out.printf("  #%d %.4f %s%n", r.getIndex(), r.getRelevanceScore(),
            r.getDocument().getText());
      }
    } catch (StatusRuntimeException e) {
      System.err.println("rerank failed: " + e.getStatus());
      RerankClient.fieldViolations(e)
          .forEach(v -> System.err.println("  " + v.getField() + ": " + v.getDescription()));
      System.exit(1);
    }
  }

  private static String envOr(String name, String fallback) {
    String v = System.getenv(name);
    return v == null || v.isEmpty() ? fallback : v;
  }
}
