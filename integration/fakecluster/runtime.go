package fakecluster

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/remotecommand"
	utilexec "k8s.io/utils/exec"
)

// fakeRuntime is the container runtime behind the fake kubelet. It
// implements the Executor and Attacher of
// k8s.io/kubelet/pkg/cri/streaming/remotecommand and the PortForwarder of
// .../portforward; the pod name it gets is "namespace/name".
type fakeRuntime struct {
	closing     context.Context // done when the Cluster closes
	tasks       *group          // owns the goroutines the runtime starts
	stats       *stats
	echoAddr    string
	portTargets map[int32]string // nil: every port goes to echoAddr

	mu            sync.Mutex
	fs            map[string]*memFS     // by pod UID and container name
	targets       map[net.Conn]struct{} // open port-forward connections
	targetsClosed bool                  // set by closeTargets
}

func (r *fakeRuntime) containerFS(uid types.UID, container string) *memFS {
	key := string(uid) + "/" + container
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fs == nil {
		r.fs = make(map[string]*memFS)
	}
	f, ok := r.fs[key]
	if !ok {
		f = newMemFS()
		r.fs[key] = f
	}
	return f
}

// commandContext is ctx, ended early when the Cluster closes.
func (r *fakeRuntime) commandContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(r.closing, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// process is one command, or the attached process, with its streams.
type process struct {
	ctx       context.Context
	namespace string
	pod       string
	container string
	fs        *memFS
	args      []string
	stdin     io.Reader // nil without stdin
	stdout    io.Writer // never nil
	stderr    io.Writer // never nil; stdout under a TTY
	tty       bool
	sizes     <-chan remotecommand.TerminalSize // nil without a TTY; closed when the resize stream ends
	tasks     *group                            // owns goroutines the command starts
}

// exitCode makes the error that the kubelet turns into a
// NonZeroExitCode status, which kubectl turns into its exit status.
func exitCode(code int) error {
	if code == 0 {
		return nil
	}
	return utilexec.CodeExitError{Err: fmt.Errorf("command terminated with exit code %d", code), Code: code}
}

func splitPodName(name string) (namespace, pod string) {
	namespace, pod, _ = strings.Cut(name, "/")
	return namespace, pod
}

// newProcess wires the streams the kubelet library hands over; the returned
// function closes stdout and stderr (so the client sees them end before the
// exit status) and ends the resize relay's hold on the process.
func (r *fakeRuntime) newProcess(ctx context.Context, podName string, uid types.UID, container string, in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) (*process, func()) {
	namespace, pod := splitPodName(podName)
	p := &process{
		ctx:       ctx,
		namespace: namespace,
		pod:       pod,
		container: container,
		fs:        r.containerFS(uid, container),
		stdin:     in,
		stdout:    io.Discard,
		stderr:    io.Discard,
		tty:       tty,
		tasks:     r.tasks,
	}
	if out != nil {
		p.stdout = out
	}
	if errOut != nil {
		p.stderr = errOut
	} else if tty {
		p.stderr = p.stdout
	}
	if resize != nil {
		// The kubelet's resize goroutine blocks until someone takes each
		// event, so take them all until it closes the channel (when the
		// connection ends), and pass on what the process has room for.
		sizes := make(chan remotecommand.TerminalSize, 16)
		p.sizes = sizes
		if !r.tasks.goFunc(func() {
			defer close(sizes)
			for size := range resize {
				select {
				case sizes <- size:
				default: // the process does not read sizes, or is slow: drop
				}
			}
		}) {
			// shutting down: still unblock the kubelet's goroutine, which
			// closes the channel when the connection ends
			close(sizes)
			go func() {
				for range resize {
				}
			}()
		}
	}
	return p, func() {
		for _, w := range []io.WriteCloser{out, errOut} {
			if w != nil {
				_ = w.Close()
			}
		}
	}
}

// ExecInContainer runs cmd with the fake command set.
func (r *fakeRuntime) ExecInContainer(ctx context.Context, podName string, uid types.UID, container string, cmd []string, in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, _ time.Duration) error {
	defer r.stats.start(Exec)()
	ctx, cancel := r.commandContext(ctx)
	defer cancel()
	p, done := r.newProcess(ctx, podName, uid, container, in, out, errOut, tty, resize)
	defer done()
	p.args = cmd
	return r.run(p)
}

// AttachContainer attaches to the container's fake main process: it greets
// the client, then echoes what it reads from stdin, each line prefixed with
// the container's name (a TTY gets its bytes back unchanged). Without stdin
// it writes a tick line every 200 ms until the client goes away.
func (r *fakeRuntime) AttachContainer(ctx context.Context, podName string, uid types.UID, container string, in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	defer r.stats.start(Attach)()
	ctx, cancel := r.commandContext(ctx)
	defer cancel()
	p, done := r.newProcess(ctx, podName, uid, container, in, out, errOut, tty, resize)
	defer done()

	if _, err := fmt.Fprintf(p.stdout, "attached to %s/%s/%s\n", p.namespace, p.pod, p.container); err != nil {
		return nil // the client is gone
	}
	if p.stdin == nil {
		ticker := time.NewTicker(200 * time.Millisecond)
		defer ticker.Stop()
		for n := 1; ; n++ {
			select {
			case <-ctx.Done():
				return nil
			case <-ticker.C:
			}
			if _, err := fmt.Fprintf(p.stdout, "%s: tick %d\n", p.container, n); err != nil {
				return nil
			}
		}
	}
	if p.tty {
		_, _ = io.Copy(p.stdout, p.stdin)
		return nil
	}
	lines := bufio.NewReader(p.stdin)
	for {
		line, err := lines.ReadString('\n')
		if line != "" {
			if _, werr := fmt.Fprintf(p.stdout, "%s: %s", p.container, line); werr != nil {
				return nil
			}
		}
		if err != nil {
			return nil // stdin ended: the attached session is over
		}
	}
}

// PortForward connects stream to the port's target: the echo server unless
// Options.PortTargets says otherwise.
func (r *fakeRuntime) PortForward(ctx context.Context, podName string, _ types.UID, port int32, stream io.ReadWriteCloser) error {
	defer r.stats.start(PortForward)()
	target := r.echoAddr
	if r.portTargets != nil {
		var ok bool
		if target, ok = r.portTargets[port]; !ok {
			namespace, pod := splitPodName(podName)
			return fmt.Errorf("failed to connect to localhost:%d inside namespace %q, pod %q: connection refused", port, namespace, pod)
		}
	}
	ctx, cancel := r.commandContext(ctx)
	defer cancel()
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "tcp", target)
	if err != nil {
		return fmt.Errorf("failed to connect to localhost:%d: %w", port, err)
	}
	r.mu.Lock()
	if r.targetsClosed {
		r.mu.Unlock()
		_ = conn.Close()
		return errors.New("the container runtime is shutting down")
	}
	if r.targets == nil {
		r.targets = make(map[net.Conn]struct{})
	}
	r.targets[conn] = struct{}{}
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.targets, conn)
		r.mu.Unlock()
		_ = conn.Close()
	}()

	// client -> target; the client's half-close becomes one towards the
	// target. The goroutine ends when the stream ends, which the kubelet
	// library sees to once PortForward returns (it resets the streams when
	// the client removes them, and closes them with the connection).
	r.tasks.goFunc(func() {
		_, _ = io.Copy(conn, stream)
		if tcp, ok := conn.(*net.TCPConn); ok {
			_ = tcp.CloseWrite()
		}
	})
	// target -> client, until the target is done
	_, err = io.Copy(stream, conn)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("copy from localhost:%d: %w", port, err)
	}
	return nil
}

