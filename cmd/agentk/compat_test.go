package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/agentk"
	"github.com/caddy-kas/caddy-kas/internal/testca"
)

// chartFixture is one command line of the gitlab/gitlab-agent Helm chart
// (testdata/gitlab-chart/README.md).
type chartFixture struct {
	name string
	args []string
	env  []string
	want []string
}

func readChartFixtures(t *testing.T) []chartFixture {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join("testdata", "gitlab-chart", "*.txt"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no chart fixtures: %v", err)
	}
	var fixtures []chartFixture
	for _, path := range paths {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		fx := chartFixture{name: strings.TrimSuffix(filepath.Base(path), ".txt")}
		var section *[]string
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "#") || line == "":
			case line == "[args]":
				section = &fx.args
			case line == "[env]":
				section = &fx.env
			case line == "[want]":
				section = &fx.want
			case section == nil:
				t.Fatalf("%s: %q before any section", path, line)
			default:
				*section = append(*section, line)
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			t.Fatal(err)
		}
		fixtures = append(fixtures, fx)
	}
	return fixtures
}

// envValue returns the value of name in env, a list of NAME=value.
func envValue(env []string, name string) string {
	for _, kv := range env {
		if k, v, _ := strings.Cut(kv, "="); k == name {
			return v
		}
	}
	return ""
}

// summary renders what agentk made of a command line and environment in
// the [want] format of the fixtures.
func summary(o *options, env []string) []string {
	var lines []string
	add := func(format string, args ...any) { lines = append(lines, fmt.Sprintf(format, args...)) }
	add("kas-address %s", o.kasAddress)
	if o.tokenFile != "" {
		add("token-file %s", o.tokenFile)
	}
	if o.kasCACertFile != "" {
		add("kas-ca-cert-file %s", o.kasCACertFile)
	}
	if o.kasInsecure {
		add("kas-insecure-skip-tls-verify")
	}
	if o.kasTLSServerName != "" {
		add("kas-tls-server-name %s", o.kasTLSServerName)
	}
	for _, raw := range o.kasHeaders.raw {
		name, value, _ := agentk.ParseHeader(raw)
		add("kas-header %s: %s", name, value)
	}
	add("observability-listen %s %s", o.observabilityNet, o.observabilityAddr)
	if o.observabilityCertFile != "" {
		add("observability-tls %s %s", o.observabilityCertFile, o.observabilityKeyFile)
	}
	if o.kubeconfig != "" {
		add("kubeconfig %s", o.kubeconfig)
	}
	if names := kubeconfigFlags(o.kube); len(names) > 0 {
		add("kubeconfig-flags %s", strings.Join(names, " "))
	}
	for _, f := range o.ignored {
		add("ignored-flag %s", f.name)
	}
	add("pod %s/%s", envValue(env, "POD_NAMESPACE"), envValue(env, "POD_NAME"))
	var unused []string
	for _, group := range unusedEnv(env) {
		unused = append(unused, group...)
	}
	if len(unused) > 0 {
		add("unused-env %s", strings.Join(unused, " "))
	}
	return lines
}

