package integration

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// These tests stream large and endless bodies through Caddy and GitLab's
// agentk, over both of its ways in (wss:// and grpcs://). Its cluster is
// streamUpstream: the real kube-apiserver, with a few paths of its own that
// take or give any amount of data.

// gitlabAgentkWays are GitLab's agentk over each of its ways in.
var gitlabAgentkWays = []streamingAgent{gitlabAgentkWSS, gitlabAgentkGRPCS}

const (
	// uploadPath takes a PUT of any size and answers with what it read.
	uploadPath = "/kas-it/upload"
	// endlessPath answers a GET with endlessPattern until the client goes.
	endlessPath = "/kas-it/endless"
	// pingPath answers a GET of pingPath/<n> with "pong <n>" when the
	// request has the agent's own credentials.
	pingPath = "/kas-it/ping/"
)

// uploadResult is what uploadPath answers.
type uploadResult struct {
	Bytes  int64  `json:"bytes"`
	SHA256 string `json:"sha256"`
}

// streamUpstream is an HTTPS server in front of the test kube-apiserver
// for GitLab's agentk: it serves uploadPath, endlessPath and pingPath
// itself and passes every other request on (agentk's own calls, the
// readiness probe of waitConnected).
type streamUpstream struct {
	server *httptest.Server
	// endlessWritten counts the bytes the endless handlers wrote.
	endlessWritten atomic.Int64
	// endlessActive counts the endless handlers that have not returned.
	endlessActive atomic.Int64
}

func startStreamUpstream(t *testing.T, s *suite) *streamUpstream {
	t.Helper()
	apiURL, err := url.Parse(s.cluster.URL)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := kubetest.CertPoolFromFile(s.cluster.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig.RootCAs = pool
	t.Cleanup(transport.CloseIdleConnections)
	u := &streamUpstream{}
	proxy := &httputil.ReverseProxy{
		Rewrite:       func(r *httputil.ProxyRequest) { r.SetURL(apiURL) },
		Transport:     transport,
		FlushInterval: -1, // watches go out as they come
		ErrorLog:      log.New(io.Discard, "", 0),
	}
	mux := http.NewServeMux()
	mux.Handle("/", proxy)
	mux.HandleFunc("PUT "+uploadPath, func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, fmt.Sprintf("read after %d bytes: %v", n, err), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(uploadResult{Bytes: n, SHA256: hex.EncodeToString(h.Sum(nil))})
	})
	mux.HandleFunc("GET "+endlessPath, func(w http.ResponseWriter, r *http.Request) {
		u.endlessActive.Add(1)
		defer u.endlessActive.Add(-1)
		w.Header().Set("Content-Type", "application/octet-stream")
		flusher := w.(http.Flusher)
		block := make([]byte, endlessBlock)
		for offset := int64(0); ; offset += endlessBlock {
			endlessPattern(block, offset)
			n, err := w.Write(block)
			u.endlessWritten.Add(int64(n))
			if err != nil {
				return // the client went away
			}
			flusher.Flush()
		}
	})
	agentAuth := "Bearer " + s.cluster.Tokens[adminUser] // see writeKubeconfig
	mux.HandleFunc("GET "+pingPath+"{n}", func(w http.ResponseWriter, r *http.Request) {
		// the client's token stays in Caddy; agentk sends its own
		if r.Header.Get("Authorization") != agentAuth {
			http.Error(w, "not the agent's credentials", http.StatusUnauthorized)
			return
		}
		fmt.Fprintf(w, "pong %s", r.PathValue("n"))
	})
	u.server = httptest.NewUnstartedServer(mux)
	u.server.EnableHTTP2 = true
	u.server.Config.ErrorLog = log.New(io.Discard, "", 0)
	u.server.StartTLS()
	t.Cleanup(u.server.Close)
	return u
}

// writeKubeconfig writes a kubeconfig for GitLab's agentk that reaches u
// with the admin's token, in a context named adminUser.
func (u *streamUpstream) writeKubeconfig(t *testing.T, s *suite, dir string) string {
	t.Helper()
	caFile := filepath.Join(dir, "stream-upstream-ca.crt")
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: u.server.Certificate().Raw})
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "stream-upstream-kubeconfig")
	users := []kubetest.KubeconfigUser{{Name: adminUser, Token: s.cluster.Tokens[adminUser]}}
	if err := kubetest.WriteKubeconfig(path, u.server.URL, caFile, users); err != nil {
		t.Fatal(err)
	}
	return path
}

// endlessBlock is the size of the endless handler's writes.
const endlessBlock = 32 << 10

// endlessPattern fills b with the bytes of the endless stream from offset
// on (offset and len(b) multiples of 8): each 8-byte word is its own
// offset, so a lost, repeated or reordered byte shows.
func endlessPattern(b []byte, offset int64) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.BigEndian.PutUint64(b[i:], uint64(offset)+uint64(i))
	}
}