// closeTargets closes the open port-forward connections.
func (r *fakeRuntime) closeTargets() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.targetsClosed = true
	for c := range r.targets {
		_ = c.Close()
	}
}

// fixedEnv is what `env` prints, after HOSTNAME.
var fixedEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"FAKECLUSTER=1",
}

// run runs p.args. It returns nil, an exit code error, or another error,
// which the kubelet reports as an internal error.
func (r *fakeRuntime) run(p *process) error {
	if len(p.args) == 0 {
		return errors.New("no command given")
	}
	name, args := p.args[0], p.args[1:]
	switch name {
	case "true":
		return nil
	case "false":
		return exitCode(1)
	case "echo":
		_, err := fmt.Fprintln(p.stdout, strings.Join(args, " "))
		return writeErr(err)
	case "hostname":
		_, err := fmt.Fprintln(p.stdout, p.pod)
		return writeErr(err)
	case "env":
		var b strings.Builder
		fmt.Fprintf(&b, "HOSTNAME=%s\n", p.pod)
		for _, kv := range fixedEnv {
			fmt.Fprintln(&b, kv)
		}
		if p.tty {
			fmt.Fprintln(&b, "TERM=xterm")
		}
		_, err := io.WriteString(p.stdout, b.String())
		return writeErr(err)
	case "stderr":
		_, err := fmt.Fprintln(p.stderr, strings.Join(args, " "))
		return writeErr(err)
	case "exit":
		return runExit(p, args)
	case "sh":
		return r.runShell(p, args)
	case "sleep":
		return runSleep(p, args)
	case "cat":
		return runCat(p, args)
	case "tty-size":
		return runTTYSize(p)
	case "test", "[":
		return runTest(p, args)
	case "ls":
		return runLs(p, args)
	case "mkdir":
		return runMkdir(p, args)
	case "tar":
		return runTar(p, args)
	default:
		// what containerd answers for a missing executable
		fmt.Fprintf(p.stderr, "OCI runtime exec failed: exec failed: unable to start container process: exec: %q: executable file not found in $PATH: unknown\n", name)
		return exitCode(126)
	}
}

