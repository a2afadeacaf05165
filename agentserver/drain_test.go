package agentserver

import (
	"context"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// movingAgent connects like agentk, and like agentk dials a new tunnel
// whenever KAS asks one to move, serving the old one on.
type movingAgent struct {
	e       *env
	ctx     context.Context
	handler http.Handler
	dials   atomic.Int32
}

func (a *movingAgent) dial(t *testing.T) {
	header := http.Header{"Authorization": {"Bearer " + goodToken}}
	h2tunnel.SetMetaHeaders(header, tunnel.AgentMeta{ConnectionID: int64(a.dials.Add(1))})
	nc, _, err := wsconn.Dial(a.ctx, endpointURL, wsconn.DialOptions{HTTPClient: a.e.client, Header: header, Subprotocol: h2tunnel.Subprotocol})
	if err != nil {
		t.Errorf("dial %d: %v", a.dials.Load(), err)
		return
	}
	srv := &h2tunnel.Server{Handler: a.handler}
	srv.OnMove = func() { go a.dial(t) }
	go srv.ServeConn(a.ctx, nc)
}

// TestEndpointMaxConnectionAge: tunnels of our agentk roll over at their
// maximum age, the agent always has a tunnel, and a request in flight
// when its tunnel is told to move still completes.
func TestEndpointMaxConnectionAge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		auth, err := NewStaticAgents([]StaticAgent{{ID: 1, Name: "one", Token: goodToken}})
		if err != nil {
			t.Fatal(err)
		}
		core, logs := observer.New(zapcore.DebugLevel)
		e := &env{store: tunnel.NewStore(), logs: logs}
		e.router = tunnel.NewRouter(e.store)
		const maxAge = 100 * time.Second
		e.client = servePipe(t, &Endpoint{Auth: auth, Store: e.store, Logger: zap.New(core), MaxConnectionAge: maxAge})
		t.Cleanup(func() { e.store.Close() })
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		a := &movingAgent{e: e, ctx: ctx, handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				time.Sleep(50 * time.Second)
			}
			io.WriteString(w, "ok")
		})}
		begin := time.Now()
		a.dial(t)
		synctest.Wait()

		find := func() tunnel.Tunnel {
			fctx, fcancel := context.WithTimeout(context.Background(), time.Millisecond)
			defer fcancel()
			tun, err := e.router.Find(fctx, 1)
			if err != nil {
				t.Fatalf("%v after the first tunnel: %v", time.Since(begin), err)
			}
			return tun
		}
		first := find()
		time.Sleep(10 * time.Second)
		slow := make(chan string, 1)
		go func() {
			req, _ := http.NewRequest(http.MethodGet, "http://agent/slow", nil)
			resp, err := first.RoundTrip(&tunnel.Request{HTTP: req})
			if err != nil {
				slow <- err.Error()
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err != nil {
				slow <- err.Error()
				return
			}
			slow <- string(b)
		}()
		// Three and a half ages: every tunnel moves, and at every step
		// the agent has a tunnel that is not moving, or its old one.
		for range 350 {
			time.Sleep(time.Second)
			find()
		}
		if got := <-slow; got != "ok" {
			t.Errorf("request in flight during the move: %q", got)
		}
		if first.Err() == nil {
			t.Error("the first tunnel is still open after three ages")
		}
		if n := a.dials.Load(); n < 4 || n > 12 {
			t.Errorf("%d tunnels in three and a half ages, want one per about 35 s of age", n)
		}
		if n := logs.FilterMessage("asking agent to move: the tunnel reached its maximum age").Len(); n < 3 {
			t.Errorf("%d moves logged, want at least 3", n)
		}
	})
}

// TestEndpointRefusesWhileDraining: once the node stops and its store
// drains, agents are sent elsewhere with 503 and Retry-After.
func TestEndpointRefusesWhileDraining(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEnv(t, nil)
		go e.store.Drain(context.Background(), time.Minute)
		synctest.Wait()
		resp := e.handshake(t, goodToken)
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "1" {
			t.Errorf("handshake while draining: %d, Retry-After %q; want 503, 1", resp.StatusCode, resp.Header.Get("Retry-After"))
		}
		if n := e.logs.FilterMessage("agent refused").FilterField(zap.String("reason", "server stopping")).Len(); n != 1 {
			t.Errorf("%d refusals logged, want 1", n)
		}
	})
}
