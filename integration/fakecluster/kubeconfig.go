package fakecluster

import (
	"encoding/json"
	"fmt"
	"os"
)

// KubeconfigUser is one user of a kubeconfig, with a context of the same
// name.
type KubeconfigUser struct {
	Name  string
	Token string
}

// WriteKubeconfig writes a kubeconfig for the Cluster (its URL and CAFile)
// with one context per user, named like the user; the first user's context
// is the current one. The file is JSON, which every kubeconfig reader takes.
func (c *Cluster) WriteKubeconfig(path string, users ...KubeconfigUser) error {
	return WriteKubeconfig(path, c.URL(), c.CAFile(), users...)
}

// WriteKubeconfig writes a kubeconfig for the server with the CA file, as
// Cluster.WriteKubeconfig does; it serves a server in front of a Cluster too.
func WriteKubeconfig(path, server, caFile string, users ...KubeconfigUser) error {
	type named struct {
		Name    string         `json:"name"`
		Cluster map[string]any `json:"cluster,omitempty"`
		User    map[string]any `json:"user,omitempty"`
		Context map[string]any `json:"context,omitempty"`
	}
	config := struct {
		APIVersion     string  `json:"apiVersion"`
		Kind           string  `json:"kind"`
		Clusters       []named `json:"clusters"`
		Users          []named `json:"users"`
		Contexts       []named `json:"contexts"`
		CurrentContext string  `json:"current-context"`
	}{
		APIVersion: "v1",
		Kind:       "Config",
		Clusters:   []named{{Name: "fakecluster", Cluster: map[string]any{"server": server, "certificate-authority": caFile}}},
		Users:      []named{},
		Contexts:   []named{},
	}
	for _, u := range users {
		config.Users = append(config.Users, named{Name: u.Name, User: map[string]any{"token": u.Token}})
		config.Contexts = append(config.Contexts, named{Name: u.Name, Context: map[string]any{"cluster": "fakecluster", "user": u.Name}})
	}
	if len(users) > 0 {
		config.CurrentContext = users[0].Name
	}
	b, err := json.MarshalIndent(config, "", "  ")
	if err != nil {
		return fmt.Errorf("fakecluster: encode kubeconfig: %w", err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("fakecluster: write kubeconfig: %w", err)
	}
	return nil
}
