package io.rerankservice.client;

import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ForwardingClientCall;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.StreamObserver;
import io.rerankservice.rerank.v1.ListModelsRequest;
import io.rerankservice.rerank.v1.ListModelsResponse;
import io.rerankservice.rerank.v1.LongDocuments;
import io.rerankservice.rerank.v1.RerankRequest;
import io.rerankservice.rerank.v1.RerankResponse;
import io.rerankservice.rerank.v1.RerankServiceGrpc;
import io.rerankservice.rerank.v1.RerankStreamRequest;
import io.rerankservice.rerank.v1.RerankStreamResponse;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Objects;
import java.util.concurrent.TimeUnit;

/**
 * A small client for rerank.v1.RerankService.
 *
 * <pre>{@code
 * try (RerankClient client = RerankClient.builder("localhost:50051")
 *     .apiKey(System.getenv("RERANK_API_KEY")).plaintext(true).build()) {
 *   RerankResponse r = client.rerank("red apple", List.of("a red apple", "a car"),
 *       RerankClient.Options.defaults().topN(1));
 * }
 * }</pre>
 *
 * <p>Errors surface as {@link StatusRuntimeException}; for INVALID_ARGUMENT use
 * {@link #fieldViolations(StatusRuntimeException)} to read the google.rpc.BadRequest.
 */
public final class RerankClient implements AutoCloseable {

  /** The model used when {@link Options#model(String)} is not set. */
  public static final String DEFAULT_MODEL = "qwen3-rerank";

  static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

  private final ManagedChannel channel;
  private final Channel authenticated;
  private final boolean ownsChannel;
  private final Duration deadline;
  private final RerankServiceGrpc.RerankServiceBlockingStub blocking;
  private final RerankServiceGrpc.RerankServiceStub async;

  private RerankClient(Builder b) {
    if (b.channel != null) {
      this.channel = b.channel;
      this.ownsChannel = false;
    } else {
      ManagedChannelBuilder<?> cb =
          ManagedChannelBuilder.forTarget(b.target).maxInboundMessageSize(Integer.MAX_VALUE);
      if (b.plaintext) {
        cb.usePlaintext();
      } else {
        cb.useTransportSecurity();
      }
      this.channel = cb.build();
      this.ownsChannel = true;
    }
    this.deadline = b.deadline;
    // Stubs on authenticatedChannel() get the key and no receive limit, as this client's own do.
    Channel ch = io.grpc.ClientInterceptors.intercept(channel, new UnlimitedReceiveInterceptor());
    if (b.apiKey != null && !b.apiKey.isEmpty()) {
      ch = io.grpc.ClientInterceptors.intercept(ch, new BearerInterceptor(b.apiKey));
    }
    this.authenticated = ch;
    // No receive limit of the client's own, on a given channel too: the server bounds
    // answers (--max-message-bytes, 16 MiB by default), and grpc-java's 4 MiB default would
    // fail an answer the server had already ranked and billed (returnDocuments).
    this.blocking =
        RerankServiceGrpc.newBlockingStub(ch).withMaxInboundMessageSize(Integer.MAX_VALUE);
    this.async = RerankServiceGrpc.newStub(ch).withMaxInboundMessageSize(Integer.MAX_VALUE);
  }

  /** Starts a builder for the given target ("host:port" or any gRPC target URI). */
  public static Builder builder(String target) {
    return new Builder().target(target);
  }

  /** Ranks {@code documents} against {@code query}; returns the response as the service sends it. */
  public RerankResponse rerank(String query, List<String> documents, Options options) {
    return rerank(buildRequest(query, documents, options), options);
  }

  /** Sends a prepared request, honouring {@code options.deadline} if set. */
  public RerankResponse rerank(RerankRequest request, Options options) {
    Duration d = options != null && options.deadline != null ? options.deadline : deadline;
    RerankServiceGrpc.RerankServiceBlockingStub stub = blocking;
    if (d != null) {
      stub = stub.withDeadlineAfter(d.toNanos(), TimeUnit.NANOSECONDS);
    }
    return stub.rerank(request);
  }

