package railsapi

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// The JWT Rails sends with every call (gitlab-wire A.7, kas-spec §2.3).
const (
	// jwtAudience must be among the token's audiences.
	jwtAudience = "gitlab-kas"
	// jwtLeeway absorbs clock skew between the Rails nodes and KAS when
	// checking exp and nbf.
	jwtLeeway = 30 * time.Second
	// authScheme is the scheme of the authorization metadata, compared
	// case-insensitively: Rails sends it in lowercase.
	authScheme = "bearer"
)

// jwtMethods are the algorithms KAS accepts, as GitLab's KAS does: HMAC
// with the shared secret. Anything else (none, RS256 with the secret as a
// "public key", ...) is refused.
var jwtMethods = []string{"HS256", "HS384", "HS512"}

// errAuth is the one answer every authentication failure gets, as from
// GitLab's KAS; the reason is only logged.
var errAuth = status.Error(codes.Unauthenticated, "JWT validation failed")

// authenticator checks the JWT of each call.
type authenticator struct {
	secret []byte
	log    *zap.Logger
}

func (a *authenticator) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := a.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (a *authenticator) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := a.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}

// check authenticates the call in ctx. Other metadata, the kas-feature-*
// flags newer Rails sends included, is ignored.
func (a *authenticator) check(ctx context.Context, method string) error {
	err := a.verify(ctx)
	if err == nil {
		return nil
	}
	fields := []zap.Field{zap.String("grpc_method", method), zap.Error(err)}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		fields = append(fields, zap.String("remote_addr", p.Addr.String()))
	}
	a.log.Warn("rejected internal api call", fields...)
	return errAuth
}

// verify returns why the call in ctx is not authenticated, or nil. Its
// errors never contain the token.
func (a *authenticator) verify(ctx context.Context) error {
	if len(a.secret) == 0 {
		return errors.New("no shared secret configured")
	}
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	switch {
	case len(vals) == 0:
		return errors.New("no authorization metadata")
	case len(vals) > 1:
		return errors.New("more than one authorization metadata value")
	}
	scheme, token, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, authScheme) {
		return errors.New("authorization scheme is not bearer")
	}
	token = strings.TrimSpace(token)
	if token == "" {
		return errors.New("empty bearer token")
	}
	// The issuer is not checked: Rails sets it to its host name, which KAS
	// does not know (kas-spec §2.3). exp and nbf are checked when present.
	_, err := jwt.Parse(token, func(*jwt.Token) (any, error) { return a.secret, nil },
		jwt.WithValidMethods(jwtMethods),
		jwt.WithAudience(jwtAudience),
		jwt.WithLeeway(jwtLeeway),
	)
	if err != nil {
		return fmt.Errorf("invalid jwt: %w", err)
	}
	return nil
}
