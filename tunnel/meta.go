package tunnel

import (
	"errors"
	"fmt"
	"strings"
)

// AgentMeta is what an agent tells KAS about itself when it connects. Our
// agentk sends it in its handshake; GitLab's agentk sends the same facts in
// AgentRegistrar/Register.
type AgentMeta struct {
	// Version and CommitID identify the agentk build.
	Version  string
	CommitID string
	// PodNamespace and PodName are where agentk runs (from the downward
	// API's POD_NAMESPACE and POD_NAME).
	PodNamespace string
	PodName      string
	// PodID is a random number agentk picks once at start; all connections
	// of one agentk process share it. GitLab calls it the connection id of
	// an agentk pod.
	PodID int64
	// ConnectionID is a random number agentk picks per tunnel connection.
	ConnectionID int64
	// KubernetesVersion is the gitVersion the cluster reported to agentk
	// (for example "v1.32.13"), empty if agentk could not ask.
	KubernetesVersion string
	// KubernetesPlatform is the platform the cluster reported (for
	// example "linux/amd64"); GitLab's agent tracker shows it.
	KubernetesPlatform string
}

// MaxMetaValueLen bounds each text value of [AgentMeta], so that an agent
// cannot make KAS keep arbitrary amounts of memory per connection.
// Kubernetes names are at most 253 bytes.
const MaxMetaValueLen = 253

// ErrBadMeta is wrapped by errors about malformed agent metadata.
var ErrBadMeta = errors.New("malformed agent metadata")

// ValidMetaValue reports whether KAS accepts v as a text value of
// [AgentMeta]: printable ASCII, at most [MaxMetaValueLen] bytes. An agent
// leaves out a value that is not, rather than be refused.
func ValidMetaValue(v string) bool {
	return len(v) <= MaxMetaValueLen && strings.IndexFunc(v, notPrintableASCII) < 0
}

func notPrintableASCII(r rune) bool { return r < 0x20 || r > 0x7e }

// Validate returns an error wrapping [ErrBadMeta] that names every text
// value that is not [ValidMetaValue]. Such values can only come from a
// broken or hostile agent.
func (m AgentMeta) Validate() error {
	var errs []error
	for _, f := range []struct{ name, value string }{
		{"agent version", m.Version},
		{"agent commit", m.CommitID},
		{"pod namespace", m.PodNamespace},
		{"pod name", m.PodName},
		{"kubernetes version", m.KubernetesVersion},
		{"kubernetes platform", m.KubernetesPlatform},
	} {
		if !ValidMetaValue(f.value) {
			errs = append(errs, fmt.Errorf("%w: %s is not printable ASCII of at most %d bytes", ErrBadMeta, f.name, MaxMetaValueLen))
		}
	}
	return errors.Join(errs...)
}
