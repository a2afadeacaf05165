package httpheader

import (
	"net/http"
	"reflect"
	"testing"
	"time"
)

func TestHasToken(t *testing.T) {
	h := http.Header{"Connection": {"keep-alive, Upgrade", "close"}}
	tests := []struct {
		token string
		want  bool
	}{{"upgrade", true}, {"UPGRADE", true}, {"close", true}, {"keep", false}, {"", false}}
	for _, tt := range tests {
		if got := HasToken(h, "Connection", tt.token); got != tt.want {
			t.Errorf("HasToken(%q) = %v, want %v", tt.token, got, tt.want)
		}
	}
}

func TestRemoveHopByHopAndCopy(t *testing.T) {
	src := http.Header{
		"Connection":           {"X-Private, keep-alive"},
		"X-Private":            {"1"},
		"Keep-Alive":           {"timeout=5"},
		"Transfer-Encoding":    {"chunked"},
		"Upgrade":              {"SPDY/3.1"},
		"Content-Type":         {"application/json"},
		"Sec-Websocket-Accept": {"abc"},
	}
	dst := http.Header{"Content-Type": {"text/plain"}}
	CopyEndToEnd(dst, src)
	want := http.Header{"Content-Type": {"text/plain", "application/json"}, "Sec-Websocket-Accept": {"abc"}}
	if !reflect.DeepEqual(dst, want) {
		t.Errorf("CopyEndToEnd: %v, want %v", dst, want)
	}
	if len(src) != 7 {
		t.Error("CopyEndToEnd modified its source")
	}
	RemoveHopByHop(src)
	if !reflect.DeepEqual(src, http.Header{"Content-Type": {"application/json"}, "Sec-Websocket-Accept": {"abc"}}) {
		t.Errorf("RemoveHopByHop left %v", src)
	}
}

func TestRetryAfterSeconds(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want int
	}{
		{0, 1}, {-time.Second, 1}, {time.Nanosecond, 1}, {20 * time.Millisecond, 1}, {time.Second, 1},
		{time.Second + time.Nanosecond, 2}, {59500 * time.Millisecond, 60}, {time.Minute, 60},
	}
	for _, tt := range tests {
		if got := RetryAfterSeconds(tt.d); got != tt.want {
			t.Errorf("RetryAfterSeconds(%v) = %d, want %d", tt.d, got, tt.want)
		}
	}
}

func TestIsHopByHop(t *testing.T) {
	h := http.Header{"Connection": {"X-Hop, keep-alive"}}
	for name, want := range map[string]bool{
		"Transfer-Encoding": true, "upgrade": true, "X-Hop": true, "x-hop": true,
		"Content-Type": false, "X-Other": false,
	} {
		if got := IsHopByHop(h, name); got != want {
			t.Errorf("IsHopByHop(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestStreamed(t *testing.T) {
	tests := []struct {
		contentType string
		length      int64
		want        bool
	}{
		{"application/json", 1024, false},
		{"application/json", 0, false},
		{"application/json", -1, true},
		{"", -1, true},
		{"text/event-stream", 1024, true},
		{"Text/Event-Stream; charset=utf-8", 1024, true},
		{"text/event-streams", 1024, false},
	}
	for _, tt := range tests {
		h := http.Header{}
		if tt.contentType != "" {
			h.Set("Content-Type", tt.contentType)
		}
		if got := Streamed(h, tt.length); got != tt.want {
			t.Errorf("Streamed(%q, %d) = %v, want %v", tt.contentType, tt.length, got, tt.want)
		}
	}
}
