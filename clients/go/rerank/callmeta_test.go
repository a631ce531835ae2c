package rerank_test

import (
	"context"
	"errors"
	"io"
	"math"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/rerank-service/rerank-service/clients/go/rerank"
	rerankv1 "github.com/rerank-service/rerank-service/clients/go/rerank/v1"
)

// *Client keeps the method signatures callers' interfaces (a common way to mock it)
// and method values are written against; gRPC call options come through RerankRequest,
// ListModelsWith and RerankStreamWith. This does not compile if one of them changes.
var _ interface {
	Close() error
	Raw() rerankv1.RerankServiceClient
	NewRequest(query string, documents []string, opts ...rerank.RerankOption) *rerankv1.RerankRequest
	Rerank(ctx context.Context, query string, documents []string, opts ...rerank.RerankOption) (*rerank.Response, error)
	ListModels(ctx context.Context) ([]rerank.Model, error)
	RerankStream(ctx context.Context) (*rerank.Stream, error)
} = (*rerank.Client)(nil)

// A key read from a file as written ends in a newline: it is sent without it.
func TestAPIKeyWithSurroundingWhitespaceIsTrimmed(t *testing.T) {
	target, key := env(t)
	c, err := rerank.Dial(target, rerank.WithAPIKey(" "+key+"\n"), rerank.WithInsecure())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer func() { _ = c.Close() }()
	if _, err := c.Rerank(ctx(t), "red apple", []string{"a red apple"}); err != nil {
		t.Fatalf("Rerank with the key and a trailing newline: %v", err)
	}
}

// A key no header can carry is refused by Dial, and the error does not quote it
// (grpc-go failed every call INTERNAL, its error quoting the whole header).
func TestDialRefusesAKeyThatIsNotPrintableASCII(t *testing.T) {
	target, _ := env(t)
	for _, key := range []string{"sk-mid\nline-secret", "sk-sécret-key", "sk-nul\x00-secret", "sk-space secret"} {
		c, err := rerank.Dial(target, rerank.WithAPIKey(key), rerank.WithInsecure())
		if err == nil {
			_ = c.Close()
			t.Errorf("Dial(WithAPIKey(%q)) = nil error, want the key refused", key)
			continue
		}
		if strings.Contains(err.Error(), "secret") || strings.Contains(err.Error(), "sécret") {
			t.Errorf("Dial(WithAPIKey(%q)) error quotes the key: %v", key, err)
		}
		if !strings.Contains(err.Error(), "printable ASCII") {
			t.Errorf("Dial(WithAPIKey(%q)) error = %v, want it to say the key must be printable ASCII", key, err)
		}
	}
}

// Every failed call carries x-request-id in its trailing metadata (docs/ERRORS.md).
func TestFailedCallTrailerCarriesTheRequestID(t *testing.T) {
	c := dial(t)
	var trailer metadata.MD
	_, err := c.RerankRequest(ctx(t), c.NewRequest("", []string{"a red apple"}), grpc.Trailer(&trailer))
	if got := status.Code(err); got != codes.InvalidArgument {
		t.Fatalf("code = %v (err %v), want InvalidArgument", got, err)
	}
	if ids := trailer.Get("x-request-id"); len(ids) != 1 || ids[0] == "" {
		t.Errorf("trailer x-request-id = %q, want one id (trailer %v)", ids, trailer)
	}
}

func TestListModelsTrailerCarriesTheRequestID(t *testing.T) {
	c := dial(t)
	var trailer metadata.MD
	if _, err := c.ListModelsWith(ctx(t), grpc.Trailer(&trailer)); err != nil {
		t.Fatalf("ListModelsWith: %v", err)
	}
	if ids := trailer.Get("x-request-id"); len(ids) != 1 || ids[0] == "" {
		t.Errorf("trailer x-request-id = %q, want one id (trailer %v)", ids, trailer)
	}
}

func TestStreamTrailerCarriesTheRequestID(t *testing.T) {
	c := dial(t)
	var trailer metadata.MD // RerankStreamWith passes its call options on
	s, err := c.RerankStreamWith(ctx(t), grpc.Trailer(&trailer))
	if err != nil {
		t.Fatalf("RerankStreamWith: %v", err)
	}
	if err := s.Send("a", "red apple", []string{"a red apple"}); err != nil {
		t.Fatalf("Send: %v", err)
	}
	if err := s.CloseSend(); err != nil {
		t.Fatalf("CloseSend: %v", err)
	}
	for {
		if _, err := s.Recv(); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("Recv: %v", err)
		}
	}
	if ids := s.Trailer().Get("x-request-id"); len(ids) != 1 || ids[0] == "" {
		t.Errorf("stream trailer x-request-id = %q, want one id (trailer %v)", ids, s.Trailer())
	}
	if ids := trailer.Get("x-request-id"); len(ids) != 1 || ids[0] == "" {
		t.Errorf("grpc.Trailer x-request-id = %q, want one id (trailer %v)", ids, trailer)
	}
}

// An int beyond int32 is kept at int32's bound, not wrapped (1<<32 + 1 became 1).
func TestIntOptionsBeyondInt32AreClampedNotWrapped(t *testing.T) {
	c, err := rerank.Dial("127.0.0.1:1", rerank.WithInsecure()) // connects lazily: never used
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer func() { _ = c.Close() }()
	req := c.NewRequest("q", []string{"d"}, rerank.WithTopN(1<<32+1), rerank.WithMaxTokensPerDoc(math.MaxInt64),
		rerank.WithChunkOverlapTokens(-(1<<32 + 1)))
	if req.GetTopN() != math.MaxInt32 || req.GetMaxTokensPerDoc() != math.MaxInt32 ||
		req.GetChunkOverlapTokens() != math.MinInt32 {
		t.Errorf("top_n, max_tokens_per_doc, chunk_overlap_tokens = %d, %d, %d; want %d, %d, %d",
			req.GetTopN(), req.GetMaxTokensPerDoc(), req.GetChunkOverlapTokens(),
			int32(math.MaxInt32), int32(math.MaxInt32), int32(math.MinInt32))
	}
}
