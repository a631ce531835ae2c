package rerank_test

import (
	"fmt"
	"reflect"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rerank-service/rerank-service/clients/go/rerank"
)

// These tests need no server: they check how the error helpers read a
// StreamResult.Err, which is a concrete *ItemError and so nil on a successful item.
// Passed where an error is expected, that nil pointer becomes a non-nil error.

// noPanic runs f and turns a panic into a test failure, so that one helper that
// panics does not hide what the others do.
func noPanic(t *testing.T, name string, f func()) {
	t.Helper()
	defer func() {
		if p := recover(); p != nil {
			t.Errorf("%s panics: %v", name, p)
		}
	}()
	f()
}

func TestErrorHelpersOnASuccessfulStreamResult(t *testing.T) {
	r := &rerank.StreamResult{ID: "a", Response: &rerank.Response{}} // Err is a nil *ItemError

	noPanic(t, "FieldViolations(r.Err)", func() {
		if got := rerank.FieldViolations(r.Err); got != nil {
			t.Errorf("FieldViolations(r.Err) = %+v, want nil", got)
		}
	})
	noPanic(t, "FieldViolations of a wrapped nil *ItemError", func() {
		if got := rerank.FieldViolations(fmt.Errorf("item a: %w", r.Err)); got != nil {
			t.Errorf("FieldViolations(wrapped r.Err) = %+v, want nil", got)
		}
	})
	noPanic(t, "status.Code(r.Err)", func() {
		if got := status.Code(r.Err); got != codes.OK {
			t.Errorf("status.Code(r.Err) = %v, want OK", got)
		}
	})
	noPanic(t, "r.Err.GRPCStatus()", func() {
		if got := r.Err.GRPCStatus().Code(); got != codes.OK {
			t.Errorf("r.Err.GRPCStatus().Code() = %v, want OK", got)
		}
	})
	noPanic(t, "r.Err.Error()", func() { _ = r.Err.Error() })
}

func TestErrorHelpersOnAFailedStreamResult(t *testing.T) {
	violations := []rerank.FieldViolation{{Field: "query", Description: "must not be empty"}}
	r := &rerank.StreamResult{ID: "b", Err: &rerank.ItemError{
		Code: codes.InvalidArgument, Message: "query is empty", FieldViolations: violations,
	}}

	if got := rerank.FieldViolations(r.Err); !reflect.DeepEqual(got, violations) {
		t.Errorf("FieldViolations(r.Err) = %+v, want %+v", got, violations)
	}
	if got := rerank.FieldViolations(fmt.Errorf("item b: %w", r.Err)); !reflect.DeepEqual(got, violations) {
		t.Errorf("FieldViolations(wrapped r.Err) = %+v, want %+v", got, violations)
	}
	if got := status.Code(r.Err); got != codes.InvalidArgument {
		t.Errorf("status.Code(r.Err) = %v, want InvalidArgument", got)
	}
	if got, want := r.Err.Error(), "rerank: InvalidArgument: query is empty"; got != want {
		t.Errorf("r.Err.Error() = %q, want %q", got, want)
	}
}