// writeErr: a command whose output cannot be written any more ends as if
// killed by SIGPIPE.
func writeErr(err error) error {
	if err != nil {
		return exitCode(141)
	}
	return nil
}

func runExit(p *process, args []string) error {
	if len(args) == 0 {
		return nil
	}
	code, err := strconv.Atoi(args[0])
	if err != nil || code < 0 || code > 255 {
		fmt.Fprintf(p.stderr, "exit: Illegal number: %s\n", args[0])
		return exitCode(2)
	}
	return exitCode(code)
}

// runShell understands `sh -c SCRIPT` where SCRIPT is one of the commands
// here with arguments split at blanks (no quoting, pipes or lists).
func (r *fakeRuntime) runShell(p *process, args []string) error {
	if len(args) < 2 || args[0] != "-c" {
		fmt.Fprintln(p.stderr, "sh: only `sh -c SCRIPT` is supported")
		return exitCode(2)
	}
	words := strings.Fields(args[1])
	if len(words) == 0 {
		return nil
	}
	if strings.ContainsAny(args[1], "|;&<>`$()'\"") {
		fmt.Fprintf(p.stderr, "sh: fakecluster runs only simple commands, not %q\n", args[1])
		return exitCode(2)
	}
	sub := *p
	sub.args = words
	if words[0] != "exit" && words[0] != "sh" {
		if err := r.run(&sub); err != nil {
			var exitErr utilexec.ExitError
			if errors.As(err, &exitErr) {
				return err
			}
			fmt.Fprintf(p.stderr, "sh: %v\n", err)
			return exitCode(127)
		}
		return nil
	}
	return r.run(&sub)
}

func runSleep(p *process, args []string) error {
	if len(args) != 1 {
		fmt.Fprintln(p.stderr, "sleep: want one argument")
		return exitCode(1)
	}
	seconds, err := strconv.ParseFloat(args[0], 64)
	if err != nil || seconds < 0 {
		fmt.Fprintf(p.stderr, "sleep: invalid time interval %q\n", args[0])
		return exitCode(1)
	}
	timer := time.NewTimer(time.Duration(seconds * float64(time.Second)))
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-p.ctx.Done():
		return exitCode(137) // killed
	}
}

