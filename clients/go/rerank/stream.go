package rerank

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	rerankv1 "github.com/rerank-service/rerank-service/clients/go/rerank/v1"
)

// Stream is an open RerankStream: Send items, CloseSend, then Recv until io.EOF.
// Responses arrive out of order; match them to requests by ID. Send and Recv may
// be called from different goroutines (one sender, one receiver).
type Stream struct {
	c      *Client
	stream rerankv1.RerankService_RerankStreamClient
}

// StreamResult answers one stream item: exactly one of Response and Err is set.
type StreamResult struct {
	ID       string
	Response *Response
	Err      *ItemError
}

// RerankStream opens a bidirectional stream for many requests. Cancelling ctx
// ends the stream. To pass gRPC call options, use RerankStreamWith.
func (c *Client) RerankStream(ctx context.Context) (*Stream, error) {
	return c.RerankStreamWith(ctx)
}

// RerankStreamWith is RerankStream with gRPC call options. (RerankStream keeps its
// signature, which callers' interfaces and method values are written against.)
func (c *Client) RerankStreamWith(ctx context.Context, opts ...grpc.CallOption) (*Stream, error) {
	s, err := c.rpc.RerankStream(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return &Stream{c: c, stream: s}, nil
}

// Send queues one item; id must differ from the ids of the items in flight.
func (s *Stream) Send(id, query string, documents []string, opts ...RerankOption) error {
	return s.stream.Send(&rerankv1.RerankStreamRequest{Id: id, Request: s.c.NewRequest(query, documents, opts...)})
}

// CloseSend tells the server no more items follow; it then finishes the items
// in flight and ends the stream.
func (s *Stream) CloseSend() error { return s.stream.CloseSend() }

// Recv returns the next answer. It returns io.EOF once the server has answered
// everything after CloseSend; any other error ended the stream (a gRPC status).
func (s *Stream) Recv() (*StreamResult, error) {
	m, err := s.stream.Recv()
	if err != nil {
		return nil, err
	}
	out := &StreamResult{ID: m.GetId()}
	switch r := m.GetResult().(type) {
	case *rerankv1.RerankStreamResponse_Response:
		out.Response = fromProto(r.Response)
	case *rerankv1.RerankStreamResponse_Error:
		out.Err = itemError(r.Error)
	default:
		out.Err = &ItemError{Code: codes.Unknown, Message: "stream response carries neither response nor error"}
	}
	return out, nil
}

// Trailer returns the stream's trailing metadata: its x-request-id, and the
// x-deployment of a stream that failed. Call it once Recv has returned an error
// (io.EOF included): grpc-go fills it when the stream ends.
func (s *Stream) Trailer() metadata.MD { return s.stream.Trailer() }

func itemError(e *rerankv1.RerankError) *ItemError {
	out := &ItemError{
		Code:      codes.Code(e.GetCode()),
		Message:   e.GetMessage(),
		Reason:    e.GetReason(),
		Metadata:  e.GetMetadata(),
		RequestID: e.GetRequestId(),
	}
	if d := e.GetRetryDelay(); d != nil {
		out.RetryDelay = d.AsDuration()
	}
	for _, v := range e.GetFieldViolations() {
		out.FieldViolations = append(out.FieldViolations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
	}
	return out
}
