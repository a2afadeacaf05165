package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/caddy-kas/caddy-kas/agentk"
)

// gitlabVersion is the newest GitLab agentk whose flags this agentk
// accepts: every flag of GitLab's agentk v16.5 parses here, and
// --kas-ca-cert-file, v16.9's new name of --ca-cert-file.
const gitlabVersion = "v16.5"

// headerFlag collects repeated --kas-header values. They are checked
// after parsing, because the flag package quotes a rejected value in its
// error message, and extra headers often carry secrets.
type headerFlag struct {
	raw []string
	h   http.Header // filled by parse
}

func (f *headerFlag) String() string { return "" }

func (f *headerFlag) Set(s string) error {
	f.raw = append(f.raw, s)
	return nil
}

// parse checks the collected values.
func (f *headerFlag) parse() error {
	for i, s := range f.raw {
		name, value, err := agentk.ParseHeader(s)
		if err != nil {
			return fmt.Errorf("--kas-header #%d: %w", i+1, err)
		}
		if f.h == nil {
			f.h = make(http.Header)
		}
		f.h.Add(name, value)
	}
	return nil
}

// options are the parsed command line.
type options struct {
	kasAddress            string
	tokenFile             string
	kasCACertFile         string
	kasInsecure           bool
	kasTLSServerName      string
	kasHeaders            headerFlag
	observabilityNet      string
	observabilityAddr     string
	observabilityCertFile string
	observabilityKeyFile  string
	kubeconfig            string
	kube                  agentk.KubeconfigOverrides
	kasConnections        int
	printVersion          bool
	serviceAccountDir     string
	// ignored are the flags of GitLab's agentk that were given and that
	// this agentk accepts without acting on them; setup logs them.
	ignored []ignoredFlag
}

// ignoredFlag is a flag of GitLab's agentk that this agentk accepts and
// does not act on, with the reason.
type ignoredFlag struct {
	name   string
	alias  string // a one-letter alias, or ""
	isBool bool
	usage  string
	reason string
}

// ignoredFlags are the flags of GitLab's agentk v16.5 (kubectl's
// genericclioptions, which it embeds) that change nothing this agentk does.
// They are accepted, so that a deployment that passes them keeps working,
// and logged at start with the reason.
var ignoredFlags = []ignoredFlag{
	{name: "namespace", alias: "n", usage: "kubectl's default `namespace`",
		reason: "agentk makes no namespaced requests of its own; a request from KAS names its namespace in its path"},
	{name: "request-timeout", usage: "kubectl's `timeout` of a request",
		reason: "a request from KAS lasts as long as its client's; a fixed timeout would cut watches, logs -f and exec sessions"},
	{name: "cache-dir", usage: "kubectl's discovery cache `directory`",
		reason: "agentk keeps no discovery cache"},
	{name: "disable-compression", isBool: true, usage: "kubectl's opt-out of compressed responses",
		reason: "agentk passes the client's Accept-Encoding to the apiserver as it is, so the client decides"},
}

// refusedFlags are the flags of GitLab's agentk v16.5 that this agentk
// refuses, with the reason: acting as if they were there would give the
// cluster a different identity than the deployment asks for.
var refusedFlags = map[string]string{
	"as":       "agentk's own identity cannot be impersonated; KAS sets the identity of every request (ci_access, user_access), so give agentk's service account the rights instead",
	"as-group": "agentk's own identity cannot be impersonated; KAS sets the identity of every request (ci_access, user_access), so give agentk's service account the rights instead",
	"as-uid":   "agentk's own identity cannot be impersonated; KAS sets the identity of every request (ci_access, user_access), so give agentk's service account the rights instead",
}

// newerGitLabFlags are flags of GitLab agentk versions after v16.5, by the
// version that introduced them: the listeners of receptive agents (GitLab
// 17.4, kas-spec §6), which the gitlab-agent Helm chart passes from its
// config.api and config.privateApi values when config.receptive.enabled is
// set. There KAS dials the agent, which this agentk does not support.
var newerGitLabFlags = map[string]string{
	"api-listen-network":         "17.4 (receptive agents)",
	"api-listen-address":         "17.4 (receptive agents)",
	"api-cert-file":              "17.4 (receptive agents)",
	"api-key-file":               "17.4 (receptive agents)",
	"api-jwt-file":               "17.4 (receptive agents)",
	"api-client-ca-cert-file":    "17.4 (receptive agents)",
	"api-mtls":                   "17.4 (receptive agents)",
	"private-api-listen-network": "17.4 (receptive agents)",
	"private-api-listen-address": "17.4 (receptive agents)",
	"private-api-cert-file":      "17.4 (receptive agents)",
	"private-api-key-file":       "17.4 (receptive agents)",
	"private-api-ca-cert-file":   "17.4 (receptive agents)",
	"private-api-jwt-file":       "17.4 (receptive agents)",
}