  /**
   * Opens a RerankStream without a deadline (streams are long: the client's default
   * deadline is for unary calls). Send {@link RerankStreamRequest}s on the returned
   * observer, then call {@code onCompleted()}; responses arrive out of order on
   * {@code responses}, to be matched by id.
   */
  public StreamObserver<RerankStreamRequest> rerankStream(
      StreamObserver<RerankStreamResponse> responses) {
    return rerankStream(responses, null);
  }

  /** As {@link #rerankStream(StreamObserver)}, bounded by {@code deadline} (null: none). */
  public StreamObserver<RerankStreamRequest> rerankStream(
      StreamObserver<RerankStreamResponse> responses, Duration deadline) {
    RerankServiceGrpc.RerankServiceStub stub = async;
    if (deadline != null) {
      stub = stub.withDeadlineAfter(deadline.toNanos(), TimeUnit.NANOSECONDS);
    }
    return stub.rerankStream(responses);
  }

  /**
   * Sends all {@code items} over one RerankStream (no deadline), half-closes, and blocks
   * until the server closes the stream; returns the responses in arrival order.
   *
   * @throws RerankStreamException if the stream itself fails (a deadline, a connection
   *     closed, an interrupt, which cancels the stream): its {@code getAnswers()} are the
   *     items answered before that, so only the others need resending
   */
  public List<RerankStreamResponse> rerankStream(List<RerankStreamRequest> items) {
    return rerankStream(items, null);
  }

  /** As {@link #rerankStream(List)}, the whole stream bounded by {@code deadline} (null: none). */
  public List<RerankStreamResponse> rerankStream(
      List<RerankStreamRequest> items, Duration deadline) {
    List<RerankStreamResponse> out = Collections.synchronizedList(new ArrayList<>());
    java.util.concurrent.CompletableFuture<Void> done = new java.util.concurrent.CompletableFuture<>();
    StreamObserver<RerankStreamRequest> requests =
        rerankStream(
            new StreamObserver<>() {
              @Override
              public void onNext(RerankStreamResponse value) {
                out.add(value);
              }

              @Override
              public void onError(Throwable t) {
                done.completeExceptionally(t);
              }

              @Override
              public void onCompleted() {
                done.complete(null);
              }
            },
            deadline);
    try {
      for (RerankStreamRequest item : items) {
        requests.onNext(item);
      }
      requests.onCompleted();
    } catch (RuntimeException e) {
      requests.onError(e);
      throw e;
    }
    try {
      done.get();
    } catch (InterruptedException e) {
      Status cancelled = Status.CANCELLED.withDescription("interrupted").withCause(e);
      // Cancel the call (the server stops running the items left), then wait for its end,
      // which is prompt (the cancel is local) and uninterruptible (join): every answer
      // delivered before it is then in `out`.
      requests.onError(cancelled.asRuntimeException());
      done.handle((ignored, t) -> null).join();
      Thread.currentThread().interrupt();
      throw new RerankStreamException(cancelled, null, snapshot(out));
    } catch (java.util.concurrent.ExecutionException e) {
      // onError was the call's last event: `out` holds every answer received before it.
      Throwable c = e.getCause();
      throw new RerankStreamException(
          Status.fromThrowable(c), Status.trailersFromThrowable(c), snapshot(out));
    }
    return snapshot(out);
  }

  private static List<RerankStreamResponse> snapshot(List<RerankStreamResponse> answers) {
    synchronized (answers) {
      return new ArrayList<>(answers);
    }
  }

  /** Lists the models this deployment serves. */
  public ListModelsResponse listModels() {
    RerankServiceGrpc.RerankServiceBlockingStub stub = blocking;
    if (deadline != null) {
      stub = stub.withDeadlineAfter(deadline.toNanos(), TimeUnit.NANOSECONDS);
    }
    return stub.listModels(ListModelsRequest.getDefaultInstance());
  }

