package integration

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// gitlabPaths are the GitLab API paths the agent server calls.
var gitlabPaths = []string{fakegitlab.PathAgentInfo, fakegitlab.PathAllowedAgents, fakegitlab.PathAuthorizeProxyUser, fakegitlab.PathUsageMetrics, fakegitlab.PathAgentConfiguration}

// gitlabCalls is how many calls the fake GitLab has had, on every path.
func (e *gitlabEnv) gitlabCalls() int {
	n := 0
	for _, p := range gitlabPaths {
		n += e.gitlab.Calls(p)
	}
	return n
}

// probeAnswer is how the agent server answered one made-up credential.
type probeAnswer struct {
	agent      bool // the agent endpoint; else the Kubernetes API proxy
	code       int
	retryAfter string
	problem    string // what is wrong with the answer, if anything
}

// TestGitLabRateLimit is the probe of the issue: 500 agentk handshakes
// with made-up agent tokens and 500 proxy requests with made-up personal
// access tokens, all at once. GitLab gets at most the api_rate_limit's
// bucket of calls plus what the bucket regains while the probe runs; every
// other request is answered 429 with Retry-After, without a call. Once the
// bucket has refilled, a new agent connects and a user's kubectl works.
func TestGitLabRateLimit(t *testing.T) {
	s := requireSuite(t)
	tests := []struct {
		name           string
		setting        string // the Caddyfile line; empty: none
		refill, bucket int
	}{
		{"GitLab's defaults", "", 50, 250},
		{"api_rate_limit 10 50", "api_rate_limit 10 50", 10, 50},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			extra := []string{"usage_reporting_period 0"} // only the probe calls GitLab meanwhile
			if tt.setting != "" {
				extra = append(extra, tt.setting)
			}
			e := startGitLabEnv(t, s, gitlabEnvOptions{extra: extra, config: glUserAccessAgent})
			e.probeRateLimit(t, tt.refill, tt.bucket)
			e.worksAfterProbe(t)
		})
	}
}

// probeRateLimit sends the probe to e, whose api_rate_limit is refill
// calls a second and a bucket of bucket calls, and checks the answers,
// the calls GitLab got, and the metrics.
func (e *gitlabEnv) probeRateLimit(t *testing.T, refill, bucket int) {
	t.Helper()
	const (
		probes  = 500 // of each kind
		workers = 16
	)
	agentClient := e.caddy.http1Client(t) // WebSocket handshakes are HTTP/1.1
	proxyClient := e.caddy.httpClient(t)
	before := e.gitlabCalls()
	metricsBefore := e.caddy.scrapeMetrics(t)

	kinds := make([]bool, 0, 2*probes) // true: an agent handshake
	for i := range 2 * probes {
		kinds = append(kinds, i < probes)
	}
	rand.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	jobs := make(chan bool)
	answers := make(chan probeAnswer, len(kinds))
	var wg sync.WaitGroup
	start := time.Now()
	for range workers {
		wg.Go(func() {
			for agent := range jobs {
				if agent {
					answers <- e.caddy.probeAgentEndpoint(agentClient)
				} else {
					answers <- e.caddy.probeProxy(proxyClient)
				}
			}
		})
	}
	for _, k := range kinds {
		jobs <- k
	}
	close(jobs)
	wg.Wait()
	elapsed := time.Since(start)
	close(answers)

	// The bucket holds at most bucket calls when the probe starts, and
	// regains refill a second while it runs.
	made := e.gitlabCalls() - before
	bound := bucket + int(math.Ceil(float64(refill)*elapsed.Seconds()))
	counts := map[string]int{} // "agent 401", "proxy 429", …
	problems := map[string]int{}
	for a := range answers {
		kind := "proxy"
		if a.agent {
			kind = "agent"
		}
		counts[fmt.Sprintf("%s %d", kind, a.code)]++
		if a.problem != "" {
			problems[kind+": "+a.problem]++
		}
	}
	t.Logf("%d requests with made-up credentials in %v: %d GitLab calls (bound %d = bucket %d + %d/s × elapsed); answers %v",
		2*probes, elapsed.Round(time.Millisecond), made, bound, bucket, refill, counts)
	for p, n := range problems {
		t.Errorf("%d answers: %s", n, p)
	}
	if made > bound {
		t.Errorf("GitLab got %d calls, want at most %d", made, bound)
	}
	// Each call GitLab answered 401 became a 401; nothing else got one.
	refused := counts["agent 401"] + counts["proxy 401"]
	limited := counts["agent 429"] + counts["proxy 429"]
	if refused != made || limited != 2*probes-made {
		t.Errorf("%d answers 401 and %d answers 429 for %d GitLab calls; want a 401 for each call and a 429 for every other request", refused, limited, made)
	}

	metrics := e.caddy.scrapeMetrics(t)
	for _, m := range []struct {
		series string
		want   int
	}{
		{`caddy_kas_gitlab_rate_limited_total{path="` + fakegitlab.PathAgentInfo + `"}`, counts["agent 429"]},
		{`caddy_kas_gitlab_rate_limited_total{path="` + fakegitlab.PathAuthorizeProxyUser + `"}`, counts["proxy 429"]},
		{`caddy_kas_agent_refusals_total{reason="authentication rate limited"}`, counts["agent 429"]},
		{`caddy_kas_k8s_proxy_refusals_total{code="429"}`, counts["proxy 429"]},
	} {
		if got := metrics[m.series] - metricsBefore[m.series]; got != float64(m.want) {
			t.Errorf("%s went up by %v, want %d", m.series, got, m.want)
		}
	}
}

