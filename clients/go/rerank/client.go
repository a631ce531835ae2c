// Package rerank is a small, idiomatic client for the rerank-service gRPC API
// (rerank.v1.RerankService). The generated stubs live in the subpackage
// github.com/rerank-service/rerank-service/clients/go/rerank/v1 (rerankv1);
// Client.Raw gives direct access to them.
//
//	c, err := rerank.Dial("localhost:50051", rerank.WithAPIKey(key), rerank.WithInsecure(),
//		rerank.WithDefaultModel("all-minilm-l6-v2")) // a model the server serves (ListModels)
//	if err != nil { ... }
//	defer c.Close()
//	resp, err := c.Rerank(ctx, "red apple", []string{"a red apple", "a car"}, rerank.WithTopN(1))
package rerank

import (
	"context"
	"crypto/tls"
	"errors"
	"math"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	rerankv1 "github.com/rerank-service/rerank-service/clients/go/rerank/v1"
)

// DefaultModel is the model used when neither WithDefaultModel nor WithModel is given:
// the hosted API's model, which a server serves with the upstream backend. A server
// on the local backend (`make serve`: all-minilm-l6-v2) answers NOT_FOUND for it, so
// name a model the server serves (ListModels) there.
const DefaultModel = "qwen3-rerank"

// Client is a connection to a rerank-service. It is safe for concurrent use.
type Client struct {
	conn  *grpc.ClientConn
	rpc   rerankv1.RerankServiceClient
	model string
}

type config struct {
	apiKey   string
	insecure bool
	creds    credentials.TransportCredentials
	model    string
	dialOpts []grpc.DialOption
}

// Option configures Dial.
type Option func(*config)

// WithAPIKey sends key as `authorization: Bearer <key>` on every call. Surrounding
// whitespace (the newline of a key read from a file) is dropped; Dial refuses a key
// with any other character than printable ASCII.
func WithAPIKey(key string) Option { return func(c *config) { c.apiKey = key } }

// errBadKey never quotes the key: the error may end up in a log.
var errBadKey = errors.New("rerank: the api key must be printable ASCII (letters, digits, punctuation; " +
	"no spaces or control characters)")

// checkKey returns key without surrounding whitespace, or errBadKey: grpc-go would
// fail every call with such a key INTERNAL instead, long after Dial.
func checkKey(key string) (string, error) {
	key = strings.TrimSpace(key)
	for i := 0; i < len(key); i++ {
		if key[i] < 0x21 || key[i] > 0x7e {
			return "", errBadKey
		}
	}
	return key, nil
}

// WithInsecure uses plaintext instead of TLS (for local or in-cluster servers).
// The API key, if any, is then sent in clear text.
func WithInsecure() Option { return func(c *config) { c.insecure = true } }

// WithTransportCredentials sets the TLS credentials (default: TLS with the system roots).
// With insecure.NewCredentials() or local.NewCredentials() (which connects only to a
// loopback address or a Unix socket) the API key, if any, is sent as WithInsecure sends it.
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(c *config) { c.creds = creds }
}

// WithDefaultModel sets the model Rerank uses when the call gives no WithModel.
func WithDefaultModel(model string) Option { return func(c *config) { c.model = model } }

// WithDialOptions appends raw gRPC dial options (interceptors, keepalive, ...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dialOpts = append(c.dialOpts, opts...) }
}

// Dial creates a client for target (for example "localhost:50051" or
// "dns:///rerank.internal:443"). Like grpc.NewClient it connects lazily, on the
// first call.
func Dial(target string, opts ...Option) (*Client, error) {
	cfg := config{model: DefaultModel}
	for _, o := range opts {
		o(&cfg)
	}
	apiKey, err := checkKey(cfg.apiKey)
	if err != nil {
		return nil, err
	}
	var dialOpts []grpc.DialOption
	switch {
	case cfg.insecure:
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	case cfg.creds != nil:
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(cfg.creds))
	default:
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12})))
	}
	if apiKey != "" {
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearer{token: apiKey, secure: keyNeedsTLS(cfg)}))
	}
	// No receive limit of the client's own: the server bounds answers (--max-message-bytes,
	// 16 MiB by default), and grpc-go's 4 MiB default would fail an answer the server had
	// already ranked and billed (WithReturnDocuments over large documents). A caller's
	// WithDialOptions come after, so they can still set one.
	dialOpts = append(dialOpts, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)))
	dialOpts = append(dialOpts, cfg.dialOpts...)
	conn, err := grpc.NewClient(target, dialOpts...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, rpc: rerankv1.NewRerankServiceClient(conn), model: cfg.model}, nil
}

// Close closes the underlying connection.
func (c *Client) Close() error { return c.conn.Close() }

