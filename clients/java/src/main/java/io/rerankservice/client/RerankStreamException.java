package io.rerankservice.client;

import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.rerankservice.rerank.v1.RerankStreamResponse;
import java.util.List;

/**
 * A RerankStream that ended with an error before answering every item, thrown by
 * {@link RerankClient#rerankStream(List)}. {@link #getAnswers()} holds the answers received
 * before it ended (the server ran, and billed, each of them): resend only the items whose
 * id is not among them.
 */
public final class RerankStreamException extends StatusRuntimeException {
  private static final long serialVersionUID = 1L;

  private final transient List<RerankStreamResponse> answers;

  public RerankStreamException(
      Status status, Metadata trailers, List<RerankStreamResponse> answers) {
    super(status, trailers);
    this.answers = List.copyOf(answers);
  }

  /** The answers received before the stream failed, in arrival order (unmodifiable). */
  public List<RerankStreamResponse> getAnswers() {
    return answers;
  }
}