// worksAfterProbe checks that once the bucket has room again GitLab is
// asked as usual: a new agent connects (its agentk backs off meanwhile, if
// its first handshakes get 429), and a user's PAT works.
func (e *gitlabEnv) worksAfterProbe(t *testing.T) {
	t.Helper()
	const newAgentID = 12
	newToken := kubetest.NewToken("agent token of the agent connecting after the probe")
	e.gitlab.AddAgent(fakegitlab.Agent{ID: newAgentID, ProjectID: glProjectID, Name: "after-the-probe", Token: newToken, ProjectPath: glProjectPath})
	e.caddy.startAgentk(t, agentkOptions{agentID: newAgentID, token: newToken}).waitReady(t)
	pat := kubetest.NewToken("personal access token used after the probe")
	e.gitlab.AddPersonalAccessToken(glMaria.Username, pat, "k8s_proxy")
	header := http.Header{"Authorization": {"Bearer " + patToken(glAgentID, pat)}}
	err := kubetest.Eventually(time.Minute, func() error {
		resp, body := e.caddy.proxyGet(t, "version", header)
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET version with a valid PAT: %s %s", resp.Status, kubetest.Redact(string(body)))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if who := e.caddy.kubectlWithToken(t, "after-probe", patToken(glAgentID, pat)).whoami(t); who.Username != adminUser {
		t.Errorf("whoami %q after the probe, want the agent's %q", who.Username, adminUser)
	}
}

// http1Client is like httpClient but speaks HTTP/1.1 only, as agentk does
// for its WebSocket handshake.
func (c *caddyServer) http1Client(t testing.TB) *http.Client {
	t.Helper()
	pool, err := kubetest.CertPoolFromFile(c.rootCAFile())
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool},
		// A non-nil empty map turns HTTP/2 off.
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConnsPerHost: 64,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Timeout: httpTimeout, Transport: tr}
}