  /** Builds a RerankRequest from the convenience arguments (useful for stream items). */
  public static RerankRequest buildRequest(String query, List<String> documents, Options options) {
    Options o = options != null ? options : Options.defaults();
    RerankRequest.Builder r =
        RerankRequest.newBuilder()
            .setModel(o.model)
            .setQuery(Objects.requireNonNull(query, "query"))
            .addAllDocuments(Objects.requireNonNull(documents, "documents"))
            .setReturnDocuments(o.returnDocuments);
    if (o.topN != null) {
      r.setTopN(o.topN);
    }
    if (o.instruct != null) {
      r.setInstruct(o.instruct);
    }
    if (o.longDocuments != null) {
      r.setLongDocuments(o.longDocuments);
    }
    if (o.maxTokensPerDoc != null) {
      r.setMaxTokensPerDoc(o.maxTokensPerDoc);
    }
    if (o.chunkOverlapTokens != null) {
      r.setChunkOverlapTokens(o.chunkOverlapTokens);
    }
    return r.build();
  }

  /**
   * The google.rpc.BadRequest field violations carried by an INVALID_ARGUMENT status
   * (empty when the status has none).
   */
  public static List<BadRequest.FieldViolation> fieldViolations(StatusRuntimeException e) {
    com.google.rpc.Status status = StatusProto.fromThrowable(e);
    if (status == null) {
      return List.of();
    }
    List<BadRequest.FieldViolation> out = new ArrayList<>();
    for (com.google.protobuf.Any detail : status.getDetailsList()) {
      if (detail.is(BadRequest.class)) {
        try {
          out.addAll(detail.unpack(BadRequest.class).getFieldViolationsList());
        } catch (InvalidProtocolBufferException ignored) {
          // A malformed detail carries no usable violations.
        }
      }
    }
    return out;
  }

  /**
   * The underlying channel, as built or given to {@link Builder#channel(ManagedChannel)}: for
   * its state and lifecycle. A stub built on it sends no API key (the server answers
   * UNAUTHENTICATED) and has grpc-java's 4 MiB receive limit; build generated stubs on
   * {@link #authenticatedChannel()} instead.
   */
  public ManagedChannel channel() {
    return channel;
  }

  /**
   * The channel this client's own calls go through, for callers who need the generated stubs
   * directly ({@code RerankServiceGrpc.newBlockingStub(client.authenticatedChannel())}): it
   * sends the builder's API key, if any, as {@code authorization: Bearer <key>} on every call,
   * and sets no receive limit of its own (the server bounds answers). It is closed with the
   * client (when the client owns the underlying channel).
   */
  public Channel authenticatedChannel() {
    return authenticated;
  }

