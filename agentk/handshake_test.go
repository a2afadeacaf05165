package agentk

import (
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/agentserver"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// refusingAuth is an agent server authenticator that knows no token.
type refusingAuth struct{}

func (refusingAuth) AuthenticateAgent(context.Context, string) (agentserver.Agent, error) {
	return agentserver.Agent{}, agentserver.ErrUnknownToken
}

// TestHandshakeErrorsSayWhatToFix runs agentk against servers that refuse
// its handshake the ways a new user meets, and checks that the log says
// what happened and what to change.
func TestHandshakeErrorsSayWhatToFix(t *testing.T) {
	kasEndpoint := &agentserver.Endpoint{Auth: refusingAuth{}, Store: tunnel.NewStore()}
	mux := http.NewServeMux()
	mux.Handle("/-/kubernetes-agent/", kasEndpoint)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/json-401": // GitLab's API, or a login proxy
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"message":"401 Unauthorized"}`)
		case "/moved":
			http.Redirect(w, r, "/-/kubernetes-agent/?session=secret", http.StatusFound)
		case "/catch-all": // a web server's page for every path
			io.WriteString(w, "<html>welcome</html>")
		case "/upgrade-dropped/-/kubernetes-agent/": // a proxy that drops Upgrade
			r.Header.Del("Upgrade")
			r.URL.Path = "/-/kubernetes-agent/"
			kasEndpoint.ServeHTTP(w, r)
		default:
			http.NotFound(w, r)
		}
	})
	plain := httptest.NewServer(mux)
	t.Cleanup(plain.Close)
	tlsSrv := httptest.NewUnstartedServer(mux)
	tlsSrv.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshake errors are the point
	tlsSrv.StartTLS()
	t.Cleanup(tlsSrv.Close)
	plainHost, tlsHost := strings.TrimPrefix(plain.URL, "http://"), strings.TrimPrefix(tlsSrv.URL, "https://")

	tests := []struct {
		name        string
		address     string
		wantMessage string
		wantFix     string // a part of the fix
	}{
		{"token refused by KAS", "ws://" + plainHost + "/-/kubernetes-agent/", "KAS refused the agent token", "--token-file or AGENTK_TOKEN"},
		{"401 from something that is not KAS", "ws://" + plainHost + "/json-401", "a server that is not KAS refused the tunnel handshake", "point --kas-address at the agent endpoint"},
		{"ws:// against a TLS port", "ws://" + tlsHost + "/-/kubernetes-agent/", "KAS refused the tunnel handshake", "use wss:// instead of ws://"},
		{"no path", "ws://" + plainHost, "no agent endpoint at --kas-address", `nothing at "/": the agent endpoint is usually wss://<gitlab host>/-/kubernetes-agent/`},
		{"no trailing slash, redirected", "ws://" + plainHost + "/-/kubernetes-agent", "KAS's address redirects the tunnel handshake", "add the trailing slash"},
		{"redirected elsewhere", "ws://" + plainHost + "/moved", "KAS's address redirects the tunnel handshake", "/-/kubernetes-agent/, into --kas-address"},
		{"right path, wrong server", "ws://" + plainHost + "/gitlab/-/kubernetes-agent/", "no agent endpoint at --kas-address", "routed on /-/kubernetes-agent/"},
		{"a catch-all page", "ws://" + plainHost + "/catch-all", "KAS refused the tunnel handshake", "answered like a web page"},
		{"a proxy dropped Upgrade", "ws://" + plainHost + "/upgrade-dropped/-/kubernetes-agent/", "KAS refused the tunnel handshake", "dropped the WebSocket Upgrade header"},
		{"CA not trusted", "wss://" + tlsHost + "/-/kubernetes-agent/", "cannot connect to KAS", "--kas-ca-cert-file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := firstHandshakeFailure(t, tt.address)
			if e.Message != tt.wantMessage {
				t.Errorf("logged %q, want %q", e.Message, tt.wantMessage)
			}
			fix := toString(e.ContextMap()["fix"])
			if !strings.Contains(fix, tt.wantFix) {
				t.Errorf("fix %q does not say %q; entry: %v", fix, tt.wantFix, e.ContextMap())
			}
			if strings.Contains(fix, "session=") {
				t.Errorf("fix %q shows a redirect's query", fix)
			}
		})
	}
}

// firstHandshakeFailure runs an agent against address until it logs a
// failed handshake, and returns that log entry.
func firstHandshakeFailure(t *testing.T, address string) observer.LoggedEntry {
	t.Helper()
	tokenPath := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenPath, []byte("glagent-test"))
	core, logs := observer.New(zapcore.InfoLevel)
	a, err := New(Config{
		KASAddress: address,
		Token:      TokenFile(tokenPath),
		Cluster:    newCluster(clusterSpec{server: mustURL(t, "http://127.0.0.1:1")}),
		Logger:     zap.New(core),
		Backoff:    Backoff{Initial: time.Hour},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	var entry observer.LoggedEntry
	eventually(t, "a failed handshake logged", func() bool {
		for _, e := range logs.All() {
			if _, ok := e.ContextMap()["retry_in"]; ok {
				entry = e
				return true
			}
		}
		return false
	})
	return entry
}

func TestDiagnoseDialErrors(t *testing.T) {
	if d := diagnoseDialError(errors.New("connection refused")); d.message != "cannot connect to KAS" || d.fix != "" {
		t.Errorf("a refused connection: %+v", d)
	}
}
