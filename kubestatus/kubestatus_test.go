package kubestatus

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
)

func TestWrite(t *testing.T) {
	tests := []struct {
		code       int
		wantReason string
	}{
		{http.StatusUnauthorized, "Unauthorized"},
		{http.StatusForbidden, "Forbidden"},
		{http.StatusBadRequest, "BadRequest"},
		{http.StatusBadGateway, ""},
		{http.StatusServiceUnavailable, "ServiceUnavailable"},
	}
	for _, tt := range tests {
		rec := httptest.NewRecorder()
		rec.Header().Set("Gitlab-Unauthorized", "true")
		Error(rec, tt.code, "no valid credentials")
		if rec.Code != tt.code {
			t.Errorf("code %d: wrote %d", tt.code, rec.Code)
		}
		if got := rec.Header().Get("Content-Type"); got != "application/json" {
			t.Errorf("code %d: content type %q", tt.code, got)
		}
		if rec.Header().Get("Gitlab-Unauthorized") != "true" {
			t.Errorf("code %d: header set before Write was lost", tt.code)
		}
		var got map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatal(err)
		}
		want := map[string]any{
			"kind": "Status", "apiVersion": "v1", "metadata": map[string]any{}, "status": "Failure",
			"message": "GitLab Agent Server: no valid credentials", "code": float64(tt.code),
		}
		if tt.wantReason != "" {
			want["reason"] = tt.wantReason
		}
		if len(got) != len(want) {
			t.Errorf("code %d: body %v, want %v", tt.code, got, want)
		}
		for k, v := range want {
			if g, ok := got[k]; !ok || (k != "metadata" && g != v) {
				t.Errorf("code %d: %s = %v, want %v", tt.code, k, g, v)
			}
		}
	}
}

func TestWriteFor(t *testing.T) {
	tests := []struct {
		path            string
		wantContentType string
	}{
		{"/api", "text/plain; charset=utf-8"},
		{"/apis", "text/plain; charset=utf-8"},
		{"/version", "text/plain; charset=utf-8"},
		{"/openapi/v2", "text/plain; charset=utf-8"},
		{"/openapi/v3/apis/apps/v1", "text/plain; charset=utf-8"},
		{"/api/v1", "application/json"},
		{"/apis/apps/v1/deployments", "application/json"},
		{"/versions", "application/json"},
	}
	for _, tt := range tests {
		rec := httptest.NewRecorder()
		s := New(http.StatusTooManyRequests, "slow down")
		s.Details = &StatusDetails{RetryAfterSeconds: 2}
		WriteFor(rec, tt.path, s)
		h := rec.Header()
		if got := h.Get("Content-Type"); got != tt.wantContentType {
			t.Errorf("%s: Content-Type %q, want %q", tt.path, got, tt.wantContentType)
		}
		if rec.Code != http.StatusTooManyRequests || h.Get("Retry-After") != "2" || h.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s: %d with headers %v", tt.path, rec.Code, h)
		}
		if tt.wantContentType == "application/json" {
			continue
		}
		if got, want := rec.Body.String(), "GitLab Agent Server: slow down\n"; got != want || h.Get("Content-Length") != strconv.Itoa(len(want)) {
			t.Errorf("%s: body %q (Content-Length %s), want %q", tt.path, got, h.Get("Content-Length"), want)
		}
	}
}

func TestRetryAfter(t *testing.T) {
	rec := httptest.NewRecorder()
	s := New(http.StatusServiceUnavailable, "busy")
	s.Details = &StatusDetails{RetryAfterSeconds: 3}
	Write(rec, s)
	if got := rec.Header().Get("Retry-After"); got != "3" {
		t.Errorf("Retry-After = %q, want 3", got)
	}
}

// TestClientGoShowsMessage checks with Kubernetes' own Go client (what
// kubectl is built on) that the message of an error reaches the client's
// error on both kinds of path: the ones its discovery client reads raw,
// and the ones where it decodes a Status. The calls are those of
// client-go's discovery client.
func TestClientGoShowsMessage(t *testing.T) {
	const message = "agent 1 is not connected"
	var write func(http.ResponseWriter, string, *Status)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		write(w, r.URL.Path, New(http.StatusBadGateway, message))
	}))
	defer srv.Close()
	scheme := runtime.NewScheme()
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	client, err := rest.UnversionedRESTClientFor(&rest.Config{Host: srv.URL, ContentConfig: rest.ContentConfig{
		NegotiatedSerializer: serializer.NewCodecFactory(scheme).WithoutConversion(),
	}})
	if err != nil {
		t.Fatal(err)
	}
	raw := func(path string) func() error {
		return func() error { _, err := client.Get().AbsPath(path).Do(context.Background()).Raw(); return err }
	}
	calls := []struct {
		path string
		call func() error
	}{
		{"/api", raw("/api")},
		{"/apis", raw("/apis")},
		{"/version", raw("/version")},
		{"/openapi/v2", raw("/openapi/v2")},
		{"/openapi/v3/apis/apps/v1", raw("/openapi/v3/apis/apps/v1")},
		{"/api/v1", func() error {
			return client.Get().AbsPath("/api/v1").Do(context.Background()).Into(&metav1.APIResourceList{})
		}},
	}
	writers := []struct {
		name        string
		write       func(http.ResponseWriter, string, *Status)
		wantMessage func(path string) bool
	}{
		{"WriteFor", WriteFor, func(string) bool { return true }},
		// The reason for WriteFor: a JSON Status is lost on the paths
		// client-go reads raw.
		{"Write", func(w http.ResponseWriter, _ string, s *Status) { Write(w, s) }, func(path string) bool { return !ReadsRaw(path) }},
	}
	for _, wr := range writers {
		for _, c := range calls {
			t.Run(wr.name+c.path, func(t *testing.T) {
				write = wr.write
				err := c.call()
				if err == nil {
					t.Fatal("no error")
				}
				if got, want := strings.Contains(err.Error(), MessagePrefix+message), wr.wantMessage(c.path); got != want {
					t.Errorf("client-go error %q: shows the message: %v, want %v", err, got, want)
				}
			})
		}
	}
}
