package io.rerankservice.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.grpc.Context;
import io.grpc.Deadline;
import io.grpc.Grpc;
import io.grpc.InsecureServerCredentials;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.ServerCallStreamObserver;
import io.grpc.stub.StreamObserver;
import io.rerankservice.rerank.v1.RerankResponse;
import io.rerankservice.rerank.v1.RerankServiceGrpc;
import io.rerankservice.rerank.v1.RerankStreamRequest;
import io.rerankservice.rerank.v1.RerankStreamResponse;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/**
 * {@link RerankClient#rerankStream(List)} against a scripted in-test server (no live
 * rerank-service needed): how the stream ends is what is under test.
 */
class RerankStreamListTest {
  private static final List<RerankStreamRequest> ITEMS = List.of(item("a"), item("b"));

  /** What the server does once the client has sent every item and half-closed. */
  private enum Ending { ANSWER_ALL, ANSWER_A_THEN_UNAVAILABLE, HOLD_OPEN }

  private Server server;
  private RerankClient client;
  private final AtomicReference<Deadline> deadlineSeen = new AtomicReference<>();
  private final CountDownLatch halfClosed = new CountDownLatch(1);
  private final CountDownLatch cancelled = new CountDownLatch(1);

  private static RerankStreamRequest item(String id) {
    return RerankStreamRequest.newBuilder()
        .setId(id)
        .setRequest(RerankClient.buildRequest("q", List.of("d"), RerankClient.Options.defaults()))
        .build();
  }

  private static RerankStreamResponse answer(String id) {
    return RerankStreamResponse.newBuilder()
        .setId(id)
        .setResponse(RerankResponse.newBuilder().setRequestId("r-" + id))
        .build();
  }

  private void start(Ending ending) throws Exception {
    server =
        Grpc.newServerBuilderForPort(0, InsecureServerCredentials.create())
            .addService(
                new RerankServiceGrpc.RerankServiceImplBase() {
                  @Override
                  public StreamObserver<RerankStreamRequest> rerankStream(
                      StreamObserver<RerankStreamResponse> responses) {
                    deadlineSeen.set(Context.current().getDeadline());
                    ((ServerCallStreamObserver<RerankStreamResponse>) responses)
                        .setOnCancelHandler(cancelled::countDown);
                    return new StreamObserver<>() {
                      @Override
                      public void onNext(RerankStreamRequest request) {}

                      @Override
                      public void onError(Throwable t) {}

                      @Override
                      public void onCompleted() {
                        switch (ending) {
                          case ANSWER_ALL -> {
                            ITEMS.forEach(i -> responses.onNext(answer(i.getId())));
                            responses.onCompleted();
                          }
                          case ANSWER_A_THEN_UNAVAILABLE -> {
                            // As a connection closed by --max-connection-age after one answer.
                            responses.onNext(answer("a"));
                            responses.onError(
                                Status.UNAVAILABLE.withDescription("max connection age")
                                    .asRuntimeException());
                          }
                          case HOLD_OPEN -> responses.onNext(answer("a"));
                        }
                        halfClosed.countDown();
                      }
                    };
                  }
                })
            .build()
            .start();
    // The client has a default deadline, for unary calls: a stream must not get it.
    client =
        RerankClient.builder("127.0.0.1:" + server.getPort())
            .plaintext(true)
            .deadline(Duration.ofSeconds(30))
            .build();
  }

  @AfterEach
  void stop() {
    if (client != null) {
      client.close();
    }
    if (server != null) {
      server.shutdownNow();
    }
  }

  @Test
  void aFailedStreamKeepsTheAnswersReceivedBeforeIt() throws Exception {
    start(Ending.ANSWER_A_THEN_UNAVAILABLE);
    RerankStreamException e =
        assertThrows(RerankStreamException.class, () -> client.rerankStream(ITEMS));
    assertInstanceOf(StatusRuntimeException.class, e);
    assertEquals(Status.Code.UNAVAILABLE, e.getStatus().getCode());
    assertEquals(List.of("a"), e.getAnswers().stream().map(RerankStreamResponse::getId).toList());
  }

  @Test
  void aStreamGetsNoDefaultDeadlineOnlyOneItIsGiven() throws Exception {
    start(Ending.ANSWER_ALL);
    assertEquals(2, client.rerankStream(ITEMS).size());
    assertNull(deadlineSeen.get(), "the client's unary deadline bounded the stream");

    assertEquals(2, client.rerankStream(ITEMS, Duration.ofMinutes(5)).size());
    assertNotNull(deadlineSeen.get(), "the stream's own deadline was not sent");
  }

  @Test
  void anInterruptCancelsTheStream() throws Exception {
    start(Ending.HOLD_OPEN);
    AtomicReference<Throwable> thrown = new AtomicReference<>();
    AtomicBoolean stillInterrupted = new AtomicBoolean();
    Thread caller =
        new Thread(
            () -> {
              try {
                client.rerankStream(ITEMS);
              } catch (Throwable t) {
                thrown.set(t);
              }
              stillInterrupted.set(Thread.currentThread().isInterrupted());
            });
    caller.start();
    assertTrue(halfClosed.await(30, TimeUnit.SECONDS), "the server never got every item");
    caller.interrupt(); // blocked (or about to block) waiting for the stream's end
    caller.join(30_000);

    RerankStreamException e = assertInstanceOf(RerankStreamException.class, thrown.get());
    assertEquals(Status.Code.CANCELLED, e.getStatus().getCode());
    // Whether the answer to "a" arrived before the interrupt is a race; nothing else can have.
    assertTrue(
        e.getAnswers().stream().allMatch(r -> r.getId().equals("a")), "answers: " + e.getAnswers());
    assertTrue(stillInterrupted.get(), "the thread's interrupt flag was not restored");
    assertTrue(cancelled.await(30, TimeUnit.SECONDS), "the server's call was never cancelled");
  }
}