// helpSections orders the flags in --help. Every flag is in exactly one
// section (checked by a test); aliases follow their flag on one line.
var helpSections = []struct {
	title string
	flags [][]string // a flag and its aliases
}{
	{"Flags", [][]string{
		{"kas-address"}, {"token-file"}, {"kas-ca-cert-file", "ca-cert-file"}, {"kas-insecure-skip-tls-verify"},
		{"kas-tls-server-name"}, {"kas-header"}, {"kas-connections"},
		{"observability-listen-network"}, {"observability-listen-address"},
		{"observability-cert-file"}, {"observability-key-file"},
		{"version", "v"},
	}},
	{"The cluster (kubectl's flags, as GitLab's agentk takes them; default: the pod's service account)", [][]string{
		{"kubeconfig"}, {"context"}, {"cluster"}, {"user"}, {"server", "s"}, {"certificate-authority"},
		{"insecure-skip-tls-verify"}, {"tls-server-name"}, {"client-certificate"}, {"client-key"}, {"token"},
	}},
}

// newFlagSet defines every flag into o. The flag set prints nothing:
// parseFlags returns its errors and prints the help.
func newFlagSet(o *options) *flag.FlagSet {
	fs := flag.NewFlagSet("agentk", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&o.kasAddress, "kas-address", "", "KAS address: a ws:// or wss:// `URL`, dialed as is, e.g. wss://gitlab.example.com/-/kubernetes-agent/ (required)")
	fs.StringVar(&o.tokenFile, "token-file", "", "`file` with the agent token, re-read on every reconnect (or set AGENTK_TOKEN)")
	fs.StringVar(&o.kasCACertFile, "kas-ca-cert-file", "", "PEM `file` of CA certificates to trust for KAS, in addition to the system's; --ca-cert-file is GitLab agentk's name up to 16.8 (Helm chart: config.kasCaCert or config.caCert)")
	fs.StringVar(&o.kasCACertFile, "ca-cert-file", "", "GitLab agentk's name of --kas-ca-cert-file up to 16.8")
	fs.BoolVar(&o.kasInsecure, "kas-insecure-skip-tls-verify", false, "do not verify KAS's TLS certificate (insecure)")
	fs.StringVar(&o.kasTLSServerName, "kas-tls-server-name", "", "`name` for SNI and verification of KAS's certificate; default: the host of --kas-address")
	fs.Var(&o.kasHeaders, "kas-header", "extra `'Name: value'` header for the handshake with KAS (repeatable)")
	fs.IntVar(&o.kasConnections, "kas-connections", 1, "how many tunnels to KAS to keep open")
	fs.StringVar(&o.observabilityNet, "observability-listen-network", "tcp", "`network` of the observability listener (tcp, tcp4, tcp6, unix)")
	fs.StringVar(&o.observabilityAddr, "observability-listen-address", ":8080", "`address` of /liveness, /readiness and /metrics")
	fs.StringVar(&o.observabilityCertFile, "observability-cert-file", "", "PEM `file` of the certificate to serve the observability endpoints over TLS (with --observability-key-file)")
	fs.StringVar(&o.observabilityKeyFile, "observability-key-file", "", "PEM `file` of the key of --observability-cert-file")
	fs.BoolVar(&o.printVersion, "version", false, "print the version and exit")
	fs.BoolVar(&o.printVersion, "v", false, "short for --version")

	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig `file` of the cluster; default: the pod's service account, else $KUBECONFIG")
	fs.StringVar(&o.kube.Context, "context", "", "kubeconfig `context`; default: its current-context")
	fs.StringVar(&o.kube.Cluster, "cluster", "", "kubeconfig `cluster` entry to use instead of the context's")
	fs.StringVar(&o.kube.User, "user", "", "kubeconfig `user` entry to use instead of the context's")
	fs.StringVar(&o.kube.Server, "server", "", "apiserver `URL` instead of the kubeconfig's")
	fs.StringVar(&o.kube.Server, "s", "", "short for --server")
	fs.StringVar(&o.kube.CertificateAuthority, "certificate-authority", "", "PEM `file` of the apiserver's CA instead of the kubeconfig's")
	fs.BoolVar(&o.kube.InsecureSkipTLSVerify, "insecure-skip-tls-verify", false, "do not verify the apiserver's certificate (insecure)")
	fs.StringVar(&o.kube.TLSServerName, "tls-server-name", "", "`name` to verify in the apiserver's certificate")
	fs.StringVar(&o.kube.ClientCertificate, "client-certificate", "", "PEM `file` of a client certificate for the apiserver")
	fs.StringVar(&o.kube.ClientKey, "client-key", "", "PEM `file` of the key of --client-certificate")
	fs.StringVar(&o.kube.Token, "token", "", "bearer `token` for the apiserver instead of the kubeconfig's credential (not the agent token)")

	for _, f := range ignoredFlags {
		for _, name := range []string{f.name, f.alias} {
			switch {
			case name == "":
			case f.isBool:
				fs.Bool(name, false, f.usage)
			default:
				fs.String(name, "", f.usage)
			}
		}
	}
	for name := range refusedFlags {
		fs.String(name, "", "refused")
	}
	return fs
}

