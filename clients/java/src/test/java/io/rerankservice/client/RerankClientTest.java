package io.rerankservice.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.google.rpc.BadRequest;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.rerankservice.rerank.v1.ListModelsRequest;
import io.rerankservice.rerank.v1.LongDocuments;
import io.rerankservice.rerank.v1.ModelInfo;
import io.rerankservice.rerank.v1.RerankError;
import io.rerankservice.rerank.v1.RerankResponse;
import io.rerankservice.rerank.v1.RerankResult;
import io.rerankservice.rerank.v1.RerankServiceGrpc;
import io.rerankservice.rerank.v1.RerankStreamRequest;
import io.rerankservice.rerank.v1.RerankStreamResponse;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * Runs against a LIVE rerank-service: RERANK_TARGET (host:port, plaintext) and
 * RERANK_API_KEY. Fails (never skips) when RERANK_TARGET is not set.
 */
class RerankClientTest {
  private static final String MODEL = "qwen3-rerank";
  private static final List<String> DOCS = List.of("a red apple", "a car", "apple pie");

  private static String target;
  private static RerankClient client;

  @BeforeAll
  static void connect() {
    target = System.getenv("RERANK_TARGET");
    if (target == null || target.isBlank()) {
      fail("RERANK_TARGET is not set: these tests need a live rerank-service; "
          + "set RERANK_TARGET=host:port (plaintext) and RERANK_API_KEY=<key>");
    }
    String apiKey = System.getenv("RERANK_API_KEY");
    if (apiKey == null || apiKey.isBlank()) {
      fail("RERANK_API_KEY is not set: set it to a key the server at " + target + " accepts");
    }
    client = RerankClient.builder(target).apiKey(apiKey).plaintext(true)
        .deadline(Duration.ofSeconds(10)).build();
  }

  @AfterAll
  static void close() {
    if (client != null) {
      client.close();
    }
  }

  @Test
  void rerankRanksTopTwoWithDocuments() {
    RerankResponse resp = client.rerank("red apple", DOCS,
        RerankClient.Options.defaults().model(MODEL).topN(2).returnDocuments(true));
    List<RerankResult> results = resp.getOutput().getResultsList();
    assertEquals(2, results.size(), "results: " + results);
    assertEquals(0, results.get(0).getIndex());
    assertEquals(2, results.get(1).getIndex());
    assertEquals(1.0, results.get(0).getRelevanceScore(), 1e-9);
    assertEquals(0.5, results.get(1).getRelevanceScore(), 1e-9);
    assertEquals("a red apple", results.get(0).getDocument().getText());
    assertEquals("apple pie", results.get(1).getDocument().getText());
    // Another suite may have scored these pairs already: the server's cache then answers them.
    assertTrue(resp.getUsage().getTotalTokens() + resp.getUsage().getCachedTokens() > 0,
        "usage.total_tokens + usage.cached_tokens > 0");
    assertFalse(resp.getRequestId().isEmpty(), "request_id is empty");
    RerankResponse again = client.rerank("red apple", DOCS,
        RerankClient.Options.defaults().model(MODEL).topN(2).returnDocuments(true));
    assertEquals(results, again.getOutput().getResultsList());
    assertEquals(0, again.getUsage().getTotalTokens(), "a repeated call is answered from the cache");
    assertTrue(again.getUsage().getCachedTokens() > 0, "usage.cached_tokens > 0");
  }

  /**
   * The server answers up to --max-message-bytes (16 MiB): grpc-java's 4 MiB inbound default
   * would fail an answer the server had already ranked and billed. A channel given to the
   * builder gets no limit from the client's calls either.
   */
  @Test
  void anAnswerOverFourMebibytesIsReceived() {
    List<String> docs = new ArrayList<>();
    for (int i = 0; i < 5; i++) {
      docs.add("doc " + i + " " + "lorem ipsum dolor sit amet ".repeat(40_000)); // 1 MiB each
    }
    RerankClient.Options opts = RerankClient.Options.defaults().model(MODEL).returnDocuments(true);
    assertEquals(Set.copyOf(docs), textsOf(client.rerank("lorem java", docs, opts)));

    ManagedChannel channel = ManagedChannelBuilder.forTarget(target).usePlaintext().build();
    try (RerankClient given = RerankClient.builder("unused").channel(channel)
        .apiKey(System.getenv("RERANK_API_KEY")).build()) {
      assertEquals(Set.copyOf(docs), textsOf(given.rerank("lorem java", docs, opts)));
    } finally {
      channel.shutdownNow();
    }
  }

