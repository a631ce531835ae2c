package rerank_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rerank-service/rerank-service/clients/go/rerank"
	rerankv1 "github.com/rerank-service/rerank-service/clients/go/rerank/v1"
)

// These tests run against a live rerank-service (plaintext) backed by the fake
// upstream: RERANK_TARGET is its address, RERANK_API_KEY a valid client key.
// They fail, never skip, when the environment is missing.

func env(t *testing.T) (target, key string) {
	t.Helper()
	target, key = os.Getenv("RERANK_TARGET"), os.Getenv("RERANK_API_KEY")
	if target == "" {
		t.Fatal("RERANK_TARGET is not set: these tests need a live rerank-service, e.g. RERANK_TARGET=127.0.0.1:50051")
	}
	if key == "" {
		t.Fatal("RERANK_API_KEY is not set: these tests need a client API key the server at RERANK_TARGET accepts")
	}
	return target, key
}

func dial(t *testing.T, opts ...rerank.Option) *rerank.Client {
	t.Helper()
	target, key := env(t)
	c, err := rerank.Dial(target, append([]rerank.Option{rerank.WithAPIKey(key), rerank.WithInsecure()}, opts...)...)
	if err != nil {
		t.Fatalf("Dial(%q): %v", target, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestLongDocumentsAreChunkedAndTheBestChunkLocated(t *testing.T) {
	c := dial(t)
	long := strings.Repeat("pear plum grape ", 300) + "red apple"
	resp, err := c.Rerank(ctx(t), "red apple", []string{long, "a car"}, rerank.WithModel("qwen3-rerank"),
		rerank.WithLongDocuments(rerankv1.LongDocuments_LONG_DOCUMENTS_CHUNK), rerank.WithMaxTokensPerDoc(200))
	if err != nil {
		t.Fatalf("Rerank: %v", err)
	}
	best := resp.Results[0]
	if best.Index != 0 || best.Chunks < 2 || best.Truncated || best.BestChunk == nil {
		t.Fatalf("best = %+v, want document 0 in several chunks", best)
	}
	runes := []rune(long)
	if got := string(runes[best.BestChunk.Start:best.BestChunk.End]); !strings.HasSuffix(got, "red apple") {
		t.Errorf("best chunk %q does not end with the answer", got)
	}
	if resp.Results[1].Chunks != 1 || resp.Results[1].BestChunk != nil {
		t.Errorf("short document = %+v, want one chunk", resp.Results[1])
	}
}

func TestRerank(t *testing.T) {
	c := dial(t)
	resp, err := c.Rerank(ctx(t), "red apple", []string{"a red apple", "a car", "apple pie"},
		rerank.WithModel("qwen3-rerank"), rerank.WithTopN(2), rerank.WithReturnDocuments())
	if err != nil {
		t.Fatalf("Rerank: %v", err)
	}
	want := []rerank.Result{
		{Index: 0, RelevanceScore: 1.0, Document: "a red apple", Chunks: 1},
		{Index: 2, RelevanceScore: 0.5, Document: "apple pie", Chunks: 1},
	}
	if !reflect.DeepEqual(resp.Results, want) {
		t.Errorf("results = %+v, want %+v", resp.Results, want)
	}
	// Another suite may have scored these pairs already: the server's cache then answers them.
	if resp.TotalTokens+resp.CachedTokens <= 0 {
		t.Errorf("total_tokens + cached_tokens = %d, want > 0", resp.TotalTokens+resp.CachedTokens)
	}
	if resp.RequestID == "" {
		t.Error("request_id is empty")
	}
	again, err := c.Rerank(ctx(t), "red apple", []string{"a red apple", "a car", "apple pie"},
		rerank.WithModel("qwen3-rerank"), rerank.WithTopN(2), rerank.WithReturnDocuments())
	if err != nil {
		t.Fatalf("Rerank again: %v", err)
	}
	if !reflect.DeepEqual(again.Results, want) || again.TotalTokens != 0 || again.CachedTokens <= 0 {
		t.Errorf("repeated call = %+v, want the same results from the cache (0 total, > 0 cached tokens)", again)
	}
}

// The server answers up to --max-message-bytes (16 MiB): grpc-go's 4 MiB receive
// default would fail an answer the server had already ranked and billed.
func TestRerankReceivesAnAnswerOver4MiB(t *testing.T) {
	c := dial(t)
	docs := make([]string, 5) // 5 x 1 MiB, echoed back
	for i := range docs {
		docs[i] = fmt.Sprintf("doc %d ", i) + strings.Repeat("lorem ipsum dolor sit amet ", 40_000)
	}
	resp, err := c.Rerank(ctx(t), "lorem go", docs, rerank.WithModel("qwen3-rerank"), rerank.WithReturnDocuments())
	if err != nil {
		t.Fatalf("Rerank: %v", err)
	}
	got := make([]string, 0, len(resp.Results))
	for _, r := range resp.Results {
		got = append(got, r.Document)
	}
	sort.Strings(got)
	if !reflect.DeepEqual(got, docs) {
		t.Errorf("got %d documents back, want the %d sent", len(got), len(docs))
	}
}

func TestRerankEmptyQueryIsInvalidArgument(t *testing.T) {
	c := dial(t)
	_, err := c.Rerank(ctx(t), "", []string{"a red apple"})
	if got := status.Code(err); got != codes.InvalidArgument {
		t.Fatalf("code = %v (err %v), want InvalidArgument", got, err)
	}
	violations := rerank.FieldViolations(err)
	for _, v := range violations {
		if v.Field == "query" {
			return
		}
	}
	t.Errorf("field violations = %+v, want one for field \"query\"", violations)
}

func TestRerankWithoutAPIKeyIsUnauthenticated(t *testing.T) {
	target, _ := env(t)
	c, err := rerank.Dial(target, rerank.WithInsecure())
	if err != nil {
		t.Fatalf("Dial(%q): %v", target, err)
	}
	defer func() { _ = c.Close() }()
	_, err = c.Rerank(ctx(t), "red apple", []string{"a red apple"})
	if got := status.Code(err); got != codes.Unauthenticated {
		t.Fatalf("code = %v (err %v), want Unauthenticated", got, err)
	}
}

func TestRerankDeadlineExceeded(t *testing.T) {
	c := dial(t)
	// Warm the connection up first, so the short deadline measures the call alone.
	if _, err := c.ListModels(ctx(t)); err != nil {
		t.Fatalf("ListModels: %v", err)
	}
	short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Rerank(short, "[[delay=2]] red apple", []string{"a red apple", "a car"})
	if got := status.Code(err); got != codes.DeadlineExceeded {
		t.Fatalf("code = %v (err %v), want DeadlineExceeded", got, err)
	}
	if elapsed := time.Since(start); elapsed > 1500*time.Millisecond {
		t.Errorf("call took %v, want it cut off near the 300ms deadline", elapsed)
	}
}

func TestRerankStream(t *testing.T) {
	c := dial(t)
	s, err := c.RerankStream(ctx(t))
	if err != nil {
		t.Fatalf("RerankStream: %v", err)
	}
	docs := []string{"a red apple", "a car", "apple pie"}
	for _, item := range []struct{ id, query string }{{"a", "red apple"}, {"b", ""}, {"c", "apple"}} {
		if err := s.Send(item.id, item.query, docs); err != nil {
			t.Fatalf("Send(%q): %v", item.id, err)
		}
	}
	if err := s.CloseSend(); err != nil {
		t.Fatalf("CloseSend: %v", err)
	}
	got := map[string]*rerank.StreamResult{}
	for {
		r, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		if _, dup := got[r.ID]; dup {
			t.Errorf("two responses for id %q", r.ID)
		}
		got[r.ID] = r
	}
	if len(got) != 3 {
		t.Fatalf("got %d responses (%v), want 3", len(got), keys(got))
	}
	for _, id := range []string{"a", "c"} {
		r := got[id]
		switch {
		case r == nil:
			t.Errorf("no response for %q", id)
		case r.Err != nil:
			t.Errorf("%q failed: %v", id, r.Err)
		case r.Response == nil || len(r.Response.Results) != 3:
			t.Errorf("%q: response %+v, want 3 results", id, r.Response)
		}
	}
	b := got["b"]
	switch {
	case b == nil:
		t.Fatal("no response for \"b\"")
	case b.Err == nil:
		t.Fatalf("\"b\" succeeded (%+v), want an INVALID_ARGUMENT error", b.Response)
	}
	if b.Err.Code != codes.InvalidArgument || int(b.Err.Code) != 3 {
		t.Errorf("\"b\" code = %v, want InvalidArgument (3)", b.Err.Code)
	}
	if len(b.Err.FieldViolations) == 0 || b.Err.FieldViolations[0].Field != "query" {
		t.Errorf("\"b\" field violations = %+v, want [0].Field == \"query\"", b.Err.FieldViolations)
	}
	if fv := rerank.FieldViolations(b.Err); len(fv) == 0 || fv[0].Field != "query" {
		t.Errorf("FieldViolations(item error) = %+v, want [0].Field == \"query\"", fv)
	}
}

func TestListModels(t *testing.T) {
	c := dial(t)
	models, err := c.ListModels(ctx(t))
	if err != nil {
		t.Fatalf("ListModels: %v", err)
	}
	for _, m := range models {
		if m.Name == "qwen3-rerank" {
			return
		}
	}
	t.Errorf("models = %+v, want one named \"qwen3-rerank\"", models)
}

func keys(m map[string]*rerank.StreamResult) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