// parseFlags parses the command line. For -h or --help it writes the help
// to help and returns flag.ErrHelp.
func parseFlags(args []string, help io.Writer) (*options, error) {
	o := options{serviceAccountDir: agentk.ServiceAccountDir}
	fs := newFlagSet(&o)
	if err := checkFlagNames(fs, args); err != nil {
		return nil, err
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printHelp(help, fs)
		}
		return nil, err
	}
	if fs.NArg() > 0 {
		// Not echoed: a stray argument is often half of an unquoted
		// --kas-header value.
		return nil, fmt.Errorf("%d unexpected argument(s) after the flags; quote values with spaces", fs.NArg())
	}
	var err error
	fs.Visit(func(f *flag.Flag) {
		if reason, ok := refusedFlags[f.Name]; ok && err == nil {
			err = fmt.Errorf("flag --%s of GitLab's agentk is not supported: %s", f.Name, reason)
		}
		if i := slices.IndexFunc(ignoredFlags, func(g ignoredFlag) bool { return f.Name == g.name || f.Name == g.alias }); i >= 0 {
			o.ignored = append(o.ignored, ignoredFlags[i])
		}
	})
	if err != nil {
		return nil, err
	}
	if err := o.kasHeaders.parse(); err != nil {
		return nil, err
	}
	return &o, nil
}

// checkFlagNames fails on the first flag fs does not define, before the
// flag package would, so that the message can say where the flag comes
// from. It follows the flag package's syntax: -name and --name, a value
// after = or in the next argument (but for booleans), and the flags end
// at the first argument that is not one, or after "--".
func checkFlagNames(fs *flag.FlagSet, args []string) error {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" || len(a) < 2 || a[0] != '-' {
			return nil
		}
		name, _ := strings.CutPrefix(a[1:], "-")
		name, _, withValue := strings.Cut(name, "=")
		if name == "help" || name == "h" {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			return unknownFlagError(name)
		}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); !withValue && !(ok && b.IsBoolFlag()) {
			i++ // the value
		}
	}
	return nil
}

// errUnknownFlag is wrapped by the error about a flag agentk does not know.
var errUnknownFlag = errors.New("unknown flag")

// unknownFlagError says whether name is a flag of a newer GitLab agentk or
// unknown altogether. Flag names are safe to echo; values are not.
func unknownFlagError(name string) error {
	if version, ok := newerGitLabFlags[name]; ok {
		return fmt.Errorf("%w --%s: it belongs to GitLab agentk %s; this agentk accepts the flags of GitLab agentk up to %s "+
			"and --kas-ca-cert-file of 16.9 (agentk --help lists them)", errUnknownFlag, name, version, gitlabVersion)
	}
	return fmt.Errorf("%w --%s: neither this agentk nor GitLab's agentk %s has it; see agentk --help", errUnknownFlag, name, gitlabVersion)
}

