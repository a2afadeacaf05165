// Package helmchart lints and renders the agentk Helm chart (deploy/helm/agentk)
// with Helm as a Go program: the helm.sh/helm/v3 command that the module in
// hack/helm pins, run with `go tool helm`. That module is separate from the
// repository's, so that Helm's large dependency tree neither enters the
// products' module graph nor changes their dependency versions. Only tests
// use this package.
package helmchart

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"
)

// ChartDir and ToolModuleDir are the chart and the module that pins Helm,
// relative to the repository's root.
const (
	ChartDir      = "deploy/helm/agentk"
	ToolModuleDir = "hack/helm"
)

// Helm runs the pinned Helm. Its zero value is not usable; see New.
type Helm struct {
	goBin    string
	repoRoot string
	home     string // HELM_*_HOME: Helm's cache, config and data, kept out of the user's home
}

// New returns a Helm for the repository at repoRoot that keeps its state
// under stateDir (a test's temporary directory).
func New(repoRoot, stateDir string) (*Helm, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		if goroot := os.Getenv("GOROOT"); goroot != "" {
			goBin, err = filepath.Join(goroot, "bin", "go"), nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("helm runs with go tool, and the go command is not on PATH: %w", err)
	}
	return &Helm{goBin: goBin, repoRoot: repoRoot, home: stateDir}, nil
}

// Chart is the chart's directory.
func (h *Helm) Chart() string { return filepath.Join(h.repoRoot, ChartDir) }

// Run runs helm with args and returns its standard output; the error
// carries its standard error.
func (h *Helm) Run(args ...string) ([]byte, error) {
	cmd := exec.Command(h.goBin, append([]string{"tool", "helm"}, args...)...)
	cmd.Dir = filepath.Join(h.repoRoot, ToolModuleDir)
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(h.home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(h.home, "config"),
		"HELM_DATA_HOME="+filepath.Join(h.home, "data"),
	)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("helm %s: %w\n%s%s", strings.Join(args, " "), err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes(), nil
}

// Values are what a lint or render is given: value files (paths), then
// --set assignments (key=value, typed as helm --set types them).
type Values struct {
	Files []string
	Set   []string
}

func (v Values) args() []string {
	var args []string
	for _, f := range v.Files {
		args = append(args, "--values", f)
	}
	for _, s := range v.Set {
		args = append(args, "--set", s)
	}
	return args
}

// Lint runs helm lint --strict on the chart with v.
func (h *Helm) Lint(v Values) error {
	_, err := h.Run(append([]string{"lint", "--strict", h.Chart()}, v.args()...)...)
	return err
}

// Template renders the chart as release in namespace with v and returns the
// manifests as helm prints them and decoded.
func (h *Helm) Template(release, namespace string, v Values) ([]byte, []Object, error) {
	out, err := h.Run(append([]string{"template", release, h.Chart(), "--namespace", namespace}, v.args()...)...)
	if err != nil {
		return nil, nil, err
	}
	objects, err := Decode(out)
	return out, objects, err
}

// Object is one rendered Kubernetes object.
type Object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name        string            `json:"name"`
		Namespace   string            `json:"namespace"`
		Labels      map[string]string `json:"labels"`
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
	// JSON is the whole object, for decoding into a kind's own type.
	JSON json.RawMessage `json:"-"`
}

// Decode splits helm template's output into its YAML documents and decodes
// each; empty documents (a template that rendered nothing) are left out.
func Decode(manifests []byte) ([]Object, error) {
	var objects []Object
	for i, doc := range splitDocuments(string(manifests)) {
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			return nil, fmt.Errorf("document %d: %w\n%s", i+1, err, doc)
		}
		if string(js) == "null" {
			continue
		}
		var o Object
		if err := json.Unmarshal(js, &o); err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		if o.Kind == "" || o.Metadata.Name == "" {
			return nil, fmt.Errorf("document %d has no kind or name:\n%s", i+1, doc)
		}
		o.JSON = js
		objects = append(objects, o)
	}
	return objects, nil
}

// splitDocuments splits a YAML stream at its "---" lines.
func splitDocuments(stream string) []string {
	var docs []string
	var cur strings.Builder
	for line := range strings.Lines(stream) {
		if strings.TrimRight(line, " \r\n") == "---" {
			docs = append(docs, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteString(line)
	}
	return append(docs, cur.String())
}

// ErrNotFound is returned by Find when no object has the kind and name.
var ErrNotFound = errors.New("no such object in the rendered chart")

// Find decodes the object of kind and name into out (name "" matches the
// only object of the kind).
func Find(objects []Object, kind, name string, out any) error {
	var found []Object
	for _, o := range objects {
		if o.Kind == kind && (name == "" || o.Metadata.Name == name) {
			found = append(found, o)
		}
	}
	switch len(found) {
	case 0:
		return fmt.Errorf("%s %q: %w", kind, name, ErrNotFound)
	case 1:
		return json.Unmarshal(found[0].JSON, out)
	}
	return fmt.Errorf("%d objects of kind %s named %q", len(found), kind, name)
}
