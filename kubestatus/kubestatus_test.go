package kubestatus

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
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

func TestRetryAfter(t *testing.T) {
	rec := httptest.NewRecorder()
	s := New(http.StatusServiceUnavailable, "busy")
	s.Details = &StatusDetails{RetryAfterSeconds: 3}
	Write(rec, s)
	if got := rec.Header().Get("Retry-After"); got != "3" {
		t.Errorf("Retry-After = %q, want 3", got)
	}
}
