package kubeproxy

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"
)

// FuzzParseCredential checks that ParseCredential never panics, that it
// refuses with an [*Error] of code 401 and nothing else, and that what it
// accepts says exactly what the header said: encoded again, the
// credential is the header it came from (the scheme compared without
// case, as RFC 9110 §11.1 has it). Two spellings of one credential, such
// as agent ids "1" and "01", would be two cache keys and two log lines for
// one client.
func FuzzParseCredential(f *testing.F) {
	for _, v := range []string{
		"Bearer pat:5:glpat-abc", "Bearer ci:12:job-token", "Bearer pat:5:a:b:c", "bearer pat:5:x", "BEARER ci:1:t",
		"Basic dXNlcjpwYXNz", "Bearer sometoken", "Bearer oidc:5:x", "Bearer pat:five:x", "Bearer pat:-5:x",
		"Bearer pat:5:", "Bear", "", "Bearer ", "Bearer ::", "Bearer pat::x", "Bearer pat:0:x",
		"Bearer pat:9223372036854775807:x", "Bearer pat:9223372036854775808:x", "Bearer  pat:1:x",
		"Bearer pat:1:x y", "Bearer\tpat:1:x", "Bearer pat:1:\x00",
	} {
		f.Add(v, "", false)
	}
	f.Add("Bearer pat:5:x", "Bearer pat:5:x", true)
	f.Fuzz(func(t *testing.T, value, second string, two bool) {
		h := http.Header{"Authorization": {value}}
		if two {
			h.Add("Authorization", second)
		}
		cred, err := ParseCredential(h)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Code != http.StatusUnauthorized {
				t.Fatalf("ParseCredential(%q) = %v (%T), want an *Error with code 401", h.Values("Authorization"), err, err)
			}
			if cred != (Credential{}) {
				t.Fatalf("refused, yet returned %+v", cred)
			}
			return
		}
		if two {
			t.Fatalf("accepted two Authorization headers: %+v", cred)
		}
		const scheme = "Bearer "
		again := string(cred.Kind) + ":" + strconv.FormatInt(cred.AgentID, 10) + ":" + cred.Token
		if len(value) < len(scheme) || !strings.EqualFold(value[:len(scheme)], scheme) || value[len(scheme):] != again {
			t.Fatalf("ParseCredential(%q) = %+v, which is %q again", value, cred, scheme+again)
		}
		if cred.AgentID <= 0 || cred.Token == "" || (cred.Kind != KindPAT && cred.Kind != KindCIJob) {
			t.Fatalf("accepted %+v", cred)
		}
	})
}