  @Override
  public void close() {
    if (!ownsChannel) {
      return;
    }
    channel.shutdown();
    try {
      if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
        channel.shutdownNow();
      }
    } catch (InterruptedException e) {
      channel.shutdownNow();
      Thread.currentThread().interrupt();
    }
  }

  /** Per-call options of {@link #rerank(String, List, Options)}; mutable, chainable. */
  public static final class Options {
    private String model = DEFAULT_MODEL;
    private Integer topN;
    private String instruct;
    private boolean returnDocuments;
    private LongDocuments longDocuments;
    private Integer maxTokensPerDoc;
    private Integer chunkOverlapTokens;
    private Duration deadline;

    public static Options defaults() {
      return new Options();
    }

    public Options model(String model) {
      this.model = Objects.requireNonNull(model, "model");
      return this;
    }

    public Options topN(int topN) {
      this.topN = topN;
      return this;
    }

    public Options instruct(String instruct) {
      this.instruct = instruct;
      return this;
    }

    public Options returnDocuments(boolean returnDocuments) {
      this.returnDocuments = returnDocuments;
      return this;
    }

    /**
     * A document longer than the model's window: TRUNCATE, CHUNK (ranked by its best chunk,
     * which the result's best_chunk locates) or REJECT. Unset: the route's default.
     */
    public Options longDocuments(LongDocuments longDocuments) {
      this.longDocuments = longDocuments;
      return this;
    }

    /** The window a document is cut or chunked to, in tokens. */
    public Options maxTokensPerDoc(int maxTokensPerDoc) {
      this.maxTokensPerDoc = maxTokensPerDoc;
      return this;
    }

    /** Tokens neighbouring chunks share. */
    public Options chunkOverlapTokens(int chunkOverlapTokens) {
      this.chunkOverlapTokens = chunkOverlapTokens;
      return this;
    }

    /** Overrides the client's default deadline for this call. */
    public Options deadline(Duration deadline) {
      this.deadline = deadline;
      return this;
    }
  }

  /** Builds a {@link RerankClient}. */
  public static final class Builder {
    private String target;
    private String apiKey;
    private boolean plaintext;
    private Duration deadline = Duration.ofSeconds(30);
    private ManagedChannel channel;

    private Builder() {}

    public Builder target(String target) {
      this.target = target;
      return this;
    }

    /**
     * Sent on every call as {@code authorization: Bearer <apiKey>}; null or empty sends none.
     * Surrounding whitespace (the newline of a key read from a file) is dropped.
     *
     * @throws IllegalArgumentException if the key holds any other character than printable
     *     ASCII (the message does not quote it)
     */
    public Builder apiKey(String apiKey) {
      this.apiKey = checkedApiKey(apiKey);
      return this;
    }

    /**
     * The key without surrounding whitespace. grpc-java would drop a header holding any
     * other character (the call then fails UNAUTHENTICATED), logging the whole key.
     */
    private static String checkedApiKey(String apiKey) {
      if (apiKey == null) {
        return null;
      }
      String key = apiKey.strip();
      for (int i = 0; i < key.length(); i++) {
        char c = key.charAt(i);
        if (c < 0x21 || c > 0x7e) {
          throw new IllegalArgumentException(
              "api key must be printable ASCII (letters, digits, punctuation; "
                  + "no spaces or control characters)");
        }
      }
      return key;
    }

    /** Plaintext (no TLS); default false, i.e. TLS. */
    public Builder plaintext(boolean plaintext) {
      this.plaintext = plaintext;
      return this;
    }

    /**
     * Default deadline for each unary call (rerank, listModels); null for none. Default 30 s.
     * Streams have none unless given one ({@code rerankStream(..., deadline)}).
     */
    public Builder deadline(Duration deadline) {
      this.deadline = deadline;
      return this;
    }

    /** Uses an existing channel (not closed by {@link RerankClient#close()}) instead of target. */
    public Builder channel(ManagedChannel channel) {
      this.channel = channel;
      return this;
    }

    public RerankClient build() {
      if (channel == null && (target == null || target.isEmpty())) {
        throw new IllegalArgumentException("target is required");
      }
      return new RerankClient(this);
    }
  }

  /** Lifts grpc-java's 4 MiB receive limit from every call that sets none of its own. */
  static final class UnlimitedReceiveInterceptor implements ClientInterceptor {
    @Override
    public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
        MethodDescriptor<ReqT, RespT> method, CallOptions callOptions, Channel next) {
      if (callOptions.getMaxInboundMessageSize() == null) {
        callOptions = callOptions.withMaxInboundMessageSize(Integer.MAX_VALUE);
      }
      return next.newCall(method, callOptions);
    }
  }

  /** Adds {@code authorization: Bearer <key>} to every call. */
  static final class BearerInterceptor implements ClientInterceptor {
    private final String value;

    BearerInterceptor(String apiKey) {
      this.value = "Bearer " + apiKey;
    }

    @Override
    public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
        MethodDescriptor<ReqT, RespT> method, CallOptions callOptions, Channel next) {
      return new ForwardingClientCall.SimpleForwardingClientCall<>(
          next.newCall(method, callOptions)) {
        @Override
        public void start(Listener<RespT> listener, Metadata headers) {
          headers.put(AUTHORIZATION, value);
          super.start(listener, headers);
        }
      };
    }
  }
}
