// Command rerank-example ranks a few documents against a query and prints the
// ranking. It reads RERANK_TARGET (host:port, default localhost:50051) and
// RERANK_API_KEY; set RERANK_TLS=1 for a TLS server (default plaintext).
// RERANK_MODEL names the model; without it the example asks the server
// (ListModels) and uses the first model it serves (all-minilm-l6-v2 under
// `make serve`), since the client's default, qwen3-rerank, is served only by
// the upstream backend.
//
//	RERANK_TARGET=127.0.0.1:50051 RERANK_API_KEY=... go run ./cmd/rerank-example [query]
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/status"

	"github.com/rerank-service/rerank-service/clients/go/rerank"
)

func main() {
	target := os.Getenv("RERANK_TARGET")
	if target == "" {
		target = "localhost:50051"
	}
	opts := []rerank.Option{rerank.WithAPIKey(os.Getenv("RERANK_API_KEY"))}
	if tls := os.Getenv("RERANK_TLS"); tls != "1" && tls != "true" {
		opts = append(opts, rerank.WithInsecure())
	}
	client, err := rerank.Dial(target, opts...)
	if err != nil {
		log.Fatalf("dial %s: %v", target, err)
	}
	defer func() { _ = client.Close() }()

	query := "red apple"
	if len(os.Args) > 1 {
		query = strings.Join(os.Args[1:], " ")
	}
	docs := []string{"a red apple", "a car", "apple pie", "a green pear"}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	model := os.Getenv("RERANK_MODEL")
	if model == "" { // the server knows what it serves: take its first model
		models, err := client.ListModels(ctx)
		if err != nil {
			st, _ := status.FromError(err)
			log.Fatalf("list models: %s: %s", st.Code(), st.Message())
		}
		if len(models) == 0 {
			log.Fatal("the server serves no models")
		}
		model = models[0].Name
	}
	resp, err := client.Rerank(ctx, query, docs, rerank.WithModel(model), rerank.WithReturnDocuments())
	if err != nil {
		st, _ := status.FromError(err)
		for _, v := range rerank.FieldViolations(err) {
			log.Printf("invalid %s: %s", v.Field, v.Description)
		}
		log.Fatalf("rerank: %s: %s", st.Code(), st.Message())
	}
	fmt.Printf("query %q, model %s (request %s, %d tokens)\n", query, model, resp.RequestID, resp.TotalTokens)
	for rank, r := range resp.Results {
		fmt.Printf("%d. [%d] %.4f  %s\n", rank+1, r.Index, r.RelevanceScore, r.Document)
	}
}