// runCat copies stdin to stdout until stdin ends, or prints the named files.
func runCat(p *process, args []string) error {
	if len(args) == 0 || (len(args) == 1 && args[0] == "-") {
		if p.stdin == nil {
			return nil
		}
		if _, err := io.Copy(p.stdout, p.stdin); err != nil {
			return exitCode(1)
		}
		return nil
	}
	code := 0
	for _, name := range args {
		data, err := p.fs.readFile(name)
		if err != nil {
			fmt.Fprintf(p.stderr, "cat: %s: %v\n", name, err)
			code = 1
			continue
		}
		if _, err := p.stdout.Write(data); err != nil {
			return exitCode(141)
		}
	}
	return exitCode(code)
}

// runTTYSize prints the terminal size at every resize event (the first one
// is the initial size) until stdin ends or brings a Ctrl-D, which a real
// terminal would turn into the end of input.
func runTTYSize(p *process) error {
	if !p.tty {
		fmt.Fprintln(p.stderr, "tty-size: not a terminal")
		return exitCode(1)
	}
	stdinDone := make(chan struct{})
	if p.stdin != nil {
		// The reader ends when stdin ends, at the latest when the kubelet
		// library closes the connection after this command returned.
		p.tasks.goFunc(func() {
			defer close(stdinDone)
			buf := make([]byte, 1024)
			for {
				n, err := p.stdin.Read(buf)
				if bytes.IndexByte(buf[:n], 0x04) >= 0 || err != nil {
					return
				}
			}
		})
	}
	sizes := p.sizes
	for {
		select {
		case size, ok := <-sizes:
			if !ok {
				sizes = nil // the resize stream ended; wait for stdin
				continue
			}
			if _, err := fmt.Fprintf(p.stdout, "size %dx%d\r\n", size.Width, size.Height); err != nil {
				return exitCode(141)
			}
		case <-stdinDone:
			return nil
		case <-p.ctx.Done():
			return exitCode(137)
		}
	}
}

func runTest(p *process, args []string) error {
	if len(args) > 0 && args[len(args)-1] == "]" {
		args = args[:len(args)-1]
	}
	if len(args) != 2 {
		fmt.Fprintln(p.stderr, "test: only `test -d|-f|-e PATH` is supported")
		return exitCode(2)
	}
	node, err := p.fs.stat(args[1])
	exists := err == nil
	var ok bool
	switch args[0] {
	case "-e":
		ok = exists
	case "-d":
		ok = exists && node.dir
	case "-f":
		ok = exists && !node.dir && node.link == ""
	default:
		fmt.Fprintf(p.stderr, "test: unsupported operator %s\n", args[0])
		return exitCode(2)
	}
	if ok {
		return nil
	}
	return exitCode(1)
}

func runLs(p *process, args []string) error {
	if len(args) == 0 {
		args = []string{"/"}
	}
	code := 0
	for _, name := range args {
		node, err := p.fs.stat(name)
		if err != nil {
			fmt.Fprintf(p.stderr, "ls: cannot access '%s': %v\n", name, err)
			code = 2
			continue
		}
		if !node.dir {
			fmt.Fprintln(p.stdout, name)
			continue
		}
		children, err := p.fs.children(name)
		if err != nil {
			fmt.Fprintf(p.stderr, "ls: %s: %v\n", name, err)
			code = 2
			continue
		}
		for _, c := range children {
			if _, err := fmt.Fprintln(p.stdout, c); err != nil {
				return exitCode(141)
			}
		}
	}
	return exitCode(code)
}

func runMkdir(p *process, args []string) error {
	parents := false
	var dirs []string
	for _, a := range args {
		if a == "-p" {
			parents = true
		} else {
			dirs = append(dirs, a)
		}
	}
	for _, d := range dirs {
		if !parents {
			if _, err := p.fs.stat(d); err == nil {
				fmt.Fprintf(p.stderr, "mkdir: cannot create directory '%s': %v\n", d, errExist)
				return exitCode(1)
			}
			if !p.fs.isDir(parentDir(d)) {
				fmt.Fprintf(p.stderr, "mkdir: cannot create directory '%s': %v\n", d, errNotExist)
				return exitCode(1)
			}
		}
		if err := p.fs.mkdirAll(d, 0o755); err != nil {
			fmt.Fprintf(p.stderr, "mkdir: cannot create directory '%s': %v\n", d, err)
			return exitCode(1)
		}
	}
	return nil
}

