package kubeproxy

import (
	"net/http"
	"reflect"
	"testing"
)

// A client's copy of a tunnel protocol's own headers (Kas-* for ours) is
// that protocol's to remove: h2tunnel's TestEncodingDropsForgedHeaders.
func TestOutboundHeader(t *testing.T) {
	in := http.Header{
		"Accept":              {"application/json"},
		"Content-Type":        {"application/apply-patch+yaml"},
		"Authorization":       {"Bearer pat:1:secret"},
		"Cookie":              {"_gitlab_kas=secret"},
		"Gitlab-Agent-Id":     {"1"},
		"X-Csrf-Token":        {"secret"},
		"Connection":          {"keep-alive, X-Hop"},
		"X-Hop":               {"per-connection"},
		"Keep-Alive":          {"timeout=5"},
		"Proxy-Authorization": {"Basic secret"},
		"Te":                  {"trailers"},
		"Transfer-Encoding":   {"chunked"},
		"Upgrade":             {"h2c"},
		"Impersonate-User":    {"root"},
		"Impersonate-Group":   {"system:masters"},
		"Impersonate-Extra-X": {"y"},
		"X-Real-Ip":           {"10.0.0.1"},
		"X-Forwarded-For":     {"10.0.0.2, 10.0.0.3"},
		"X-Forwarded-Host":    {"kas.example.com"},
		"X-Forwarded-Proto":   {"https"},
		"X-Forwarded-Port":    {"443"},
		"X-Forwarded-Prefix":  {"/k8s"},
		"Forwarded":           {"for=10.0.0.4;proto=https"},
		"x-forwarded-for":     {"10.0.0.5"}, // not canonical: a map built by hand
	}
	tests := []struct {
		name              string
		keepImpersonation bool
		want              http.Header
	}{
		{"impersonation dropped", false, http.Header{
			"Accept":       {"application/json"},
			"Content-Type": {"application/apply-patch+yaml"},
		}},
		{"impersonation allowed", true, http.Header{
			"Accept":              {"application/json"},
			"Content-Type":        {"application/apply-patch+yaml"},
			"Impersonate-User":    {"root"},
			"Impersonate-Group":   {"system:masters"},
			"Impersonate-Extra-X": {"y"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := in.Clone()
			got := outboundHeader(in, tt.keepImpersonation)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got  %v\nwant %v", got, tt.want)
			}
			if !reflect.DeepEqual(in, before) {
				t.Error("the client's header map was modified")
			}
		})
	}
}

func TestSanitizeQuery(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"watch=true", "watch=true"},
		{"gitlab-agent-id=5", ""},
		{"labelSelector=a%3Db&gitlab-agent-id=5&gitlab-csrf-token=x&watch=1", "labelSelector=a%3Db&watch=1"},
		{"gitlab%2Dagent%2Did=5&limit=500", "limit=500"}, // escaped key is still the credential
		{"b=2&a=1", "b=2&a=1"}, // order kept
		{"fieldSelector=metadata.name%3Dfoo", "fieldSelector=metadata.name%3Dfoo"},
	}
	for _, tt := range tests {
		if got := sanitizeQuery(tt.in); got != tt.want {
			t.Errorf("sanitizeQuery(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
