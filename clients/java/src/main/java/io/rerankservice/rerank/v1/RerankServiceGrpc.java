package io.rerankservice.rerank.v1;

import static io.grpc.MethodDescriptor.generateFullMethodName;

/**
 * <pre>
 * RerankService ranks candidate documents by their relevance to a query.
 * Errors are gRPC statuses: INVALID_ARGUMENT carries a google.rpc.BadRequest
 * naming each offending field; RESOURCE_EXHAUSTED and UNAVAILABLE may carry a
 * google.rpc.RetryInfo; failures caused by the backend carry a
 * google.rpc.ErrorInfo with a reason. Every response (success or error) carries
 * the request id as `x-request-id` trailing metadata.
 * </pre>
 */
@io.grpc.stub.annotations.GrpcGenerated
public final class RerankServiceGrpc {

  private RerankServiceGrpc() {}

  public static final java.lang.String SERVICE_NAME = "rerank.v1.RerankService";

  // Static method descriptors that strictly reflect the proto.
  private static volatile io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.RerankRequest,
      io.rerankservice.rerank.v1.RerankResponse> getRerankMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "Rerank",
      requestType = io.rerankservice.rerank.v1.RerankRequest.class,
      responseType = io.rerankservice.rerank.v1.RerankResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.RerankRequest,
      io.rerankservice.rerank.v1.RerankResponse> getRerankMethod() {
    io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.RerankRequest, io.rerankservice.rerank.v1.RerankResponse> getRerankMethod;
    if ((getRerankMethod = RerankServiceGrpc.getRerankMethod) == null) {
      synchronized (RerankServiceGrpc.class) {
        if ((getRerankMethod = RerankServiceGrpc.getRerankMethod) == null) {
          RerankServiceGrpc.getRerankMethod = getRerankMethod =
              io.grpc.MethodDescriptor.<io.rerankservice.rerank.v1.RerankRequest, io.rerankservice.rerank.v1.RerankResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "Rerank"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.rerankservice.rerank.v1.RerankRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.rerankservice.rerank.v1.RerankResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RerankServiceMethodDescriptorSupplier("Rerank"))
              .build();
        }
      }
    }
    return getRerankMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.RerankStreamRequest,
      io.rerankservice.rerank.v1.RerankStreamResponse> getRerankStreamMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "RerankStream",
      requestType = io.rerankservice.rerank.v1.RerankStreamRequest.class,
      responseType = io.rerankservice.rerank.v1.RerankStreamResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.BIDI_STREAMING)
  public static io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.RerankStreamRequest,
      io.rerankservice.rerank.v1.RerankStreamResponse> getRerankStreamMethod() {
    io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.RerankStreamRequest, io.rerankservice.rerank.v1.RerankStreamResponse> getRerankStreamMethod;
    if ((getRerankStreamMethod = RerankServiceGrpc.getRerankStreamMethod) == null) {
      synchronized (RerankServiceGrpc.class) {
        if ((getRerankStreamMethod = RerankServiceGrpc.getRerankStreamMethod) == null) {
          RerankServiceGrpc.getRerankStreamMethod = getRerankStreamMethod =
              io.grpc.MethodDescriptor.<io.rerankservice.rerank.v1.RerankStreamRequest, io.rerankservice.rerank.v1.RerankStreamResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.BIDI_STREAMING)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "RerankStream"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.rerankservice.rerank.v1.RerankStreamRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.rerankservice.rerank.v1.RerankStreamResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RerankServiceMethodDescriptorSupplier("RerankStream"))
              .build();
        }
      }
    }
    return getRerankStreamMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.ListModelsRequest,
      io.rerankservice.rerank.v1.ListModelsResponse> getListModelsMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "ListModels",
      requestType = io.rerankservice.rerank.v1.ListModelsRequest.class,
      responseType = io.rerankservice.rerank.v1.ListModelsResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.ListModelsRequest,
      io.rerankservice.rerank.v1.ListModelsResponse> getListModelsMethod() {
    io.grpc.MethodDescriptor<io.rerankservice.rerank.v1.ListModelsRequest, io.rerankservice.rerank.v1.ListModelsResponse> getListModelsMethod;
    if ((getListModelsMethod = RerankServiceGrpc.getListModelsMethod) == null) {
      synchronized (RerankServiceGrpc.class) {
        if ((getListModelsMethod = RerankServiceGrpc.getListModelsMethod) == null) {
          RerankServiceGrpc.getListModelsMethod = getListModelsMethod =
              io.grpc.MethodDescriptor.<io.rerankservice.rerank.v1.ListModelsRequest, io.rerankservice.rerank.v1.ListModelsResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "ListModels"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.rerankservice.rerank.v1.ListModelsRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.rerankservice.rerank.v1.ListModelsResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RerankServiceMethodDescriptorSupplier("ListModels"))
              .build();
        }
      }
    }
    return getListModelsMethod;
  }

  /**
   * Creates a new async stub that supports all call types for the service
   */
  public static RerankServiceStub newStub(io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<RerankServiceStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<RerankServiceStub>() {
        @java.lang.Override
        public RerankServiceStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new RerankServiceStub(channel, callOptions);
        }
      };
    return RerankServiceStub.newStub(factory, channel);
  }

  /**
   * Creates a new blocking-style stub that supports all types of calls on the service
   */
  public static RerankServiceBlockingV2Stub newBlockingV2Stub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<RerankServiceBlockingV2Stub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<RerankServiceBlockingV2Stub>() {
        @java.lang.Override
        public RerankServiceBlockingV2Stub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new RerankServiceBlockingV2Stub(channel, callOptions);
        }
      };
    return RerankServiceBlockingV2Stub.newStub(factory, channel);
  }

  /**
   * Creates a new blocking-style stub that supports unary and streaming output calls on the service
   */
  public static RerankServiceBlockingStub newBlockingStub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<RerankServiceBlockingStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<RerankServiceBlockingStub>() {
        @java.lang.Override
        public RerankServiceBlockingStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new RerankServiceBlockingStub(channel, callOptions);
        }
      };
    return RerankServiceBlockingStub.newStub(factory, channel);
  }

  /**
   * Creates a new ListenableFuture-style stub that supports unary calls on the service
   */
  public static RerankServiceFutureStub newFutureStub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<RerankServiceFutureStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<RerankServiceFutureStub>() {
        @java.lang.Override
        public RerankServiceFutureStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new RerankServiceFutureStub(channel, callOptions);
        }
      };
    return RerankServiceFutureStub.newStub(factory, channel);
  }

  /**
   * <pre>
   * RerankService ranks candidate documents by their relevance to a query.
   * Errors are gRPC statuses: INVALID_ARGUMENT carries a google.rpc.BadRequest
   * naming each offending field; RESOURCE_EXHAUSTED and UNAVAILABLE may carry a
   * google.rpc.RetryInfo; failures caused by the backend carry a
   * google.rpc.ErrorInfo with a reason. Every response (success or error) carries
   * the request id as `x-request-id` trailing metadata.
   * </pre>
   */
  public interface AsyncService {

    /**
     * <pre>
     * Rerank scores every document against the query and returns them ordered by
     * relevance_score, highest first (ties keep input order).
     * </pre>
     */
    default void rerank(io.rerankservice.rerank.v1.RerankRequest request,
        io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.RerankResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getRerankMethod(), responseObserver);
    }

    /**
     * <pre>
     * RerankStream ranks many requests over one stream, for offline jobs. Items are
     * processed concurrently (up to the server's stream window) and answered as
     * they finish, so out of order: match responses to requests by `id`. A failing
     * item is answered with its error and the stream goes on; only stream-level
     * problems end it (authentication, cancellation, the stream's deadline, no item
     * for the server's idle timeout, a message that is not a RerankStreamRequest),
     * and the items in flight then are not answered. When the client half-closes,
     * the items in flight are finished and sent, then the server closes the stream.
     * </pre>
     */
    default io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.RerankStreamRequest> rerankStream(
        io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.RerankStreamResponse> responseObserver) {
      return io.grpc.stub.ServerCalls.asyncUnimplementedStreamingCall(getRerankStreamMethod(), responseObserver);
    }

    /**
     * <pre>
     * ListModels lists the model names this deployment serves, with their limits,
     * so a client can discover what to send.
     * </pre>
     */
    default void listModels(io.rerankservice.rerank.v1.ListModelsRequest request,
        io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.ListModelsResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getListModelsMethod(), responseObserver);
    }
  }

  /**
   * Base class for the server implementation of the service RerankService.
   * <pre>
   * RerankService ranks candidate documents by their relevance to a query.
   * Errors are gRPC statuses: INVALID_ARGUMENT carries a google.rpc.BadRequest
   * naming each offending field; RESOURCE_EXHAUSTED and UNAVAILABLE may carry a
   * google.rpc.RetryInfo; failures caused by the backend carry a
   * google.rpc.ErrorInfo with a reason. Every response (success or error) carries
   * the request id as `x-request-id` trailing metadata.
   * </pre>
   */
  public static abstract class RerankServiceImplBase
      implements io.grpc.BindableService, AsyncService {

    @java.lang.Override public final io.grpc.ServerServiceDefinition bindService() {
      return RerankServiceGrpc.bindService(this);
    }
  }

  /**
   * A stub to allow clients to do asynchronous rpc calls to service RerankService.
   * <pre>
   * RerankService ranks candidate documents by their relevance to a query.
   * Errors are gRPC statuses: INVALID_ARGUMENT carries a google.rpc.BadRequest
   * naming each offending field; RESOURCE_EXHAUSTED and UNAVAILABLE may carry a
   * google.rpc.RetryInfo; failures caused by the backend carry a
   * google.rpc.ErrorInfo with a reason. Every response (success or error) carries
   * the request id as `x-request-id` trailing metadata.
   * </pre>
   */
  public static final class RerankServiceStub
      extends io.grpc.stub.AbstractAsyncStub<RerankServiceStub> {
    private RerankServiceStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected RerankServiceStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new RerankServiceStub(channel, callOptions);
    }

    /**
     * <pre>
     * Rerank scores every document against the query and returns them ordered by
     * relevance_score, highest first (ties keep input order).
     * </pre>
     */
    public void rerank(io.rerankservice.rerank.v1.RerankRequest request,
        io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.RerankResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getRerankMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * RerankStream ranks many requests over one stream, for offline jobs. Items are
     * processed concurrently (up to the server's stream window) and answered as
     * they finish, so out of order: match responses to requests by `id`. A failing
     * item is answered with its error and the stream goes on; only stream-level
     * problems end it (authentication, cancellation, the stream's deadline, no item
     * for the server's idle timeout, a message that is not a RerankStreamRequest),
     * and the items in flight then are not answered. When the client half-closes,
     * the items in flight are finished and sent, then the server closes the stream.
     * </pre>
     */
    public io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.RerankStreamRequest> rerankStream(
        io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.RerankStreamResponse> responseObserver) {
      return io.grpc.stub.ClientCalls.asyncBidiStreamingCall(
          getChannel().newCall(getRerankStreamMethod(), getCallOptions()), responseObserver);
    }

    /**
     * <pre>
     * ListModels lists the model names this deployment serves, with their limits,
     * so a client can discover what to send.
     * </pre>
     */
    public void listModels(io.rerankservice.rerank.v1.ListModelsRequest request,
        io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.ListModelsResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getListModelsMethod(), getCallOptions()), request, responseObserver);
    }
  }

  /**
   * A stub to allow clients to do synchronous rpc calls to service RerankService.
   * <pre>
   * RerankService ranks candidate documents by their relevance to a query.
   * Errors are gRPC statuses: INVALID_ARGUMENT carries a google.rpc.BadRequest
   * naming each offending field; RESOURCE_EXHAUSTED and UNAVAILABLE may carry a
   * google.rpc.RetryInfo; failures caused by the backend carry a
   * google.rpc.ErrorInfo with a reason. Every response (success or error) carries
   * the request id as `x-request-id` trailing metadata.
   * </pre>
   */
  public static final class RerankServiceBlockingV2Stub
      extends io.grpc.stub.AbstractBlockingStub<RerankServiceBlockingV2Stub> {
    private RerankServiceBlockingV2Stub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected RerankServiceBlockingV2Stub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new RerankServiceBlockingV2Stub(channel, callOptions);
    }

    /**
     * <pre>
     * Rerank scores every document against the query and returns them ordered by
     * relevance_score, highest first (ties keep input order).
     * </pre>
     */
    public io.rerankservice.rerank.v1.RerankResponse rerank(io.rerankservice.rerank.v1.RerankRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getRerankMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * RerankStream ranks many requests over one stream, for offline jobs. Items are
     * processed concurrently (up to the server's stream window) and answered as
     * they finish, so out of order: match responses to requests by `id`. A failing
     * item is answered with its error and the stream goes on; only stream-level
     * problems end it (authentication, cancellation, the stream's deadline, no item
     * for the server's idle timeout, a message that is not a RerankStreamRequest),
     * and the items in flight then are not answered. When the client half-closes,
     * the items in flight are finished and sent, then the server closes the stream.
     * </pre>
     */
    @io.grpc.ExperimentalApi("https://github.com/grpc/grpc-java/issues/10918")
    public io.grpc.stub.BlockingClientCall<io.rerankservice.rerank.v1.RerankStreamRequest, io.rerankservice.rerank.v1.RerankStreamResponse>
        rerankStream() {
      return io.grpc.stub.ClientCalls.blockingBidiStreamingCall(
          getChannel(), getRerankStreamMethod(), getCallOptions());
    }

    /**
     * <pre>
     * ListModels lists the model names this deployment serves, with their limits,
     * so a client can discover what to send.
     * </pre>
     */
    public io.rerankservice.rerank.v1.ListModelsResponse listModels(io.rerankservice.rerank.v1.ListModelsRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getListModelsMethod(), getCallOptions(), request);
    }
  }

  /**
   * A stub to allow clients to do limited synchronous rpc calls to service RerankService.
   * <pre>
   * RerankService ranks candidate documents by their relevance to a query.
   * Errors are gRPC statuses: INVALID_ARGUMENT carries a google.rpc.BadRequest
   * naming each offending field; RESOURCE_EXHAUSTED and UNAVAILABLE may carry a
   * google.rpc.RetryInfo; failures caused by the backend carry a
   * google.rpc.ErrorInfo with a reason. Every response (success or error) carries
   * the request id as `x-request-id` trailing metadata.
   * </pre>
   */
  public static final class RerankServiceBlockingStub
      extends io.grpc.stub.AbstractBlockingStub<RerankServiceBlockingStub> {
    private RerankServiceBlockingStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected RerankServiceBlockingStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new RerankServiceBlockingStub(channel, callOptions);
    }

    /**
     * <pre>
     * Rerank scores every document against the query and returns them ordered by
     * relevance_score, highest first (ties keep input order).
     * </pre>
     */
    public io.rerankservice.rerank.v1.RerankResponse rerank(io.rerankservice.rerank.v1.RerankRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getRerankMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * ListModels lists the model names this deployment serves, with their limits,
     * so a client can discover what to send.
     * </pre>
     */
    public io.rerankservice.rerank.v1.ListModelsResponse listModels(io.rerankservice.rerank.v1.ListModelsRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getListModelsMethod(), getCallOptions(), request);
    }
  }

  /**
   * A stub to allow clients to do ListenableFuture-style rpc calls to service RerankService.
   * <pre>
   * RerankService ranks candidate documents by their relevance to a query.
   * Errors are gRPC statuses: INVALID_ARGUMENT carries a google.rpc.BadRequest
   * naming each offending field; RESOURCE_EXHAUSTED and UNAVAILABLE may carry a
   * google.rpc.RetryInfo; failures caused by the backend carry a
   * google.rpc.ErrorInfo with a reason. Every response (success or error) carries
   * the request id as `x-request-id` trailing metadata.
   * </pre>
   */
  public static final class RerankServiceFutureStub
      extends io.grpc.stub.AbstractFutureStub<RerankServiceFutureStub> {
    private RerankServiceFutureStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected RerankServiceFutureStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new RerankServiceFutureStub(channel, callOptions);
    }

    /**
     * <pre>
     * Rerank scores every document against the query and returns them ordered by
     * relevance_score, highest first (ties keep input order).
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.rerankservice.rerank.v1.RerankResponse> rerank(
        io.rerankservice.rerank.v1.RerankRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getRerankMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * ListModels lists the model names this deployment serves, with their limits,
     * so a client can discover what to send.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.rerankservice.rerank.v1.ListModelsResponse> listModels(
        io.rerankservice.rerank.v1.ListModelsRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getListModelsMethod(), getCallOptions()), request);
    }
  }

  private static final int METHODID_RERANK = 0;
  private static final int METHODID_LIST_MODELS = 1;
  private static final int METHODID_RERANK_STREAM = 2;

  private static final class MethodHandlers<Req, Resp> implements
      io.grpc.stub.ServerCalls.UnaryMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.ServerStreamingMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.ClientStreamingMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.BidiStreamingMethod<Req, Resp> {
    private final AsyncService serviceImpl;
    private final int methodId;

    MethodHandlers(AsyncService serviceImpl, int methodId) {
      this.serviceImpl = serviceImpl;
      this.methodId = methodId;
    }

    @java.lang.Override
    @java.lang.SuppressWarnings("unchecked")
    public void invoke(Req request, io.grpc.stub.StreamObserver<Resp> responseObserver) {
      switch (methodId) {
        case METHODID_RERANK:
          serviceImpl.rerank((io.rerankservice.rerank.v1.RerankRequest) request,
              (io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.RerankResponse>) responseObserver);
          break;
        case METHODID_LIST_MODELS:
          serviceImpl.listModels((io.rerankservice.rerank.v1.ListModelsRequest) request,
              (io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.ListModelsResponse>) responseObserver);
          break;
        default:
          throw new AssertionError();
      }
    }

    @java.lang.Override
    @java.lang.SuppressWarnings("unchecked")
    public io.grpc.stub.StreamObserver<Req> invoke(
        io.grpc.stub.StreamObserver<Resp> responseObserver) {
      switch (methodId) {
        case METHODID_RERANK_STREAM:
          return (io.grpc.stub.StreamObserver<Req>) serviceImpl.rerankStream(
              (io.grpc.stub.StreamObserver<io.rerankservice.rerank.v1.RerankStreamResponse>) responseObserver);
        default:
          throw new AssertionError();
      }
    }
  }

  public static final io.grpc.ServerServiceDefinition bindService(AsyncService service) {
    return io.grpc.ServerServiceDefinition.builder(getServiceDescriptor())
        .addMethod(
          getRerankMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.rerankservice.rerank.v1.RerankRequest,
              io.rerankservice.rerank.v1.RerankResponse>(
                service, METHODID_RERANK)))
        .addMethod(
          getRerankStreamMethod(),
          io.grpc.stub.ServerCalls.asyncBidiStreamingCall(
            new MethodHandlers<
              io.rerankservice.rerank.v1.RerankStreamRequest,
              io.rerankservice.rerank.v1.RerankStreamResponse>(
                service, METHODID_RERANK_STREAM)))
        .addMethod(
          getListModelsMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.rerankservice.rerank.v1.ListModelsRequest,
              io.rerankservice.rerank.v1.ListModelsResponse>(
                service, METHODID_LIST_MODELS)))
        .build();
  }

  private static abstract class RerankServiceBaseDescriptorSupplier
      implements io.grpc.protobuf.ProtoFileDescriptorSupplier, io.grpc.protobuf.ProtoServiceDescriptorSupplier {
    RerankServiceBaseDescriptorSupplier() {}

    @java.lang.Override
    public com.google.protobuf.Descriptors.FileDescriptor getFileDescriptor() {
      return io.rerankservice.rerank.v1.RerankProto.getDescriptor();
    }

    @java.lang.Override
    public com.google.protobuf.Descriptors.ServiceDescriptor getServiceDescriptor() {
      return getFileDescriptor().findServiceByName("RerankService");
    }
  }

  private static final class RerankServiceFileDescriptorSupplier
      extends RerankServiceBaseDescriptorSupplier {
    RerankServiceFileDescriptorSupplier() {}
  }

  private static final class RerankServiceMethodDescriptorSupplier
      extends RerankServiceBaseDescriptorSupplier
      implements io.grpc.protobuf.ProtoMethodDescriptorSupplier {
    private final java.lang.String methodName;

    RerankServiceMethodDescriptorSupplier(java.lang.String methodName) {
      this.methodName = methodName;
    }

    @java.lang.Override
    public com.google.protobuf.Descriptors.MethodDescriptor getMethodDescriptor() {
      return getServiceDescriptor().findMethodByName(methodName);
    }
  }

  private static volatile io.grpc.ServiceDescriptor serviceDescriptor;

  public static io.grpc.ServiceDescriptor getServiceDescriptor() {
    io.grpc.ServiceDescriptor result = serviceDescriptor;
    if (result == null) {
      synchronized (RerankServiceGrpc.class) {
        result = serviceDescriptor;
        if (result == null) {
          serviceDescriptor = result = io.grpc.ServiceDescriptor.newBuilder(SERVICE_NAME)
              .setSchemaDescriptor(new RerankServiceFileDescriptorSupplier())
              .addMethod(getRerankMethod())
              .addMethod(getRerankStreamMethod())
              .addMethod(getListModelsMethod())
              .build();
        }
      }
    }
    return result;
  }
}