  /**
   * Generated stubs built on authenticatedChannel() send the key, as the client's own calls do
   * (on channel() they are UNAUTHENTICATED), and get no receive limit, on a given channel too.
   */
  @Test
  void generatedStubsOnTheAuthenticatedChannelCarryTheKeyAndNoReceiveLimit() {
    RerankServiceGrpc.RerankServiceBlockingStub raw =
        RerankServiceGrpc.newBlockingStub(client.authenticatedChannel())
            .withDeadlineAfter(10, TimeUnit.SECONDS);
    List<ModelInfo> models =
        raw.listModels(ListModelsRequest.getDefaultInstance()).getModelsList();
    assertTrue(models.stream().anyMatch(m -> m.getName().equals(MODEL)), "models: " + models);

    List<String> docs = new ArrayList<>();
    for (int i = 0; i < 5; i++) {
      docs.add("raw " + i + " " + "lorem ipsum dolor sit amet ".repeat(40_000)); // 1 MiB each
    }
    RerankClient.Options opts = RerankClient.Options.defaults().model(MODEL).returnDocuments(true);
    ManagedChannel channel = ManagedChannelBuilder.forTarget(target).usePlaintext().build();
    try (RerankClient given = RerankClient.builder("unused").channel(channel)
        .apiKey(System.getenv("RERANK_API_KEY")).build()) {
      RerankResponse resp = RerankServiceGrpc.newBlockingStub(given.authenticatedChannel())
          .withDeadlineAfter(30, TimeUnit.SECONDS)
          .rerank(RerankClient.buildRequest("lorem raw", docs, opts));
      assertEquals(Set.copyOf(docs), textsOf(resp));
    } finally {
      channel.shutdownNow();
    }
  }

  private static Set<String> textsOf(RerankResponse resp) {
    Set<String> texts = new HashSet<>();
    resp.getOutput().getResultsList().forEach(r -> texts.add(r.getDocument().getText()));
    return texts;
  }

  @Test
  void longDocumentIsChunkedAndItsBestChunkLocated() {
    String longDocument = "pear plum grape ".repeat(300) + "red apple";
    RerankResponse resp = client.rerank("red apple", List.of(longDocument, "a car"),
        RerankClient.Options.defaults().model(MODEL)
            .longDocuments(LongDocuments.LONG_DOCUMENTS_CHUNK).maxTokensPerDoc(200));
    RerankResult best = resp.getOutput().getResults(0);
    assertEquals(0, best.getIndex());
    assertTrue(best.getChunks() > 1, "chunks > 1");
    assertFalse(best.getTruncated());
    int[] codePoints = longDocument.codePoints().toArray();
    String chunk = new String(codePoints, best.getBestChunk().getStart(),
        best.getBestChunk().getEnd() - best.getBestChunk().getStart());
    assertTrue(chunk.endsWith("red apple"), "best chunk ends with the answer: " + chunk);
    assertEquals(1, resp.getOutput().getResults(1).getChunks());
  }