func parentDir(p string) string {
	p = cleanPath(p)
	if i := strings.LastIndexByte(p, '/'); i > 0 {
		return p[:i]
	}
	return "/"
}

// runTar understands what kubectl cp runs: `tar cf - PATH` and
// `tar [--no-same-permissions] [--no-same-owner] -xmf - [-C DIR]`, with or
// without the dash before the short options, f naming - only.
func runTar(p *process, args []string) error {
	var create, extract bool
	dir := "/"
	var paths []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "-C" || a == "--directory":
			if i+1 >= len(args) {
				fmt.Fprintln(p.stderr, "tar: option requires an argument -- 'C'")
				return exitCode(2)
			}
			i++
			dir = args[i]
		case strings.HasPrefix(a, "--"):
			// --no-same-permissions, --no-same-owner and the like change
			// nothing in a file system without owners
		case (i == 0 && !strings.HasPrefix(a, "-")) || (strings.HasPrefix(a, "-") && len(a) > 1):
			for _, c := range strings.TrimPrefix(a, "-") {
				switch c {
				case 'c':
					create = true
				case 'x':
					extract = true
				case 'f':
					if i+1 >= len(args) || args[i+1] != "-" {
						fmt.Fprintln(p.stderr, "tar: fakecluster reads and writes archives on stdin and stdout only (f -)")
						return exitCode(2)
					}
					i++
				case 'm', 'v', 'o', 'p':
				default:
					fmt.Fprintf(p.stderr, "tar: unsupported option -- '%c'\n", c)
					return exitCode(2)
				}
			}
		default:
			paths = append(paths, a)
		}
	}
	switch {
	case create == extract:
		fmt.Fprintln(p.stderr, "tar: You must specify one of the '-c' or '-x' options")
		return exitCode(2)
	case create:
		if len(paths) == 0 {
			fmt.Fprintln(p.stderr, "tar: Cowardly refusing to create an empty archive")
			return exitCode(2)
		}
		for _, name := range paths {
			if _, err := p.fs.stat(resolvePath(dir, name)); err != nil {
				fmt.Fprintf(p.stderr, "tar: %s: Cannot stat: %v\n", name, err)
				fmt.Fprintln(p.stderr, "tar: Exiting with failure status due to previous errors")
				return exitCode(2)
			}
		}
		if slices.ContainsFunc(paths, func(name string) bool { return strings.HasPrefix(name, "/") }) {
			fmt.Fprintln(p.stderr, "tar: Removing leading `/' from member names")
		}
		var buf bytes.Buffer
		if err := p.fs.writeTar(&buf, dir, paths...); err != nil {
			fmt.Fprintf(p.stderr, "tar: %v\n", err)
			return exitCode(2)
		}
		if _, err := p.stdout.Write(buf.Bytes()); err != nil {
			return exitCode(141)
		}
		return nil
	default:
		if p.stdin == nil {
			fmt.Fprintln(p.stderr, "tar: This does not look like a tar archive (no stdin)")
			return exitCode(2)
		}
		warnings, err := p.fs.extractTar(p.stdin, dir)
		// like GNU tar, read what follows the archive, so the writer is not
		// left blocked
		_, _ = io.Copy(io.Discard, p.stdin)
		for _, w := range warnings {
			fmt.Fprintf(p.stderr, "tar: %s\n", w)
		}
		if err != nil {
			fmt.Fprintf(p.stderr, "tar: %v\n", err)
			fmt.Fprintln(p.stderr, "tar: Error is not recoverable: exiting now")
			return exitCode(2)
		}
		return nil
	}
}
