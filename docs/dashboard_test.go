package docs

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// TestDashboardMetricsExist checks every metric the Grafana dashboard and
// the guide's alerts query against what a real Caddy with our modules
// exposes: Caddy runs in this process, first in GitLab mode against a
// GitLab that refuses every credential, then in standalone mode, with
// requests that give every labelled metric a series; then its /metrics
// is scraped.
func TestDashboardMetricsExist(t *testing.T) {
	queries := dashboardQueries(t)
	queries = append(queries, alertQueries(t, readGuide(t))...)
	if len(queries) < 20 {
		t.Fatalf("found %d queries in the dashboard and the guide's alerts; the parsing is broken", len(queries))
	}
	exposed := scrapeCaddy(t)
	var used []string
	for _, q := range queries {
		for _, name := range metricNames(q) {
			used = append(used, name)
			if !exposed[name] && !prometheusSeries[name] {
				t.Errorf("%s is queried (%s) but Caddy does not expose it", name, q)
			}
		}
	}
	for _, name := range []string{"caddy_kas_agent_tunnels", "caddy_kas_gitlab_rate_limited_total", "caddy_http_request_duration_seconds_bucket", "process_open_fds"} {
		if !slices.Contains(used, name) {
			t.Errorf("the dashboard does not query %s", name)
		}
	}
}

// prometheusSeries are the series Prometheus makes itself for every
// scrape target, not the target's metrics.
var prometheusSeries = map[string]bool{"up": true, "scrape_duration_seconds": true}

// dashboardQueries returns the PromQL of every panel target and template
// variable of the dashboard.
func dashboardQueries(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dashboard any
	if err := json.Unmarshal(b, &dashboard); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	var queries []string
	var walk func(any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				s, isString := x.(string)
				switch {
				case k == "expr" && isString:
					queries = append(queries, s)
				case k == "query" && isString:
					queries = append(queries, labelValuesSelector(s))
				default:
					walk(x)
				}
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(dashboard)
	return queries
}

var labelValues = regexp.MustCompile(`^\s*label_values\(\s*(.+),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$`)

// labelValuesSelector returns the series selector of a Grafana
// label_values(<selector>, <label>) variable query.
func labelValuesSelector(query string) string {
	if m := labelValues.FindStringSubmatch(query); m != nil {
		return m[1]
	}
	return query
}

// alertQueries returns the expressions of the guide's alert table.
func alertQueries(t *testing.T, guide string) []string {
	t.Helper()
	var queries []string
	inTable := false
	sc := bufio.NewScanner(strings.NewReader(guide))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "| alert | expression |"):
			inTable = true
		case !strings.HasPrefix(line, "|"):
			inTable = false
		case inTable && !strings.HasPrefix(line, "|---"):
			cells := strings.Split(strings.ReplaceAll(line, `\|`, "\x00"), " | ")
			if len(cells) < 2 {
				t.Fatalf("alert row without an expression: %s", line)
			}
			expr := strings.Trim(strings.ReplaceAll(cells[1], "\x00", "|"), "`")
			queries = append(queries, expr)
		}
	}
	if len(queries) == 0 {
		t.Fatal("production.md has no alert table")
	}
	return queries
}