// TestGitLabChartCommandLines parses the command lines that GitLab's Helm
// chart renders for its agentk, and checks what agentk makes of them.
func TestGitLabChartCommandLines(t *testing.T) {
	for _, fx := range readChartFixtures(t) {
		t.Run(fx.name, func(t *testing.T) {
			var help strings.Builder
			o, err := parseFlags(fx.args, &help)
			if err != nil {
				t.Fatalf("the chart's arguments do not parse: %v", err)
			}
			if got := summary(o, fx.env); !slices.Equal(got, fx.want) {
				t.Errorf("configuration:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(fx.want, "\n"))
			}
		})
	}
}

// TestGitLabChartSetup goes one step further than
// TestGitLabChartCommandLines: with the files the chart mounts in place
// (moved under a temporary directory) and the pod's environment, agentk
// sets itself up as it would in the pod, and logs what has no effect.
func TestGitLabChartSetup(t *testing.T) {
	for _, fx := range readChartFixtures(t) {
		t.Run(fx.name, func(t *testing.T) {
			root := t.TempDir()
			o, err := parseFlags(fx.args, &strings.Builder{})
			if err != nil {
				t.Fatal(err)
			}
			ca, err := testca.New("chart test CA")
			if err != nil {
				t.Fatal(err)
			}
			// Every file the chart mounts, at the same path under root.
			for _, f := range []struct {
				path    *string
				content []byte
			}{
				{&o.tokenFile, []byte("glagent-chart-token\n")},
				{&o.kasCACertFile, ca.CAPEM},
				{&o.observabilityCertFile, ca.CertPEM},
				{&o.observabilityKeyFile, ca.KeyPEM},
			} {
				if *f.path == "" {
					continue
				}
				*f.path = filepath.Join(root, *f.path)
				writeTestFile(t, *f.path, f.content)
			}
			// The pod's service account, as the chart's projected volume
			// or kubelet mounts it.
			o.serviceAccountDir = filepath.Join(root, agentk.ServiceAccountDir)
			writeTestFile(t, filepath.Join(o.serviceAccountDir, "token"), []byte("service-account-token"))
			writeTestFile(t, filepath.Join(o.serviceAccountDir, "ca.crt"), ca.CAPEM)
			writeTestFile(t, filepath.Join(o.serviceAccountDir, "namespace"), []byte("gitlab-agent"))
			// The chart's port 8080 may be taken on a test machine.
			o.observabilityAddr = "127.0.0.1:0"

			t.Setenv("AGENTK_TOKEN", "")
			t.Setenv("KUBECONFIG", "")
			t.Setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
			t.Setenv("KUBERNETES_SERVICE_PORT", "443")
			for _, kv := range fx.env {
				name, value, _ := strings.Cut(kv, "=")
				t.Setenv(name, value)
			}
			core, logs := observer.New(zap.InfoLevel)
			logger := zap.New(core)
			logUnusedEnv(logger, fx.env)
			a, err := setup(o, logger)
			if err != nil {
				t.Fatalf("setup with the chart's command line: %v", err)
			}
			// Run with a done context releases the listener at once.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if err := a.Run(ctx); err != nil {
				t.Errorf("run: %v", err)
			}
			if logs.FilterMessage("using the in-cluster service account").Len() != 1 {
				t.Errorf("agentk did not use the pod's service account; logs: %v", logs.All())
			}
			if logs.FilterField(zap.String("reason", unusedGitLabEnv[0].reason)).Len() != 1 {
				t.Errorf("SERVICE_ACCOUNT_NAME was not logged as having no effect; logs: %v", logs.All())
			}
			for _, e := range logs.All() {
				if strings.Contains(fmt.Sprint(e.ContextMap()), "glagent-chart-token") {
					t.Errorf("the agent token is in the log: %v", e)
				}
			}
		})
	}
}

// gitlabAgentkFlags are the flags that GitLab's agentk v16.5 lists in its
// --help, long names and the one-letter short ones.
var gitlabAgentkFlags = []string{
	"as", "as-group", "as-uid", "ca-cert-file", "cache-dir", "certificate-authority", "client-certificate",
	"client-key", "cluster", "context", "disable-compression", "help", "h", "insecure-skip-tls-verify",
	"kas-address", "kas-header", "kas-insecure-skip-tls-verify", "kas-tls-server-name", "kubeconfig",
	"namespace", "n", "observability-cert-file", "observability-key-file", "observability-listen-address",
	"observability-listen-network", "request-timeout", "server", "s", "tls-server-name", "token",
	"token-file", "user", "version", "v",
}

