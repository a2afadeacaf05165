package helmchart

import (
	"errors"
	"strings"
	"testing"
)

func TestDecode(t *testing.T) {
	tests := []struct {
		name      string
		manifests string
		want      []string // kind/name
		errText   string
	}{
		{
			name: "helm template output",
			manifests: "---\n# Source: agentk/templates/serviceaccount.yaml\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n" +
				"---\n# Source: agentk/templates/configmap.yaml\n" + // a template that rendered nothing
				"---\n# Source: agentk/templates/deployment.yaml\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: b\n  namespace: ns\n",
			want: []string{"ServiceAccount/a", "Deployment/b"},
		},
		{name: "nothing", manifests: "", want: nil},
		{name: "a document without a kind", manifests: "metadata:\n  name: a\n", errText: "document 1 has no kind or name"},
		{name: "not YAML", manifests: "---\nkind: [\n", errText: "document 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objects, err := Decode([]byte(tt.manifests))
			if tt.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("Decode: %v, want an error containing %q", err, tt.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, o := range objects {
				got = append(got, o.Kind+"/"+o.Metadata.Name)
			}
			if strings.Join(got, " ") != strings.Join(tt.want, " ") {
				t.Errorf("Decode gave %q, want %q", got, tt.want)
			}
		})
	}
}

func TestFind(t *testing.T) {
	objects, err := Decode([]byte("kind: Secret\nmetadata: {name: one}\ndata: {token: dG9rZW4=}\n---\n" +
		"kind: Secret\nmetadata: {name: two}\n---\nkind: ConfigMap\nmetadata: {name: three}\ndata: {ca.crt: pem}\n"))
	if err != nil {
		t.Fatal(err)
	}
	var s Secret
	if err := Find(objects, "Secret", "one", &s); err != nil || string(s.Data["token"]) != "token" {
		t.Errorf("Find Secret one: %v, data %q", err, s.Data)
	}
	var cm ConfigMap
	if err := Find(objects, "ConfigMap", "", &cm); err != nil || cm.Data["ca.crt"] != "pem" {
		t.Errorf("Find the only ConfigMap: %v, data %q", err, cm.Data)
	}
	if err := Find(objects, "Secret", "", &s); err == nil {
		t.Error("Find with no name among two Secrets did not fail")
	}
	if err := Find(objects, "Deployment", "", &s); !errors.Is(err, ErrNotFound) {
		t.Errorf("Find Deployment: %v, want ErrNotFound", err)
	}
}
