package integration

import (
	"bytes"
	"context"
	"io"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/caddy-kas/caddy-kas/integration/fakecluster"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// TestExecTTYThroughTunnel runs `kubectl exec -t -i` under a
// pseudo-terminal through Caddy and agentk, resizes the terminal, and
// checks that the remote command sees both sizes and that Ctrl-D ends it.
func TestExecTTYThroughTunnel(t *testing.T) {
	st := newStreamingSetup(t, fakecluster.Options{})
	for _, m := range remoteCommandModes {
		t.Run(m.name, func(t *testing.T) {
			k := st.ops.withEnv(m.env...)
			ctx, cancel := context.WithTimeout(context.Background(), kubectlTimeout)
			defer cancel()
			cmd := exec.CommandContext(ctx, k.bin, k.fullArgs([]string{"exec", "-t", "-i", "-n", st.namespace, "pod", "--", "tty-size"})...)
			cmd.Env = k.env()
			term, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 24, Cols: 80})
			if err != nil {
				t.Fatal(err)
			}
			screen := &lockedBuffer{}
			var reader sync.WaitGroup
			reader.Go(func() { io.Copy(screen, term) }) // ends once kubectl exited and term is closed
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			defer func() {
				cancel()
				select {
				case <-exited:
				case <-time.After(kubectlTimeout):
					t.Error("kubectl did not exit after it was killed")
				}
				term.Close()
				reader.Wait()
				if t.Failed() {
					t.Logf("terminal:\n%q", screen.String())
				}
			}()

			waitScreen := func(want string) {
				t.Helper()
				if err := kubetest.Eventually(streamWait, func() error {
					if !strings.Contains(screen.String(), want) {
						return io.ErrNoProgress
					}
					return nil
				}); err != nil {
					t.Fatalf("the terminal shows no %q within %s", want, streamWait)
				}
			}
			waitScreen("size 80x24")
			if err := pty.Setsize(term, &pty.Winsize{Rows: 30, Cols: 100}); err != nil {
				t.Fatal(err)
			}
			waitScreen("size 100x30")
			if _, err := term.Write([]byte{0x04}); err != nil { // Ctrl-D ends tty-size
				t.Fatal(err)
			}
			select {
			case err := <-exited:
				exited <- err // for the deferred wait
				if err != nil {
					t.Errorf("kubectl exec -t -i tty-size: %v", err)
				}
			case <-time.After(streamWait):
				t.Fatalf("kubectl did not exit within %s of Ctrl-D", streamWait)
			}
			if last := lastRequest(st.fake, fakecluster.Exec); !strings.Contains(last.RawQuery, "tty=true") || !strings.EqualFold(last.Upgrade, m.upgrade) {
				t.Errorf("the cluster saw exec %q with Upgrade %q, want tty=true over %s", last.RawQuery, last.Upgrade, m.upgrade)
			}
		})
	}
}

// lockedBuffer is a bytes.Buffer safe for one writer and concurrent
// readers.
type lockedBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