// TestEveryGitLabFlagIsKnown checks that every flag of GitLab's agentk
// v16.5 parses, or is refused with a reason, and that the list above is
// GitLab's own, by asking GitLab's agentk binary when it is there.
func TestEveryGitLabFlagIsKnown(t *testing.T) {
	fs := newFlagSet(&options{})
	for _, name := range gitlabAgentkFlags {
		if name == "help" || name == "h" {
			continue // the flag package's own
		}
		if fs.Lookup(name) == nil {
			t.Errorf("GitLab agentk's flag --%s is not defined", name)
		}
	}

	bin := os.Getenv("GITLAB_AGENTK_BIN")
	if bin == "" {
		bin = filepath.Join("..", "..", "..", "shared", "gitlab-agent-v16.5", "agentk")
	}
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("GitLab's agentk is needed under CI=true: %v", err)
		}
		t.Skipf("GitLab's agentk is not there (%v); set GITLAB_AGENTK_BIN", err)
	}
	out, _ := exec.Command(bin, "--help").CombinedOutput() // cobra's help exits 0; the output is what counts
	var listed []string
	for _, m := range regexp.MustCompile(`(?m)^\s+(?:-(\w), )?--([\w-]+)`).FindAllStringSubmatch(string(out), -1) {
		if m[1] != "" {
			listed = append(listed, m[1])
		}
		listed = append(listed, m[2])
	}
	if len(listed) == 0 {
		t.Fatalf("no flags found in the help of GitLab's agentk:\n%s", out)
	}
	slices.Sort(listed)
	want := slices.Sorted(slices.Values(gitlabAgentkFlags))
	if !slices.Equal(listed, want) {
		t.Errorf("GitLab's agentk lists the flags\n%q\nthe test knows\n%q", listed, want)
	}
}

// TestHelpListsEveryFlag checks that --help shows every flag agentk
// accepts but the refused ones, each once.
func TestHelpListsEveryFlag(t *testing.T) {
	var help strings.Builder
	if _, err := parseFlags([]string{"--help"}, &help); err != flag.ErrHelp {
		t.Fatalf("--help: %v", err)
	}
	fs := newFlagSet(&options{})
	fs.VisitAll(func(f *flag.Flag) {
		if _, refused := refusedFlags[f.Name]; refused {
			if !strings.Contains(help.String(), "--"+f.Name+",") && !strings.Contains(help.String(), "--"+f.Name+" ") {
				t.Errorf("the help does not name the refused flag --%s", f.Name)
			}
			return
		}
		spelled := "--" + f.Name
		if len(f.Name) == 1 {
			spelled = "-" + f.Name
		}
		pattern := regexp.MustCompile(`(?m)^  (?:-{1,2}[\w-]+, )*` + regexp.QuoteMeta(spelled) + `(?:[ ,]|$)`)
		if n := len(pattern.FindAllString(help.String(), -1)); n != 1 {
			t.Errorf("the help lists %s %d times, want once", spelled, n)
		}
	})
	for _, want := range []string{"Usage:", "Example", "Environment:", "POD_NAMESPACE, POD_NAME", "AGENTK_TOKEN", "SERVICE_ACCOUNT_NAME"} {
		if !strings.Contains(help.String(), want) {
			t.Errorf("the help does not say %q", want)
		}
	}
}

func TestUnusedEnv(t *testing.T) {
	env := []string{
		"POD_NAMESPACE=ns", "SERVICE_ACCOUNT_NAME=sa", "OCS_ENABLED=true", "GITLAB_AGENT_TELEMETRY_installation_method=helm-chart",
		"GITLAB_AGENT_TELEMETRY_helm_chart_version=2.1.0", "POD_IP=10.0.0.7", "OTEL_EXPORTER_OTLP_ENDPOINT=http://otel:4317", "HOME=/",
	}
	got := unusedEnv(env)
	want := [][]string{
		{"SERVICE_ACCOUNT_NAME", "OCS_ENABLED"},
		{"GITLAB_AGENT_TELEMETRY_installation_method", "GITLAB_AGENT_TELEMETRY_helm_chart_version"},
		{"POD_IP"},
		{"OTEL_EXPORTER_OTLP_ENDPOINT"},
	}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("unusedEnv = %q, want %q", got, want)
	}
	core, logs := observer.New(zap.InfoLevel)
	logUnusedEnv(zap.New(core), env)
	for _, e := range logs.All() {
		if s := fmt.Sprint(e.ContextMap()); strings.Contains(s, "helm-chart") || strings.Contains(s, "otel:4317") {
			t.Errorf("a value is in the log: %s", s)
		}
	}
	if logs.Len() != len(want) {
		t.Errorf("%d log lines, want one per group (%d)", logs.Len(), len(want))
	}
}

func writeTestFile(t *testing.T, path string, content []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
}
