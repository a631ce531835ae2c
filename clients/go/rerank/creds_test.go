package rerank_test

import (
	"testing"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/credentials/local"

	"github.com/rerank-service/rerank-service/clients/go/rerank"
)

// Plaintext given as transport credentials carries the key as WithInsecure does:
// insecure credentials failed Dial ("requires transport level security"), and local
// ones (RERANK_TARGET is a loopback address) failed every call UNAVAILABLE.
func TestAPIKeyTravelsOverInsecureAndLocalTransportCredentials(t *testing.T) {
	target, key := env(t)
	for name, creds := range map[string]credentials.TransportCredentials{
		"insecure.NewCredentials()": insecure.NewCredentials(),
		"local.NewCredentials()":    local.NewCredentials(),
	} {
		t.Run(name, func(t *testing.T) {
			c, err := rerank.Dial(target, rerank.WithAPIKey(key), rerank.WithTransportCredentials(creds))
			if err != nil {
				t.Fatalf("Dial(WithTransportCredentials(%s)): %v", name, err)
			}
			defer func() { _ = c.Close() }()
			if _, err := c.ListModels(ctx(t)); err != nil {
				t.Fatalf("ListModels over %s with a key: %v", name, err)
			}
		})
	}
}
