package fakecluster_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/caddy-kas/caddy-kas/integration/fakecluster"
)

// TestExecTTY runs `kubectl exec -t -i` under a pseudo-terminal, resizes the
// terminal and checks that the remote command sees both sizes.
func TestExecTTY(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})
	for _, m := range remoteCommandModes {
		t.Run(m.name, func(t *testing.T) {
			before := len(f.cluster.Requests())
			ctx, cancel := context.WithTimeout(context.Background(), kubectlTimeout)
			defer cancel()
			cmd := f.admin.with(m.env...).command(ctx, "exec", "-t", "-i", "-n", f.namespace, f.pod, "--", "tty-size")
			cmd.SysProcAttr = nil // pty.Start sets its own: a new session with the terminal as its controlling one
			term, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 24, Cols: 80})
			if err != nil {
				t.Fatal(err)
			}
			screen := &syncBuffer{}
			var reader sync.WaitGroup
			reader.Add(1)
			go func() {
				defer reader.Done()
				_, _ = io.Copy(screen, term) // ends with an error once kubectl exited and term is closed
			}()
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
				deadline := time.Now().Add(streamWait)
				for !strings.Contains(screen.String(), want) {
					if time.Now().After(deadline) {
						t.Fatalf("the terminal shows no %q within %s", want, streamWait)
					}
					time.Sleep(20 * time.Millisecond)
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
				var exitErr *exec.ExitError
				if err != nil && !errors.As(err, &exitErr) {
					t.Fatal(err)
				}
				if err != nil {
					t.Errorf("kubectl exec -t -i tty-size: %v", err)
				}
			case <-time.After(streamWait):
				t.Fatalf("kubectl did not exit within %s of Ctrl-D", streamWait)
			}
			if n := bytes.Count([]byte(screen.String()), []byte("size ")); n < 2 {
				t.Errorf("%d sizes on the terminal, want at least 2", n)
			}
			f.checkRemoteCommandRequests(t, m, before, fakecluster.Exec)
			for _, r := range f.requestsSince(before, fakecluster.Exec) {
				if !strings.Contains(r.RawQuery, "tty=true") {
					t.Errorf("kubectl exec -t sent %s", r.RawQuery)
				}
			}
		})
	}
}