// probeAgentEndpoint sends our agentk's WebSocket handshake with a
// made-up agent token and checks the refusal: 401, or 429 with
// Retry-After.
func (c *caddyServer) probeAgentEndpoint(client *http.Client) probeAnswer {
	a := probeAnswer{agent: true}
	req, err := http.NewRequest(http.MethodGet, strings.Replace(c.agentURL(), "wss://", "https://", 1), nil)
	if err != nil {
		a.problem = err.Error()
		return a
	}
	key := make([]byte, 16)
	for i := range key {
		key[i] = byte(rand.N(256))
	}
	req.Header = http.Header{
		"Connection":             {"Upgrade"},
		"Upgrade":                {"websocket"},
		"Sec-Websocket-Version":  {"13"},
		"Sec-Websocket-Key":      {base64.StdEncoding.EncodeToString(key)},
		"Sec-Websocket-Protocol": {"caddy-kas.tunnel.v1"},
		"Authorization":          {"Bearer probe-" + kubetest.RandomHex(20)},
	}
	resp, err := client.Do(req)
	if err != nil {
		a.problem = "no answer"
		return a
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	a.code, a.retryAfter = resp.StatusCode, resp.Header.Get("Retry-After")
	a.problem = checkProbeAnswer(a.code, a.retryAfter)
	return a
}

// probeProxy sends a Kubernetes API request with a made-up personal access
// token and checks the refusal: a Status of 401, or of 429 (reason
// TooManyRequests) with Retry-After and the same retryAfterSeconds.
func (c *caddyServer) probeProxy(client *http.Client) probeAnswer {
	var a probeAnswer
	req, err := http.NewRequest(http.MethodGet, c.proxyURL()+"api/v1", nil)
	if err != nil {
		a.problem = err.Error()
		return a
	}
	req.Header.Set("Authorization", "Bearer "+patToken(glAgentID, "probe-"+kubetest.RandomHex(20)))
	resp, err := client.Do(req)
	if err != nil {
		a.problem = "no answer"
		return a
	}
	defer resp.Body.Close()
	a.code, a.retryAfter = resp.StatusCode, resp.Header.Get("Retry-After")
	if a.problem = checkProbeAnswer(a.code, a.retryAfter); a.problem != "" {
		return a
	}
	var st struct {
		Kind    string `json:"kind"`
		Code    int    `json:"code"`
		Reason  string `json:"reason"`
		Details struct {
			RetryAfterSeconds int `json:"retryAfterSeconds"`
		} `json:"details"`
	}
	switch err := json.NewDecoder(resp.Body).Decode(&st); {
	case err != nil || st.Kind != "Status" || st.Code != a.code:
		a.problem = "not a Status of its code"
	case a.code == http.StatusTooManyRequests && (st.Reason != "TooManyRequests" || strconv.Itoa(st.Details.RetryAfterSeconds) != a.retryAfter):
		a.problem = "429 Status without reason TooManyRequests and retryAfterSeconds as in Retry-After"
	}
	return a
}

// checkProbeAnswer says what is wrong with the answer to a made-up
// credential: only 401, and 429 with a Retry-After of whole seconds, will
// do.
func checkProbeAnswer(code int, retryAfter string) string {
	switch code {
	case http.StatusUnauthorized:
		return ""
	case http.StatusTooManyRequests:
		if n, err := strconv.Atoi(retryAfter); err != nil || n < 1 {
			return fmt.Sprintf("429 with Retry-After %q", retryAfter)
		}
		return ""
	}
	return fmt.Sprintf("status %d", code)
}

// scrapeMetrics reads Caddy's admin /metrics: the value of every series,
// by its name and labels as the text format writes them.
func (c *caddyServer) scrapeMetrics(t testing.TB) map[string]float64 {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://localhost:%d/metrics", c.adminPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestGitLabRateLimitAgentsBackOff: agents whose token cannot be checked
// for the api_rate_limit back off rather than retry at once, ours (429)
// and GitLab's (gRPC Unavailable) alike, and connect once the bucket
// regains a call for them. The limit is one call every 5 s, spent before
// the agents start.
func TestGitLabRateLimitAgentsBackOff(t *testing.T) {
	s := requireGitLabAgentk(t)
	const perCall = 5 * time.Second
	e := startGitLabEnv(t, s, gitlabEnvOptions{noAgentk: true, extra: []string{
		fmt.Sprintf("api_rate_limit %v 1", float64(time.Second)/float64(perCall)),
		"usage_reporting_period 0",
	}})
	// The one call the bucket holds goes to a made-up token.
	if a := e.caddy.probeProxy(e.caddy.httpClient(t)); a.code != http.StatusUnauthorized || a.problem != "" {
		t.Fatalf("first made-up token: %d %s, want 401", a.code, a.problem)
	}
	const gitlabAgentID = 12
	gitlabAgentToken := kubetest.NewToken("agent token of GitLab's agentk")
	e.gitlab.AddAgent(fakegitlab.Agent{ID: gitlabAgentID, ProjectID: glProjectID, Name: "gitlab-agentk", Token: gitlabAgentToken, ProjectPath: glProjectPath})

	start := time.Now()
	ours := e.caddy.startAgentk(t, agentkOptions{agentID: glAgentID, token: e.agentToken})
	theirs := e.caddy.startGitLabAgentk(t, gitlabAgentkOptions{agentID: gitlabAgentID, token: gitlabAgentToken})
	ours.waitReady(t)
	// waitConnected's request through GitLab's agentk waits for its
	// agent's tunnel first, then for the bucket to check the job token of
	// a job in the agents' configuration project, which may use them.
	job := fakegitlab.Job{JobID: 4301, PipelineID: 531, ProjectID: glProjectID, Username: glDeployBot.Username,
		Token: kubetest.NewToken("job token for GitLab's agentk's agent")}
	e.gitlab.AddJob(job)
	theirs.waitConnected(t, fmt.Sprintf("Bearer ci:%d:%s", gitlabAgentID, job.Token))
	elapsed := time.Since(start)

	// Each refusal is counted in the metrics (the log has a line per
	// reason a minute); GitLab's agentk's are the ones logged with its
	// protocol.
	total := int(e.caddy.scrapeMetrics(t)[`caddy_kas_agent_refusals_total{reason="authentication rate limited"}`])
	grpcLogged := countLogEntries(e.caddy.proc.Stderr(), map[string]string{"msg": "agent refused", "reason": "authentication rate limited", "protocol": wsTunnelProtocol})
	t.Logf("both agents connected after %v: %d refusals for the rate limit in all; %d GitLab calls",
		elapsed.Round(time.Millisecond), total, e.gitlabCalls())
	// Retrying at once would make thousands of attempts in that time; with
	// a backoff of 1 s growing to 20 s, a loop makes a few. GitLab's agentk
	// runs several loops (tunnel streams, Register, GetConfiguration).
	seconds := int(elapsed / time.Second)
	if maxRefusals := (seconds + 5) + (10*seconds + 20); total > maxRefusals {
		t.Errorf("the agents were refused %d times in %v, want at most %d: they do not back off", total, elapsed, maxRefusals)
	}
	if grpcLogged == 0 {
		t.Error("GitLab's agentk was never refused for the rate limit: the test did not test it")
	}
	if total == 0 {
		t.Error("no agent was refused for the rate limit: the test did not test it")
	}
}