// Raw returns the generated stub, for anything this wrapper does not cover.
func (c *Client) Raw() rerankv1.RerankServiceClient { return c.rpc }

// keyNeedsTLS reports whether the key may only travel over a secure transport. Not when the
// caller chose plaintext, be it WithInsecure or the same credentials given to
// WithTransportCredentials: grpc-go would otherwise refuse Dial ("requires transport level
// security"). Nor over local credentials: they connect only to loopback or a Unix socket,
// and report loopback TCP as NoSecurity, on which grpc-go would fail every call UNAVAILABLE.
func keyNeedsTLS(cfg config) bool {
	if cfg.insecure {
		return false
	}
	if cfg.creds == nil {
		return true // Dial's default: TLS
	}
	switch cfg.creds.Info().SecurityProtocol {
	case "insecure", "local":
		return false
	}
	return true
}

// bearer is the per-RPC credential that adds the API key.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }

// RerankOption adjusts one rerank request.
type RerankOption func(*rerankv1.RerankRequest)

// WithModel overrides the client's default model for this request.
func WithModel(model string) RerankOption {
	return func(r *rerankv1.RerankRequest) { r.Model = model }
}

// WithTopN returns only the n best documents.
func WithTopN(n int) RerankOption {
	return func(r *rerankv1.RerankRequest) { v := clampInt32(n); r.TopN = &v }
}

// clampInt32 keeps an int out of int32's range at its nearest bound, so the server
// judges the value asked for: a plain conversion wraps (1<<32 + 1 becomes 1).
func clampInt32(n int) int32 {
	return int32(min(max(n, math.MinInt32), math.MaxInt32))
}

// WithInstruct sets the task instruction that steers the ranking.
func WithInstruct(instruct string) RerankOption {
	return func(r *rerankv1.RerankRequest) { r.Instruct = &instruct }
}

// WithReturnDocuments echoes each document's text in its result.
func WithReturnDocuments() RerankOption {
	return func(r *rerankv1.RerankRequest) { r.ReturnDocuments = true }
}

// WithLongDocuments says what to do with a document longer than the model's window:
// rerankv1.LongDocuments_LONG_DOCUMENTS_TRUNCATE, _CHUNK or _REJECT.
func WithLongDocuments(mode rerankv1.LongDocuments) RerankOption {
	return func(r *rerankv1.RerankRequest) { r.LongDocuments = mode }
}

// WithMaxTokensPerDoc sets the window a document is cut or chunked to, in tokens.
func WithMaxTokensPerDoc(n int) RerankOption {
	return func(r *rerankv1.RerankRequest) { v := clampInt32(n); r.MaxTokensPerDoc = &v }
}

// WithChunkOverlapTokens sets the tokens neighbouring chunks share.
func WithChunkOverlapTokens(n int) RerankOption {
	return func(r *rerankv1.RerankRequest) { v := clampInt32(n); r.ChunkOverlapTokens = &v }
}

// BestChunk is the chunk a chunked document's score came from.
type BestChunk struct {
	Index int // among the document's chunks
	Start int // offsets in Unicode code points (runes, not bytes): document[Start:End]
	End   int
}

// Result is one ranked document.
type Result struct {
	Index          int        // position in the documents passed to Rerank
	RelevanceScore float64    // 0.0 to 1.0, higher is more relevant
	Document       string     // the text; set only with WithReturnDocuments
	Truncated      bool       // the document was cut to fit the window
	Chunks         int        // chunks of the document scored: 1 for one within the window
	BestChunk      *BestChunk // long documents CHUNK, for a document of several chunks
}

// Response is a ranking, best first.
type Response struct {
	RequestID   string
	Results     []Result
	TotalTokens int
	// CachedTokens counts the tokens of pairs the service's score cache answered; they are
	// not in TotalTokens, which counts what the backends scored for this call.
	CachedTokens int
}

// NewRequest builds the protobuf request that Rerank would send.
func (c *Client) NewRequest(query string, documents []string, opts ...RerankOption) *rerankv1.RerankRequest {
	req := &rerankv1.RerankRequest{Model: c.model, Query: query, Documents: documents}
	for _, o := range opts {
		o(req)
	}
	return req
}

// Rerank ranks documents against query. Errors are gRPC statuses: use
// status.Code(err), and FieldViolations(err) for INVALID_ARGUMENT. To read the
// x-request-id of a failed call, use RerankRequest with grpc.Trailer.
func (c *Client) Rerank(ctx context.Context, query string, documents []string, opts ...RerankOption) (*Response, error) {
	return c.RerankRequest(ctx, c.NewRequest(query, documents, opts...))
}

