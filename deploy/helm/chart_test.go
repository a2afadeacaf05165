// Package helm holds the tests of the Helm charts in this directory; the
// charts themselves are not Go. integration/ applies the rendered chart to a
// real kube-apiserver and runs the rendered agentk.
package helm

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/caddy-kas/caddy-kas/internal/helmchart"
)

const repoRoot = "../.."

// newHelm returns the pinned Helm and reads every file of the chart and
// the pin, so that go test's cache (which tracks the files a test opens)
// drops a cached result when they change: Helm reads them in another
// process.
func newHelm(t *testing.T) *helmchart.Helm {
	t.Helper()
	root, err := filepath.Abs(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	h, err := helmchart.New(root, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	err = filepath.WalkDir(h.Chart(), func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			_, err = os.ReadFile(path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadFile(filepath.Join(root, helmchart.ToolModuleDir, "go.mod")); err != nil {
		t.Fatal(err)
	}
	return h
}

// ciValues is a value file of the chart's ci/ directory.
func ciValues(h *helmchart.Helm, name string) string {
	return filepath.Join(h.Chart(), "ci", name)
}

// rendered is one render of the chart, with its Deployment's agentk
// container at hand.
type rendered struct {
	objects    []helmchart.Object
	deployment helmchart.Deployment
	agentk     helmchart.Container
}

func (r rendered) kinds() []string {
	var kinds []string
	for _, o := range r.objects {
		kinds = append(kinds, o.Kind+"/"+o.Metadata.Name)
	}
	slices.Sort(kinds)
	return kinds
}

func (r rendered) find(t *testing.T, kind, name string, out any) {
	t.Helper()
	if err := helmchart.Find(r.objects, kind, name, out); err != nil {
		t.Fatal(err)
	}
}

func (r rendered) env(name string) (helmchart.EnvVar, bool) {
	i := slices.IndexFunc(r.agentk.Env, func(e helmchart.EnvVar) bool { return e.Name == name })
	if i < 0 {
		return helmchart.EnvVar{}, false
	}
	return r.agentk.Env[i], true
}

// appVersion is the chart's appVersion, the default image tag.
func appVersion(t *testing.T, h *helmchart.Helm) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(h.Chart(), "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var chart struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(raw, &chart); err != nil || chart.AppVersion == "" {
		t.Fatalf("Chart.yaml has no appVersion (%v)", err)
	}
	return chart.AppVersion
}

// TestChart lints and renders the chart with each value file of ci/ (the
// least an install gives, every value set, objects made outside the chart)
// and with the values of a gitlab/gitlab-agent install, and checks what
// the values turned into.
func TestChart(t *testing.T) {
	h := newHelm(t)
	const ns = "agents"
	tests := []struct {
		name   string
		values helmchart.Values
		check  func(t *testing.T, r rendered)
	}{{
		name:   "defaults",
		values: helmchart.Values{Files: []string{ciValues(h, "minimal-values.yaml")}},
		check: func(t *testing.T, r rendered) {
			wantKinds := []string{
				"ClusterRole/ci-agentk-impersonate", "ClusterRoleBinding/ci-agentk", "ClusterRoleBinding/ci-agentk-impersonate",
				"Deployment/ci-agentk", "Secret/ci-agentk-token", "ServiceAccount/ci-agentk",
			}
			if got := r.kinds(); !slices.Equal(got, wantKinds) {
				t.Errorf("objects %v, want %v", got, wantKinds)
			}
			wantArgs := []string{
				"--token-file=/etc/agentk/secrets/token",
				"--kas-address=wss://kas.example.com/-/kubernetes-agent/",
				"--kas-connections=1",
				"--observability-listen-address=:8080",
			}
			if !slices.Equal(r.agentk.Args, wantArgs) {
				t.Errorf("args %q, want %q", r.agentk.Args, wantArgs)
			}
			if want := "registry.example.com/caddy-kas/agentk:" + appVersion(t, h); r.agentk.Image != want {
				t.Errorf("image %q, want %q (the placeholder repository and the chart's appVersion)", r.agentk.Image, want)
			}
			for name, field := range map[string]string{"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"} {
				if e, ok := r.env(name); !ok || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != field {
					t.Errorf("env %s is %+v, want the downward API's %s", name, e, field)
				}
			}
			if r.deployment.Spec.Replicas != 1 || len(r.deployment.Spec.Template.Spec.TopologySpreadConstraints) != 0 {
				t.Errorf("replicas %d with %d topology spread constraints, want 1 and none",
					r.deployment.Spec.Replicas, len(r.deployment.Spec.Template.Spec.TopologySpreadConstraints))
			}
			checkProbes(t, r, 8080)
			var token helmchart.Secret
			r.find(t, "Secret", "ci-agentk-token", &token)
			if string(token.Data["token"]) != "the-agent-token" {
				t.Errorf("the token Secret holds %q", token.Data["token"])
			}
			checkTokenVolume(t, r, "ci-agentk-token")
			checkBinding(t, r, "ci-agentk", "cluster-admin", "ci-agentk", ns)
			checkBinding(t, r, "ci-agentk-impersonate", "ci-agentk-impersonate", "ci-agentk", ns)
			var role struct {
				Rules []struct {
					APIGroups []string `json:"apiGroups"`
					Resources []string `json:"resources"`
					Verbs     []string `json:"verbs"`
				} `json:"rules"`
			}
			r.find(t, "ClusterRole", "ci-agentk-impersonate", &role)
			granted := map[string]bool{}
			for _, rule := range role.Rules {
				for _, g := range rule.APIGroups {
					for _, res := range rule.Resources {
						granted[g+"/"+res+"/"+strings.Join(rule.Verbs, ",")] = true
					}
				}
			}
			// What Kubernetes checks for each Impersonate-* header.
			for _, want := range []string{"/users/impersonate", "/groups/impersonate", "/serviceaccounts/impersonate", "authentication.k8s.io/*/impersonate"} {
				if !granted[want] {
					t.Errorf("the impersonation ClusterRole does not grant %s: %v", want, granted)
				}
			}
		},
	}, {
		name:   "every value",
		values: helmchart.Values{Files: []string{ciValues(h, "all-options-values.yaml")}},
		check: func(t *testing.T, r rendered) {
			wantArgs := []string{
				"--token-file=/etc/agentk/secrets/token",
				"--kas-address=wss://kas.example.com/-/kubernetes-agent/",
				"--kas-ca-cert-file=/etc/agentk/config/ca.crt",
				"--kas-tls-server-name=kas.internal.example.com",
				"--kas-header=Cookie: gitlab-canary",
				"--kas-header=X-Tenant: blue",
				"--kas-connections=4",
				"--observability-listen-address=:9090",
				"--kas-insecure-skip-tls-verify=false",
			}
			if !slices.Equal(r.agentk.Args, wantArgs) {
				t.Errorf("args %q, want %q", r.agentk.Args, wantArgs)
			}
			if want := "registry.example.com/platform/agentk:v1.2.3"; r.agentk.Image != want {
				t.Errorf("image %q, want %q", r.agentk.Image, want)
			}
			if e, ok := r.env("GOMEMLIMIT"); !ok || e.Value != "100MiB" {
				t.Errorf("extraEnv GOMEMLIMIT is %+v", e)
			}
			if _, ok := r.env("NODE_NAME"); !ok {
				t.Error("extraEnv NODE_NAME is missing")
			}
			checkProbes(t, r, 9090)
			var ca helmchart.ConfigMap
			r.find(t, "ConfigMap", "platform-agentk-kas-ca", &ca)
			if !strings.HasPrefix(ca.Data["ca.crt"], "-----BEGIN CERTIFICATE-----\nMIIBdzCCAR2gAwIBAgIBATAKBggqhkjOPQQDAjAXMRUwEwYDVQQDEwxjaGFydCB0\nZXN0") {
				t.Errorf("the CA ConfigMap holds %q, want config.kasCaCert", ca.Data["ca.crt"])
			}
			checkTokenVolume(t, r, "platform-agentk-token")
			checkBinding(t, r, "platform-agentk", "edit", "platform-agentk-sa", ns)
			checkBinding(t, r, "platform-agentk-impersonate", "platform-agentk-impersonate", "platform-agentk-sa", ns)
			checkPDB(t, r, "platform-agentk", "2")
			spread := r.deployment.Spec.Template.Spec.TopologySpreadConstraints
			if len(spread) != 1 || !strings.Contains(string(spread[0]), "topology.kubernetes.io/region") {
				t.Errorf("topology spread %s, want topologySpreadConstraints", spread)
			}
			tmpl := r.deployment.Spec.Template
			if tmpl.Metadata.Labels["team"] != "platform" || tmpl.Metadata.Annotations["prometheus.io/scrape"] != "true" {
				t.Errorf("pod labels %v and annotations %v lack podLabels or podAnnotations", tmpl.Metadata.Labels, tmpl.Metadata.Annotations)
			}
			if tmpl.Spec.PriorityClassName != "system-cluster-critical" || tmpl.Spec.NodeSelector["kubernetes.io/os"] != "linux" {
				t.Errorf("pod spec lacks priorityClassName or nodeSelector: %+v", tmpl.Spec)
			}
		},
	}, {
		name:   "objects made outside the chart",
		values: helmchart.Values{Files: []string{ciValues(h, "existing-objects-values.yaml")}},
		check: func(t *testing.T, r rendered) {
			wantKinds := []string{"ConfigMap/ci-agentk-kas-ca", "Deployment/ci-agentk", "PodDisruptionBudget/ci-agentk"}
			if got := r.kinds(); !slices.Equal(got, wantKinds) {
				t.Errorf("objects %v, want %v", got, wantKinds)
			}
			if !slices.Contains(r.agentk.Args, "--kas-ca-cert-file=/etc/agentk/config/ca.crt") {
				t.Errorf("config.caCert (GitLab's older name) does not give --kas-ca-cert-file: %q", r.agentk.Args)
			}
			if want := "registry.example.com/caddy-kas/agentk@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"; r.agentk.Image != want {
				t.Errorf("image %q, want %q", r.agentk.Image, want)
			}
			if got := r.deployment.Spec.Template.Spec.ServiceAccountName; got != "agent-sa" {
				t.Errorf("service account %q, want serviceAccount.name", got)
			}
			checkTokenVolume(t, r, "agent-token")
			checkPDB(t, r, "ci-agentk", "1")
			var keys []string
			for _, c := range r.deployment.Spec.Template.Spec.TopologySpreadConstraints {
				var constraint struct {
					TopologyKey string `json:"topologyKey"`
				}
				if err := json.Unmarshal(c, &constraint); err != nil {
					t.Fatal(err)
				}
				keys = append(keys, constraint.TopologyKey)
			}
			if want := []string{"kubernetes.io/hostname", "topology.kubernetes.io/zone"}; !slices.Equal(keys, want) {
				t.Errorf("topology spread over %q, want %q", keys, want)
			}
		},
	}, {
		// The values of a gitlab/gitlab-agent install (as in the README of
		// GitLab's chart) mean the same here.
		name: "GitLab chart values",
		values: helmchart.Values{Set: []string{
			"config.kasAddress=wss://gitlab.example.com/-/kubernetes-agent/", "config.secretName=gitlab-agent-token",
			"image.repository=registry.example.com/agentk", "image.tag=v16.5.0", "replicas=2",
			"serviceAccount.create=false", "serviceAccount.name=gitlab-agent", "rbac.useExistingRole=view",
		}},
		check: func(t *testing.T, r rendered) {
			if r.agentk.Image != "registry.example.com/agentk:v16.5.0" || r.deployment.Spec.Replicas != 2 {
				t.Errorf("image %q and %d replicas", r.agentk.Image, r.deployment.Spec.Replicas)
			}
			checkTokenVolume(t, r, "gitlab-agent-token")
			checkBinding(t, r, "ci-agentk", "view", "gitlab-agent", ns)
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := h.Lint(tt.values); err != nil {
				t.Fatal(err)
			}
			_, objects, err := h.Template("ci", ns, tt.values)
			if err != nil {
				t.Fatal(err)
			}
			r := rendered{objects: objects}
			r.find(t, "Deployment", "", &r.deployment)
			if containers := r.deployment.Spec.Template.Spec.Containers; len(containers) != 1 {
				t.Fatalf("the Deployment has %d containers, want agentk alone", len(containers))
			}
			r.agentk = r.deployment.Spec.Template.Spec.Containers[0]
			for _, o := range objects {
				if o.Metadata.Namespace != ns && !strings.HasPrefix(o.Kind, "Cluster") {
					t.Errorf("%s %s is in namespace %q, want the release's %q", o.Kind, o.Metadata.Name, o.Metadata.Namespace, ns)
				}
			}
			tt.check(t, r)
		})
	}
}

// checkProbes checks that both probes ask agentk's observability server,
// on the port it listens on.
func checkProbes(t *testing.T, r rendered, port int) {
	t.Helper()
	if len(r.agentk.Ports) != 1 || r.agentk.Ports[0].ContainerPort != port {
		t.Fatalf("container ports %+v, want the observability port %d", r.agentk.Ports, port)
	}
	for path, p := range map[string]*helmchart.Probe{"/liveness": r.agentk.LivenessProbe, "/readiness": r.agentk.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != path || string(p.HTTPGet.Port) != fmt.Sprintf("%q", r.agentk.Ports[0].Name) {
			t.Errorf("probe %+v, want GET %s on port %q", p, path, r.agentk.Ports[0].Name)
		}
	}
}

// checkTokenVolume checks that --token-file names the "token" key of
// secretName.
func checkTokenVolume(t *testing.T, r rendered, secretName string) {
	t.Helper()
	mount := slices.IndexFunc(r.agentk.VolumeMounts, func(m helmchart.VolumeMount) bool { return m.MountPath == "/etc/agentk/secrets" })
	if mount < 0 {
		t.Fatalf("nothing is mounted at the token file's directory: %+v", r.agentk.VolumeMounts)
	}
	spec := r.deployment.Spec.Template.Spec
	volume := slices.IndexFunc(spec.Volumes, func(v helmchart.Volume) bool { return v.Name == r.agentk.VolumeMounts[mount].Name })
	if volume < 0 || spec.Volumes[volume].Secret == nil {
		t.Fatalf("the token's mount is not a Secret volume: %+v", spec.Volumes)
	}
	s := spec.Volumes[volume].Secret
	if s.SecretName != secretName || !slices.Equal(s.Items, []helmchart.KeyPath{{Key: "token", Path: "token"}}) {
		t.Errorf("the token comes from %+v, want key token of Secret %s", s, secretName)
	}
}

func checkBinding(t *testing.T, r rendered, name, role, serviceAccount, ns string) {
	t.Helper()
	var b helmchart.ClusterRoleBinding
	r.find(t, "ClusterRoleBinding", name, &b)
	if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.Name != role || len(b.Subjects) != 1 ||
		b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != serviceAccount || b.Subjects[0].Namespace != ns {
		t.Errorf("ClusterRoleBinding %s is %+v, want ClusterRole %s for service account %s/%s", name, b, role, ns, serviceAccount)
	}
	if got := r.deployment.Spec.Template.Spec.ServiceAccountName; got != serviceAccount {
		t.Errorf("the pod runs as service account %q, the binding names %q", got, serviceAccount)
	}
}

func checkPDB(t *testing.T, r rendered, name, maxUnavailable string) {
	t.Helper()
	var pdb helmchart.PodDisruptionBudget
	r.find(t, "PodDisruptionBudget", name, &pdb)
	if string(pdb.Spec.MaxUnavailable) != maxUnavailable {
		t.Errorf("PodDisruptionBudget maxUnavailable %s, want %s", pdb.Spec.MaxUnavailable, maxUnavailable)
	}
	for k, v := range pdb.Spec.Selector.MatchLabels {
		if r.deployment.Spec.Template.Metadata.Labels[k] != v {
			t.Errorf("the PodDisruptionBudget selects %s=%s, which the pods do not have", k, v)
		}
	}
}

// TestChartRefuses renders the chart with values that cannot work and
// checks that Helm says which value to fix.
func TestChartRefuses(t *testing.T) {
	h := newHelm(t)
	tests := []struct {
		name string
		set  []string
		want string
	}{
		{"no token", []string{"config.kasAddress=wss://kas.example.com/-/kubernetes-agent/"}, "config.token or config.secretName"},
		{"no KAS address", []string{"config.token=t"}, "config.kasAddress"},
		{"existing service account without a name", []string{
			"config.kasAddress=wss://kas.example.com/-/kubernetes-agent/", "config.token=t", "serviceAccount.create=false",
		}, "serviceAccount.name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := h.Template("ci", "agents", helmchart.Values{Set: tt.set})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("helm template with %q: %v, want an error naming %s", tt.set, err, tt.want)
			}
		})
	}
}

// TestCIValuesSetEveryValue checks that each value of values.yaml is set in
// one of the ci/ value files, so that TestChart and the integration tests,
// which render with them, cover every documented option.
func TestCIValuesSetEveryValue(t *testing.T) {
	h := newHelm(t)
	readKeys := func(path string) map[string]bool {
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var values map[string]any
		if err := yaml.Unmarshal(raw, &values); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		keys := map[string]bool{}
		var walk func(prefix string, v any)
		walk = func(prefix string, v any) {
			m, ok := v.(map[string]any)
			if !ok || len(m) == 0 {
				keys[prefix] = true
				return
			}
			for k, sub := range m {
				walk(strings.TrimPrefix(prefix+"."+k, "."), sub)
			}
		}
		walk("", values)
		return keys
	}
	set := readKeys(ciValues(h, "all-options-values.yaml"))
	for k := range readKeys(ciValues(h, "existing-objects-values.yaml")) {
		set[k] = true
	}
	for k := range readKeys(filepath.Join(h.Chart(), "values.yaml")) {
		// a map value (podLabels: {}) is set by setting any key under it
		covered := set[k] || slices.ContainsFunc(slices.Collect(maps.Keys(set)), func(s string) bool { return strings.HasPrefix(s, k+".") })
		if !covered {
			t.Errorf("value %s of values.yaml is set in no ci/ value file", k)
		}
	}
}