// printHelp writes --help: what agentk does, an example, the flags by
// section and the environment variables.
func printHelp(w io.Writer, fs *flag.FlagSet) {
	var b strings.Builder
	b.WriteString(`agentk, the caddy-kas agent: runs next to a Kubernetes cluster, keeps a tunnel open to the
agent server (KAS) and forwards the requests KAS sends through it to the cluster's kube-apiserver,
with the identity KAS chose. It takes the flags and environment of GitLab's agentk up to ` + gitlabVersion + `,
so the gitlab/gitlab-agent Helm chart runs it with --set image.repository=<this image>.

Usage:
  agentk --kas-address wss://<host>/-/kubernetes-agent/ --token-file <file> [flags]

Example, outside a cluster:
  POD_NAMESPACE=default POD_NAME=$(hostname) agentk \
    --kas-address wss://kas.example.com/-/kubernetes-agent/ \
    --token-file ./agent.token --kubeconfig ~/.kube/config
`)
	for _, s := range helpSections {
		fmt.Fprintf(&b, "\n%s:\n", s.title)
		for _, names := range s.flags {
			writeFlag(&b, fs, names)
		}
		if s.title == "Flags" {
			b.WriteString("  -h, --help\n    \tprint this help\n")
		}
	}
	b.WriteString("\nAccepted as GitLab's agentk accepts them, without effect here (logged at start):\n")
	for _, f := range ignoredFlags {
		names := []string{f.name}
		if f.alias != "" {
			names = append(names, f.alias)
		}
		writeFlag(&b, fs, names)
	}
	b.WriteString("\nRefused: --as, --as-group, --as-uid (" + refusedFlags["as"] + ").\n")
	b.WriteString(`
Environment:
  POD_NAMESPACE, POD_NAME   the pod's namespace and name from the downward API; required in a pod,
                            reported to KAS to tell agentk replicas apart
  AGENTK_TOKEN              the agent token, instead of --token-file; removed from the environment once read
  KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT
                            set by Kubernetes in a pod: agentk then uses the service account in
                            ` + agentk.ServiceAccountDir + `
  KUBECONFIG                outside a pod and without --kubeconfig: the kubeconfig (a single file)
  HTTPS_PROXY, HTTP_PROXY, NO_PROXY
                            proxies toward KAS and the apiserver (a kubeconfig's proxy-url wins)
  GOMAXPROCS, GOMEMLIMIT    Go runtime limits (the Helm chart sets them from resources.limits)
  Set by GitLab's Helm chart and not used here (logged at start): SERVICE_ACCOUNT_NAME,
  OCS_ENABLED, OCS_SERVICE_ACCOUNT_NAME (vulnerability scanning), GITLAB_AGENT_TELEMETRY_* (telemetry),
  POD_IP, OWN_PRIVATE_API_URL, POD_SELECTOR_LABELS (receptive agents), OTEL_* (tracing)
`)
	io.WriteString(w, b.String())
}

// writeFlag writes one help entry: the flag, its aliases, its argument and
// its usage with the default.
func writeFlag(b *strings.Builder, fs *flag.FlagSet, names []string) {
	f := fs.Lookup(names[0])
	arg, usage := flag.UnquoteUsage(f)
	spelled := make([]string, len(names))
	for i, n := range names {
		spelled[i] = "-" + n
		if len(n) > 1 {
			spelled[i] = "--" + n
		}
	}
	fmt.Fprintf(b, "  %s", strings.Join(spelled, ", "))
	if arg != "" && arg != "value" || f.Name == "kas-header" {
		fmt.Fprintf(b, " %s", arg)
	}
	fmt.Fprintf(b, "\n    \t%s", usage)
	if i := slices.IndexFunc(ignoredFlags, func(g ignoredFlag) bool { return g.name == f.Name }); i >= 0 {
		fmt.Fprintf(b, ": %s", ignoredFlags[i].reason)
	}
	switch _, err := strconv.Atoi(f.DefValue); {
	case f.DefValue == "" || f.DefValue == "false" || f.DefValue == "0":
	case err == nil:
		fmt.Fprintf(b, " (default %s)", f.DefValue)
	default:
		fmt.Fprintf(b, " (default %q)", f.DefValue)
	}
	b.WriteString("\n")
}