// readEndless reads n bytes (a multiple of 8) of the endless stream from
// offset on and checks them.
func readEndless(r io.Reader, offset, n int64) error {
	got := make([]byte, n)
	if read, err := io.ReadFull(r, got); err != nil {
		return fmt.Errorf("read %d of %d bytes at offset %d: %w", read, n, offset, err)
	}
	want := make([]byte, n)
	endlessPattern(want, offset)
	if !bytes.Equal(got, want) {
		return fmt.Errorf("the %d bytes at offset %d differ from what the upstream wrote", n, offset)
	}
	return nil
}

// gitlabAgentkStreamSetup is Caddy and GitLab's agentk for agent 1 in
// front of a streamUpstream.
type gitlabAgentkStreamSetup struct {
	kas      *caddyServer
	agent    *gitlabAgentk
	upstream *streamUpstream
	auth     string // the Authorization of user ops for agent 1
}

func newGitLabAgentkStreamSetup(t *testing.T, agent streamingAgent) *gitlabAgentkStreamSetup {
	t.Helper()
	s := requireGitLabAgentk(t)
	upstream := startStreamUpstream(t, s)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	st := &gitlabAgentkStreamSetup{kas: kas, upstream: upstream, auth: "Bearer " + patToken(1, config.user(t, "ops").token)}
	st.agent = kas.startGitLabAgentk(t, gitlabAgentkOptions{agentID: 1, kubeconfig: upstream.writeKubeconfig(t, s, kas.dir), grpc: agent.grpc})
	st.agent.waitConnected(t, st.auth)
	return st
}

// request makes a request for path through Caddy's k8s proxy as user ops.
func (st *gitlabAgentkStreamSetup) request(method, path string, body io.Reader) (*http.Request, error) {
	req, err := http.NewRequest(method, strings.TrimSuffix(st.kas.proxyURL(), "/")+path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", st.auth)
	return req, nil
}

// procStatusKiB reads a field in kB (VmRSS, VmHWM) of /proc/<pid>/status.
func procStatusKiB(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	lines := bufio.NewScanner(f)
	for lines.Scan() {
		name, value, ok := strings.Cut(lines.Text(), ":")
		if !ok || name != field {
			continue
		}
		return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(value), " kB"), 10, 64)
	}
	if err := lines.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, field)
}

// resetPeakRSS makes the process's VmHWM its current RSS (Linux's
// clear_refs "5"), so that VmHWM afterwards is the peak since the reset.
func resetPeakRSS(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// uploadBody is size bytes of a deterministic pseudo-random stream that is
// hashed as it is read.
type uploadBody struct {
	rng  *rand.ChaCha8
	left int64
	hash io.Writer
}

func (b *uploadBody) Read(p []byte) (int, error) {
	if b.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	b.rng.Read(p)
	b.hash.Write(p)
	b.left -= int64(len(p))
	return len(p), nil
}

// TestGitLabAgentkLargeUploadBoundedMemory: a 200 MiB PUT streams through
// Caddy and GitLab's agentk to the cluster, intact, while Caddy's memory
// stays far below the body's size.
func TestGitLabAgentkLargeUploadBoundedMemory(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/proc/self/status"); err != nil {
		t.Skipf("no /proc to read Caddy's memory from: %v", err)
	}
	forEachAgent(t, gitlabAgentkWays, testLargeUploadBoundedMemory)
}

