// @rerank-service/client: the TypeScript / Node.js client of rerank-service.
export {
  createRerankClient,
  fieldViolations,
  requestIdOf,
  reasonOf,
  retryDelayOf,
  codeOf,
  rerankRequest,
  DEFAULT_MODEL,
  REQUEST_ID_KEY,
} from "./client.js";
export type {
  RerankClient,
  RerankClientOptions,
  RerankOptions,
  CallControl,
  RerankStreamItem,
  FieldViolation,
} from "./client.js";

// The generated messages and service, for typed results and the raw client.
export * from "./gen/rerank/v1/rerank_pb.js";
export {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
export type {
  BadRequest,
  BadRequest_FieldViolation,
  ErrorInfo,
  RetryInfo,
} from "./gen/google/rpc/error_details_pb.js";

// Connect's error type and status codes, so callers need no direct dependency.
export { Code, ConnectError } from "@connectrpc/connect";
