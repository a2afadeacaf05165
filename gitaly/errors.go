package gitaly

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel errors that the errors of a [Client] wrap, for errors.Is.
var (
	// ErrNotFound: the revision, path or ref does not exist (gRPC NotFound;
	// for a listing also InvalidArgument, which older Gitaly answers for a
	// missing revision or path, as KAS takes it).
	ErrNotFound = errors.New("not found")
	// ErrFileTooLarge: the file is larger than the limit given to
	// [Client.ReadFile] (Gitaly answers FailedPrecondition).
	ErrFileTooLarge = errors.New("file too large")
	// ErrEmptyRepository: the repository has no refs.
	ErrEmptyRepository = errors.New("empty repository")
	// ErrUnavailable: Gitaly could not be reached or is overloaded (gRPC
	// Unavailable or ResourceExhausted); worth retrying later.
	ErrUnavailable = errors.New("gitaly unavailable")
	// ErrUnauthenticated: Gitaly refused the token (gRPC Unauthenticated or
	// PermissionDenied).
	ErrUnauthenticated = errors.New("gitaly refused the token")
	// ErrClosed: the [Pool] is closed or the [Client] released.
	ErrClosed = errors.New("gitaly client closed")
)

// callError describes the failure of the call op. It wraps err and, if the
// gRPC code has one, the sentinel error for it; extra maps further codes
// for this call.
func callError(op string, err error, extra map[codes.Code]error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w", op, err)
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%s: %w", op, err)
	}
	if sentinel := extra[st.Code()]; sentinel != nil {
		return fmt.Errorf("%s: %w: %w", op, sentinel, err)
	}
	var sentinel error
	switch st.Code() {
	case codes.NotFound:
		sentinel = ErrNotFound
	case codes.Unavailable, codes.ResourceExhausted:
		sentinel = ErrUnavailable
	case codes.Unauthenticated, codes.PermissionDenied:
		sentinel = ErrUnauthenticated
	default:
		return fmt.Errorf("%s: %w", op, err)
	}
	return fmt.Errorf("%s: %w: %w", op, sentinel, err)
}
