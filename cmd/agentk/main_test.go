package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/agentk"
	"github.com/caddy-kas/caddy-kas/internal/buildinfo"
)

func TestParseFlags(t *testing.T) {
	o, err := parseFlags([]string{
		"--kas-address", "wss://kas.example/-/kubernetes-agent/",
		"--token-file=/etc/agentk/token",
		"--kas-header", "X-One: 1",
		"--kas-header=X-Two: 2",
		"--kas-header", "X-One: again",
		"--kas-connections", "3",
		"-context", "admin",
		"--kas-insecure-skip-tls-verify",
	}, &strings.Builder{})
	if err != nil {
		t.Fatal(err)
	}
	if o.kasAddress != "wss://kas.example/-/kubernetes-agent/" || o.tokenFile != "/etc/agentk/token" ||
		o.kasConnections != 3 || o.kube.Context != "admin" || !o.kasInsecure {
		t.Errorf("options = %+v", o)
	}
	if got := o.kasHeaders.h.Values("X-One"); strings.Join(got, ",") != "1,again" {
		t.Errorf("X-One = %q", got)
	}
	if o.kasHeaders.h.Get("X-Two") != "2" {
		t.Errorf("X-Two = %q", o.kasHeaders.h.Get("X-Two"))
	}
	if o.observabilityNet != "tcp" || o.observabilityAddr != ":8080" {
		t.Errorf("observability defaults = %s %s", o.observabilityNet, o.observabilityAddr)
	}
}

func TestParseFlagsErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--kas-header", "Authorization: Bearer s3cr3t-value"}, "agentk sets it itself"},
		{[]string{"--kas-connections", "many"}, "invalid value"},
		{[]string{"--unknown"}, "unknown flag --unknown: neither this agentk nor GitLab's agentk v16.5 has it; see agentk --help"},
		{[]string{"--kas-address", "wss://kas.example/", "-unknown=1"}, "unknown flag --unknown:"},
		{[]string{"--api-listen-address=:8082"}, "unknown flag --api-listen-address: it belongs to GitLab agentk 17.4 (receptive agents); this agentk accepts the flags of GitLab agentk up to v16.5"},
		{[]string{"--private-api-jwt-file", "/etc/jwt"}, "belongs to GitLab agentk 17.4"},
		{[]string{"--as=admin"}, "flag --as of GitLab's agentk is not supported: agentk's own identity cannot be impersonated"},
		{[]string{"--as-group", "system:masters"}, "flag --as-group of GitLab's agentk is not supported"},
		{[]string{"extra-argument"}, "1 unexpected argument(s)"},
	}
	for _, tt := range tests {
		var help strings.Builder
		_, err := parseFlags(tt.args, &help)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: error %v, want one saying %q", tt.args, err, tt.want)
			continue
		}
		if strings.Contains(help.String()+err.Error(), "s3cr3t") {
			t.Errorf("%q: the output shows a header value", tt.args)
		}
	}
}

func TestRunExitCodes(t *testing.T) {
	tests := []struct {
		args []string
		want int
	}{
		{[]string{"--version"}, 0},
		{[]string{"--help"}, 0},
		{[]string{"--no-such-flag"}, 2},
	}
	for _, tt := range tests {
		var stdout, stderr strings.Builder
		if got := run(tt.args, &stdout, &stderr); got != tt.want {
			t.Errorf("run(%q) = %d, want %d; stderr: %s", tt.args, got, tt.want, stderr.String())
		}
	}
	var stdout strings.Builder
	run([]string{"--version"}, &stdout, &strings.Builder{})
	if !strings.HasPrefix(stdout.String(), "agentk "+buildinfo.Version()+" (commit ") {
		t.Errorf("--version printed %q", stdout.String())
	}
}

func TestTokenSource(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "token")
	if err := os.WriteFile(file, []byte("file-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		tokenFile string
		env       *string
		want      string
		errText   string
	}{
		{name: "file", tokenFile: file, want: "file-token"},
		{name: "env", env: ptr(" env-token\n"), want: "env-token"},
		{name: "both", tokenFile: file, env: ptr("env-token"), errText: "not both"},
		{name: "neither", errText: "agent token is required"},
		{name: "empty env is unset", env: ptr(""), errText: "agent token is required"},
		{name: "missing file", tokenFile: filepath.Join(dir, "missing"), errText: "reading token file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("AGENTK_TOKEN", "placeholder") // restored after the test
			if tt.env != nil {
				os.Setenv("AGENTK_TOKEN", *tt.env)
			} else {
				os.Unsetenv("AGENTK_TOKEN")
			}
			ts, err := tokenSource(&options{tokenFile: tt.tokenFile})
			if _, set := os.LookupEnv("AGENTK_TOKEN"); set {
				t.Errorf("AGENTK_TOKEN still set after reading it")
			}
			if tt.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("error %v, want one saying %q", err, tt.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got, err := ts(); err != nil || got != tt.want {
				t.Errorf("token = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func ptr(s string) *string { return &s }

func TestLoadCluster(t *testing.T) {
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`
clusters: [{name: c, cluster: {server: "https://k8s.example/prefix"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: ctx, context: {cluster: c, user: u}}]
current-context: ctx
`), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		o          options
		host, port string
		kubeEnv    string
		wantServer string
		wantInPod  bool
		wantErr    error
		errText    string
	}{
		{name: "--kubeconfig", o: options{kubeconfig: kubeconfig}, wantServer: "https://k8s.example/prefix"},
		{name: "--kubeconfig in a pod", o: options{kubeconfig: kubeconfig}, host: "10.0.0.1", port: "443", wantServer: "https://k8s.example/prefix", wantInPod: true},
		{name: "$KUBECONFIG outside a pod", kubeEnv: kubeconfig, wantServer: "https://k8s.example/prefix"},
		{name: "$KUBECONFIG with several files", kubeEnv: kubeconfig + string(filepath.ListSeparator) + kubeconfig, errText: "several files"},
		{name: "nothing", wantErr: agentk.ErrNotInCluster},
		{name: "in a pod", o: options{serviceAccountDir: filepath.Join(dir, "no-sa")}, host: "10.0.0.1", port: "443", wantInPod: true, errText: "reading the cluster CA"},
		{name: "--context without --kubeconfig in a pod", o: options{kube: agentk.KubeconfigOverrides{Context: "x"}}, host: "10.0.0.1", port: "443", wantInPod: true, errText: "--context needs --kubeconfig"},
		{name: "missing context", o: options{kubeconfig: kubeconfig, kube: agentk.KubeconfigOverrides{Context: "nope"}}, errText: `context "nope" not found`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("KUBERNETES_SERVICE_HOST", tt.host)
			t.Setenv("KUBERNETES_SERVICE_PORT", tt.port)
			t.Setenv("KUBECONFIG", tt.kubeEnv)
			c, inPod, err := loadCluster(&tt.o, zap.NewNop())
			if inPod != tt.wantInPod {
				t.Errorf("inPod = %v", inPod)
			}
			if tt.wantErr != nil || tt.errText != "" {
				if err == nil {
					t.Fatal("no error")
				}
				if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
					t.Errorf("error %q does not wrap %q", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.errText) {
					t.Errorf("error %q does not say %q", err, tt.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Server() != tt.wantServer {
				t.Errorf("server = %s", c.Server())
			}
		})
	}
}