func testLargeUploadBoundedMemory(t *testing.T, agent streamingAgent) {
	st := newGitLabAgentkStreamSetup(t, agent)
	const size = 200 << 20
	// memoryBound is how much Caddy's resident memory may grow during the
	// upload. A server that held the body grows by the body's size
	// (200 MiB) at least. One that streams holds a few flow-control
	// windows and buffers at a time (gRPC's per-stream window, at most
	// 16 MiB with its BDP estimation; HTTP/2's; the 32 KiB chunks), plus
	// garbage not yet collected, all of it multiplied by the race
	// detector's shadow memory when it is on. Half the body's size lies
	// between the two, with room either way.
	const memoryBound = 100 << 20
	pid := st.kas.proc.Pid()
	client := st.kas.httpClient(t)
	// one request first, so that what a first request allocates once
	// (connections, pools) is in the baseline
	if err := pingThrough(client, st, 0); err != nil {
		t.Fatal(err)
	}
	if err := resetPeakRSS(pid); err != nil {
		t.Fatalf("cannot reset Caddy's peak RSS: %v", err)
	}
	before, err := procStatusKiB(pid, "VmRSS")
	if err != nil {
		t.Fatal(err)
	}

	hash := sha256.New()
	body := &uploadBody{rng: rand.NewChaCha8([32]byte{'k', 'a', 's'}), left: size, hash: hash}
	req, err := st.request(http.MethodPut, uploadPath, body)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("PUT of %d MiB: %v", size>>20, err)
	}
	respBody, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT of %d MiB: %s %s (%v)", size>>20, resp.Status, kubetest.Redact(string(respBody)), err)
	}
	var got uploadResult
	if err := json.Unmarshal(respBody, &got); err != nil {
		t.Fatalf("the upstream's answer %q: %v", respBody, err)
	}
	if want := hex.EncodeToString(hash.Sum(nil)); got.Bytes != size || got.SHA256 != want {
		t.Errorf("the upstream read %d bytes with sha256 %s, want %d bytes with sha256 %s", got.Bytes, got.SHA256, size, want)
	}

	peak, err := procStatusKiB(pid, "VmHWM")
	if err != nil {
		t.Fatal(err)
	}
	growth := (peak - before) << 10
	agentkPeak, _ := procStatusKiB(st.agent.proc.Pid(), "VmHWM")
	t.Logf("Caddy's RSS: %d MiB before the upload, peak %d MiB during it (+%d MiB); GitLab's agentk's peak RSS: %d MiB",
		before>>10, peak>>10, growth>>20, agentkPeak>>10)
	if growth >= memoryBound {
		t.Errorf("Caddy's resident memory grew by %d MiB during a %d MiB upload, want less than %d MiB: the body is not streamed",
			growth>>20, size>>20, memoryBound>>20)
	}
}

// pingThrough sends GET pingPath/<n> through Caddy and GitLab's agentk and
// checks the answer is the one for n.
func pingThrough(client *http.Client, st *gitlabAgentkStreamSetup, n int) error {
	req, err := st.request(http.MethodGet, fmt.Sprintf("%s%d", pingPath, n), nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("ping %d: %w", n, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("ping %d: read the answer: %w", n, err)
	}
	if want := fmt.Sprintf("pong %d", n); resp.StatusCode != http.StatusOK || string(body) != want {
		return fmt.Errorf("ping %d: %s %q, want 200 %q", n, resp.Status, kubetest.Redact(string(body)), want)
	}
	return nil
}

// TestGitLabAgentkStalledReader: a client that stops reading an endless
// response holds back only its own request. Twenty other requests through
// the same GitLab's agentk (the same tunnel, the same client connection)
// succeed meanwhile; then the stalled one goes on where it stopped, and
// closing it ends the response at the source.
func TestGitLabAgentkStalledReader(t *testing.T) {
	t.Parallel()
	forEachAgent(t, gitlabAgentkWays, testStalledReader)
}

func testStalledReader(t *testing.T, agent streamingAgent) {
	st := newGitLabAgentkStreamSetup(t, agent)
	client := st.kas.httpClient(t)

	req, err := st.request(http.MethodGet, endlessPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			resp.Body.Close()
		}
	}()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		t.Fatalf("GET %s: %s %s", endlessPath, resp.Status, kubetest.Redact(string(body)))
	}
	const first = 64 << 10
	if err := readEndless(resp.Body, 0, first); err != nil {
		t.Fatal(err)
	}
	// The client stops reading here. Wait until the upstream has written
	// well past what the client read and what the client's own HTTP/2
	// stream buffers (4 MiB in net/http), so that the stalled answer has
	// data queued in Caddy, the tunnel and agentk when the other requests
	// go. Flow control lets it get that far: the client's buffer and
	// agentk's HTTP/2 stream window towards the upstream alone take 8 MiB.
	const ahead = first + 6<<20
	if err := kubetest.Eventually(streamWait, func() error {
		if n := st.upstream.endlessWritten.Load(); n < ahead {
			return fmt.Errorf("the upstream wrote %d bytes of the endless answer, want at least %d", n, ahead)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	const others = 20
	var wg sync.WaitGroup
	errs := make(chan error, others)
	for i := range others {
		wg.Go(func() { errs <- pingThrough(client, st, i+1) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := st.upstream.endlessActive.Load(); n != 1 {
		t.Errorf("%d endless answers in progress at the upstream after the other requests, want the stalled one", n)
	}
	// How far the source got ahead is no assertion (flow control stops it
	// in time only); it is reported.
	t.Logf("after the other requests the upstream had written %d MiB of the answer; the client had read %d KiB",
		st.upstream.endlessWritten.Load()>>20, first>>10)

	// The stalled reader goes on where it stopped, with nothing lost.
	if err := readEndless(resp.Body, first, 1<<20); err != nil {
		t.Errorf("the stalled reader after the others: %v", err)
	}
	resp.Body.Close()
	closed = true
	if err := kubetest.Eventually(streamWait, func() error {
		if n := st.upstream.endlessActive.Load(); n != 0 {
			return fmt.Errorf("%d endless answers still in progress at the upstream after the client closed its response", n)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}