var (
	promString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	promMatchers = regexp.MustCompile(`\{[^}]*\}`)
	promRanges   = regexp.MustCompile(`\[[^\]]*\]`)
	promGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promIdent    = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*`)
	// promKeywords are PromQL's words that are neither metrics nor
	// functions.
	promKeywords = map[string]bool{
		"and": true, "or": true, "unless": true, "bool": true, "offset": true,
		"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
		"inf": true, "nan": true, "start": true, "end": true,
	}
)

// metricNames returns the metric names a PromQL expression selects: the
// identifiers left once strings, label matchers, ranges, grouping labels,
// Grafana variables, numbers, keywords and function names are taken out.
func metricNames(expr string) []string {
	s := promString.ReplaceAllString(expr, `""`)
	s = promMatchers.ReplaceAllString(s, " ")
	s = promRanges.ReplaceAllString(s, " ")
	s = promGrouping.ReplaceAllString(s, " ")
	var names []string
	for _, loc := range promIdent.FindAllStringIndex(s, -1) {
		name := s[loc[0]:loc[1]]
		if loc[0] > 0 {
			if prev := s[loc[0]-1]; prev == '$' || prev == '.' || (prev >= '0' && prev <= '9') {
				continue // a Grafana variable, or the exponent or unit of a number
			}
		}
		if strings.HasPrefix(strings.TrimLeft(s[loc[1]:], " \t\n"), "(") || promKeywords[strings.ToLower(name)] {
			continue // a function or aggregation, or a keyword
		}
		names = append(names, name)
	}
	return names
}

func TestMetricNames(t *testing.T) {
	tests := []struct {
		expr string
		want []string
	}{
		{`caddy_kas_agent_tunnels`, []string{"caddy_kas_agent_tunnels"}},
		{`sum by (reason) (rate(caddy_kas_agent_refusals_total{instance=~"$instance",reason!~"a|b"}[$__rate_interval]))`, []string{"caddy_kas_agent_refusals_total"}},
		{`histogram_quantile(0.99, sum by (le, path) (rate(x_bucket[5m])))`, []string{"x_bucket"}},
		{`a / on(instance) group_left(version) b offset 1h > 1e3`, []string{"a", "b"}},
		{`sum(rate(x[5m])) without (code) * 900 > bool y and z unless w`, []string{"x", "y", "z", "w"}},
		{`max_over_time(caddy_kas_agent_tunnels[1h:5m]) < 0.8 * caddy_kas_agent_tunnels`, []string{"caddy_kas_agent_tunnels", "caddy_kas_agent_tunnels"}},
		{`count(up{job="caddy-kas"} == 0)`, []string{"up"}},
	}
	for _, tt := range tests {
		if got := metricNames(tt.expr); !slices.Equal(got, tt.want) {
			t.Errorf("metricNames(%s) = %q, want %q", tt.expr, got, tt.want)
		}
	}
}

// scrapeCaddy runs Caddy with our modules in this process and returns
// every metric name its /metrics exposes, with the _bucket, _sum and
// _count series of histograms and summaries.
func scrapeCaddy(t *testing.T) map[string]bool {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
	secretFile := filepath.Join(dir, "gitlab_kas_secret")
	writeSecret(t, secretFile)
	// A GitLab that knows no credential: every check is a call, answered 401.
	refusing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, `{"message":"401 Unauthorized"}`)
	}))
	defer refusing.Close()
	site := "127.0.0.1:" + freePort(t)
	base := "http://" + site
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
	})

	// GitLab mode, with a bucket of one call to GitLab: the first
	// credential is checked (401), the second is rate limited (429).
	load(t, fmt.Sprintf(`{
	admin off
	metrics
	log {
		level ERROR
	}
	kas {
		gitlab {
			url %s
			secret_file %s
			api_rate_limit 0.001 1
			usage_reporting_period 0
		}
	}
}
http://%s {
	kubernetes_agent
	k8s_proxy
	metrics /metrics
}
`, refusing.URL, secretFile, site))
	get(t, base+"/-/kubernetes-agent/k8s-proxy/version", "pat:1:first", http.StatusUnauthorized)
	get(t, base+"/-/kubernetes-agent/k8s-proxy/version", "pat:1:second", http.StatusTooManyRequests)
	get(t, base+"/-/kubernetes-agent/", "", http.StatusBadRequest) // not a WebSocket: an agent refused

	// Standalone mode: a valid user token for an agent that is not
	// connected is routed (not_found) and refused with 502.
	load(t, fmt.Sprintf(`{
	admin off
	metrics
	log {
		level ERROR
	}
}
http://%s {
	kubernetes_agent {
		agent 1 dashboard-test {
			token agent-token-of-the-dashboard-test
		}
	}
	k8s_proxy {
		wait_for_agent 1ms
		user dashboard-test {
			token user-token-of-the-dashboard-test
			agents 1
		}
	}
	metrics /metrics
}
`, site))
	get(t, base+"/-/kubernetes-agent/k8s-proxy/version", "pat:1:user-token-of-the-dashboard-test", http.StatusBadGateway)

	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	names := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// "# TYPE <name> <type>" names every family, whatever its series.
		if len(f) != 4 || f[0] != "#" || f[1] != "TYPE" {
			continue
		}
		names[f[2]] = true
		switch f[3] {
		case "histogram":
			names[f[2]+"_bucket"], names[f[2]+"_sum"], names[f[2]+"_count"] = true, true, true
		case "summary":
			names[f[2]+"_sum"], names[f[2]+"_count"] = true, true
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return names
}

// writeSecret writes a GitLab shared secret file: the base64 of 32 random
// bytes.
func writeSecret(t *testing.T, file string) {
	t.Helper()
	secret := make([]byte, 32)
	rand.Read(secret)
	if err := os.WriteFile(file, []byte(base64.StdEncoding.EncodeToString(secret)), 0o600); err != nil {
		t.Fatal(err)
	}
}

// load adapts a Caddyfile and runs it, replacing the running config.
func load(t *testing.T, caddyfile string) {
	t.Helper()
	if err := caddy.Load([]byte(adapt(t, caddyfile)), true); err != nil {
		t.Fatalf("loading:\n%s\n%v", caddyfile, err)
	}
}

// get makes a GET with token as a bearer token (none if empty) and checks
// the status code.
func get(t *testing.T, url, token string, want int) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != want {
		t.Fatalf("GET %s: %d, want %d: %s", url, resp.StatusCode, want, body)
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, err := net.SplitHostPort(l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return port
}