  @Test
  void emptyQueryIsInvalidArgumentWithBadRequest() {
    StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
        () -> client.rerank("", DOCS, RerankClient.Options.defaults().model(MODEL)));
    assertEquals(Status.Code.INVALID_ARGUMENT, e.getStatus().getCode());
    List<BadRequest.FieldViolation> violations = RerankClient.fieldViolations(e);
    assertTrue(violations.stream().anyMatch(v -> v.getField().equals("query")),
        "expected a field violation on \"query\", got " + violations);
  }

  @Test
  void missingApiKeyIsUnauthenticated() {
    try (RerankClient anonymous = RerankClient.builder(target).plaintext(true)
        .deadline(Duration.ofSeconds(10)).build()) {
      StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
          () -> anonymous.rerank("red apple", DOCS, RerankClient.Options.defaults().model(MODEL)));
      assertEquals(Status.Code.UNAUTHENTICATED, e.getStatus().getCode());
    }
  }

  @Test
  void apiKeyIsSentWithoutItsSurroundingWhitespace() {
    // A key read from a file as written (Files.readString) ends in a newline.
    try (RerankClient fromFile = RerankClient.builder(target)
        .apiKey(" " + System.getenv("RERANK_API_KEY") + "\n").plaintext(true)
        .deadline(Duration.ofSeconds(10)).build()) {
      RerankResponse resp =
          fromFile.rerank("red apple", DOCS, RerankClient.Options.defaults().model(MODEL));
      assertEquals(DOCS.size(), resp.getOutput().getResultsCount());
    }
  }

  @Test
  void apiKeyThatIsNotPrintableAsciiIsRefusedWithoutQuotingIt() {
    for (String key : List.of("sk-mid\nline-secret", "sk-ключ-secret", "sk-nul\u0000-secret",
        "sk-space secret")) {
      IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
          () -> RerankClient.builder(target).apiKey(key), "apiKey " + key.replace("\n", "\\n").replace("\u0000", "\\0"));
      assertTrue(e.getMessage().contains("printable ASCII"), e.getMessage());
      assertFalse(e.getMessage().contains("secret"), "the message quotes the key: " + e.getMessage());
    }
  }

  @Test
  void shortDeadlineIsDeadlineExceeded() {
    StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
        () -> client.rerank("[[delay=2]] red apple", DOCS,
            RerankClient.Options.defaults().model(MODEL).deadline(Duration.ofMillis(300))));
    assertEquals(Status.Code.DEADLINE_EXCEEDED, e.getStatus().getCode());
  }

  @Test
  void rerankStreamAnswersEachItemById() {
    RerankClient.Options opts = RerankClient.Options.defaults().model(MODEL);
    List<RerankStreamRequest> items = List.of(
        RerankStreamRequest.newBuilder().setId("a")
            .setRequest(RerankClient.buildRequest("red apple", DOCS, opts)).build(),
        RerankStreamRequest.newBuilder().setId("b")
            .setRequest(RerankClient.buildRequest("", DOCS, opts)).build(),
        RerankStreamRequest.newBuilder().setId("c")
            .setRequest(RerankClient.buildRequest("car", DOCS, opts)).build());
    List<RerankStreamResponse> responses = client.rerankStream(items);
    assertEquals(3, responses.size(), "responses: " + responses);
    Map<String, RerankStreamResponse> byId = new HashMap<>();
    for (RerankStreamResponse r : responses) {
      assertTrue(byId.put(r.getId(), r) == null, "duplicate id " + r.getId());
    }
    assertEquals(java.util.Set.of("a", "b", "c"), byId.keySet());

    RerankStreamResponse b = byId.get("b");
    assertEquals(RerankStreamResponse.ResultCase.ERROR, b.getResultCase(), "b: " + b);
    RerankError err = b.getError();
    assertEquals(3, err.getCode());
    assertFalse(err.getFieldViolationsList().isEmpty(), "b has no field violations: " + err);
    assertEquals("query", err.getFieldViolations(0).getField());

    for (String id : List.of("a", "c")) {
      RerankStreamResponse r = byId.get(id);
      assertEquals(RerankStreamResponse.ResultCase.RESPONSE, r.getResultCase(), id + ": " + r);
      assertEquals(3, r.getResponse().getOutput().getResultsCount(), id + ": " + r);
    }
  }

  @Test
  void listModelsIncludesQwen3Rerank() {
    List<ModelInfo> models = client.listModels().getModelsList();
    assertNotNull(models);
    assertTrue(models.stream().anyMatch(m -> m.getName().equals(MODEL)),
        "models: " + models);
  }
}