// RerankRequest sends a prepared request (NewRequest builds one) with gRPC call
// options, for example grpc.Trailer(&md): every answer and every failed call carries
// x-request-id in its trailing metadata, and a failed call that reached a deployment
// x-deployment (docs/ERRORS.md).
func (c *Client) RerankRequest(ctx context.Context, req *rerankv1.RerankRequest, opts ...grpc.CallOption) (*Response, error) {
	resp, err := c.rpc.Rerank(ctx, req, opts...)
	if err != nil {
		return nil, err
	}
	return fromProto(resp), nil
}

// Model describes one served model.
type Model struct {
	Name             string
	MaxDocuments     int
	MaxQueryTokens   int
	SupportsInstruct bool
	Backend          string // "upstream" or "local"
}

// ListModels lists the models the server serves. To pass gRPC call options, use
// ListModelsWith.
func (c *Client) ListModels(ctx context.Context) ([]Model, error) {
	return c.ListModelsWith(ctx)
}

// ListModelsWith is ListModels with gRPC call options, for example
// grpc.Trailer(&md) to read x-request-id. (ListModels keeps its signature, which
// callers' interfaces and method values are written against.)
func (c *Client) ListModelsWith(ctx context.Context, opts ...grpc.CallOption) ([]Model, error) {
	resp, err := c.rpc.ListModels(ctx, &rerankv1.ListModelsRequest{}, opts...)
	if err != nil {
		return nil, err
	}
	models := make([]Model, 0, len(resp.GetModels()))
	for _, m := range resp.GetModels() {
		models = append(models, Model{
			Name:             m.GetName(),
			MaxDocuments:     int(m.GetMaxDocuments()),
			MaxQueryTokens:   int(m.GetMaxQueryTokens()),
			SupportsInstruct: m.GetSupportsInstruct(),
			Backend:          m.GetBackend(),
		})
	}
	return models, nil
}

func fromProto(resp *rerankv1.RerankResponse) *Response {
	out := &Response{
		RequestID:    resp.GetRequestId(),
		TotalTokens:  int(resp.GetUsage().GetTotalTokens()),
		CachedTokens: int(resp.GetUsage().GetCachedTokens()),
		Results:      make([]Result, 0, len(resp.GetOutput().GetResults())),
	}
	for _, r := range resp.GetOutput().GetResults() {
		out.Results = append(out.Results, Result{
			Index:          int(r.GetIndex()),
			RelevanceScore: r.GetRelevanceScore(),
			Document:       r.GetDocument().GetText(),
			Truncated:      r.GetTruncated(),
			Chunks:         max(int(r.GetChunks()), 1),
			BestChunk:      bestChunk(r.GetBestChunk()),
		})
	}
	return out
}

func bestChunk(b *rerankv1.BestChunk) *BestChunk {
	if b == nil {
		return nil
	}
	return &BestChunk{Index: int(b.GetIndex()), Start: int(b.GetStart()), End: int(b.GetEnd())}
}

// FieldViolation names one invalid request field.
type FieldViolation struct {
	Field       string // for example "query" or "documents[3]"
	Description string
}

// FieldViolations returns the invalid fields an error names: the
// google.rpc.BadRequest details of a gRPC status, or the field violations of a
// stream *ItemError. It returns nil when there are none, and for the nil
// *ItemError of a successful StreamResult.
func FieldViolations(err error) []FieldViolation {
	if err == nil {
		return nil
	}
	var item *ItemError
	if errors.As(err, &item) {
		if item == nil { // StreamResult.Err of a successful item, passed as an error
			return nil
		}
		return item.FieldViolations
	}
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	var out []FieldViolation
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				out = append(out, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		}
	}
	return out
}

// ItemError is why one RerankStream item failed: the status Rerank would have
// returned for it. The stream itself goes on. StreamResult.Err is a nil
// *ItemError when the item succeeded; passed where an error is expected it is a
// non-nil error, so its methods (and FieldViolations, status.Code) accept nil and
// read it as OK.
type ItemError struct {
	Code            codes.Code
	Message         string
	FieldViolations []FieldViolation
	RetryDelay      time.Duration // zero: no advice
	Reason          string
	Metadata        map[string]string
	RequestID       string
}

func (e *ItemError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return "rerank: " + e.Code.String() + ": " + e.Message
}

// GRPCStatus lets status.Code and status.FromError see the item's code. A nil
// *ItemError (a successful item) is an OK status: grpc-go's status.Code and
// status.FromError would turn a nil *status.Status into Unknown.
func (e *ItemError) GRPCStatus() *status.Status {
	if e == nil {
		return status.New(codes.OK, "")
	}
	return status.New(e.Code, e.Message)
}
