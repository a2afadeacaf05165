package agentk

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

func TestParseKASAddress(t *testing.T) {
	tests := []struct {
		in      string
		wantErr error
		text    string
	}{
		{in: "wss://kas.example/-/kubernetes-agent/"},
		{in: "ws://127.0.0.1:8150"},
		{in: "grpc://kas.example:8150", wantErr: ErrUnsupportedScheme},
		{in: "grpcs://kas.example", wantErr: ErrUnsupportedScheme},
		{in: "https://kas.example", wantErr: ErrUnsupportedScheme},
		{in: "kas.example:443", text: "unsupported scheme"},
		{in: "wss://", text: "no host"},
		{in: "wss://user:pw@kas.example", text: "credentials in the URL"},
		{in: "wss://kas.example/%zz", text: "parsing KAS address"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			u, err := ParseKASAddress(tt.in)
			if tt.wantErr == nil && tt.text == "" {
				if err != nil || u.String() != tt.in {
					t.Fatalf("ParseKASAddress = %v, %v", u, err)
				}
				return
			}
			checkError(t, err, tt.wantErr, tt.text)
			if strings.Contains(err.Error(), "pw") {
				t.Errorf("error %q shows the password", err)
			}
		})
	}
}

func TestParseHeader(t *testing.T) {
	tests := []struct {
		in, name, value, errText string
	}{
		{in: "X-Tenant: a b", name: "X-Tenant", value: "a b"},
		{in: "x-tenant:value:with:colons", name: "X-Tenant", value: "value:with:colons"},
		{in: "X-Empty:", name: "X-Empty", value: ""},
		{in: "no colon secret", errText: `want "Name: value"`},
		{in: "Bad Name: v", errText: "invalid name"},
		{in: "X-Bad: a\x00b", errText: "invalid value"},
		{in: "Authorization: Bearer x", errText: "sets it itself"},
		{in: "sec-websocket-protocol: x", errText: "sets it itself"},
		{in: "Kas-Agent-Pod-Name: x", errText: "sets it itself"},
		{in: "User-Agent: x", errText: "sets it itself"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			name, value, err := ParseHeader(tt.in)
			if tt.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("error %v, want one saying %q", err, tt.errText)
				}
				if strings.Contains(err.Error(), "secret") || strings.Contains(err.Error(), "Bearer x") {
					t.Errorf("error %q shows the value", err)
				}
				return
			}
			if err != nil || name != tt.name || value != tt.value {
				t.Errorf("ParseHeader = %q, %q, %v; want %q, %q", name, value, err, tt.name, tt.value)
			}
		})
	}
}

func TestTokenSources(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "token")
	ts := TokenFile(path)
	if _, err := ts(); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	writeFile(t, path, []byte("\n  "))
	if _, err := ts(); !errors.Is(err, errEmptyToken) {
		t.Errorf("empty file: %v", err)
	}
	for _, content := range []string{"first\n", "second"} {
		writeFile(t, path, []byte(content))
		if got, err := ts(); err != nil || got != strings.TrimSpace(content) {
			t.Errorf("token = %q, %v; want %q (re-read on every call)", got, err, strings.TrimSpace(content))
		}
	}
	if got, err := StaticToken(" env-token\n")(); err != nil || got != "env-token" {
		t.Errorf("static token = %q, %v", got, err)
	}
	if _, err := StaticToken("  ")(); !errors.Is(err, errEmptyToken) {
		t.Errorf("empty static token: %v", err)
	}
}

func TestKASClient(t *testing.T) {
	accepted := make(chan struct{}, 1)
	kas := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/redirect" {
			http.Redirect(w, r, "/-/kubernetes-agent/", http.StatusFound)
			return
		}
		nc, err := wsconn.Accept(w, r, h2tunnel.Subprotocol)
		if err != nil {
			t.Errorf("accept: %v", err)
			return
		}
		nc.Close()
		accepted <- struct{}{}
	}))
	t.Cleanup(kas.Close)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, caFile, serverCAPEM(kas))
	wss := "wss" + strings.TrimPrefix(kas.URL, "https")

	tests := []struct {
		name       string
		opts       KASClientOptions
		path       string
		wantStatus int // 0: the dial succeeds
		wantErr    bool
	}{
		{name: "CA file", opts: KASClientOptions{CACertFile: caFile}, path: "/-/kubernetes-agent/"},
		{name: "unknown CA", opts: KASClientOptions{}, path: "/-/kubernetes-agent/", wantErr: true},
		{name: "insecure", opts: KASClientOptions{InsecureSkipTLSVerify: true}, path: "/-/kubernetes-agent/"},
		// httptest's certificate is valid for example.com.
		{name: "server name", opts: KASClientOptions{CACertFile: caFile, TLSServerName: "example.com"}, path: "/-/kubernetes-agent/"},
		{name: "wrong server name", opts: KASClientOptions{CACertFile: caFile, TLSServerName: "kas.invalid"}, path: "/-/kubernetes-agent/", wantErr: true},
		{name: "redirect not followed", opts: KASClientOptions{CACertFile: caFile}, path: "/redirect", wantStatus: http.StatusFound, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, err := NewKASClient(tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer client.CloseIdleConnections()
			conn, resp, err := wsconn.Dial(context.Background(), wss+tt.path, wsconn.DialOptions{HTTPClient: client, Subprotocol: h2tunnel.Subprotocol})
			if tt.wantErr {
				if err == nil {
					conn.Close()
					t.Fatal("dial succeeded")
				}
				if tt.wantStatus != 0 && (resp == nil || resp.StatusCode != tt.wantStatus) {
					t.Errorf("response %v, want status %d", resp, tt.wantStatus)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			conn.Close()
			<-accepted
		})
	}
}

func TestNewKASClientErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.pem")
	writeFile(t, bad, []byte("not a certificate"))
	if _, err := NewKASClient(KASClientOptions{CACertFile: bad}); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Errorf("bad CA file: %v", err)
	}
	if _, err := NewKASClient(KASClientOptions{CACertFile: filepath.Join(dir, "missing.pem")}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing CA file: %v", err)
	}
}
