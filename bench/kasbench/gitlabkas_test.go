package kasbench

import (
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
)

// TestStandInHost runs the Rails stand-in under the harness's host, as the
// rows of GitLab's KAS do: a setup call the stand-in refuses is an error,
// not a crash; a call that breaks its contract is kept; close shuts it
// down.
func TestStandInHost(t *testing.T) {
	var logged []string
	h := newStandInHost(t.TempDir(), func(format string, args ...any) { logged = append(logged, format) })
	var rails *fakegitlab.Server
	err := h.setUp(func() {
		secret, _ := fakegitlab.NewSecret(h)
		rails = fakegitlab.Start(h, fakegitlab.Options{Secret: secret})
		rails.AddGroup(fakegitlab.Group{ID: gitlabKASGroupID, Path: gitlabKASGroup})
	})
	if err != nil {
		t.Fatalf("setting up the stand-in: %v", err)
	}
	err = h.setUp(func() {
		// A job in a project the stand-in does not have.
		rails.AddJob(fakegitlab.Job{Token: "t", JobID: 1, PipelineID: 1, ProjectID: 99, Username: gitlabKASUser})
		t.Error("AddJob returned after refusing the job")
	})
	if err == nil || !strings.Contains(err.Error(), "add both first") {
		t.Errorf("a refused setup call gave error %v", err)
	}
	// agent_info without the KAS JWT breaks the contract.
	resp, err := http.Get(rails.URL + fakegitlab.PathAgentInfo)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("agent_info without a JWT answered %s", resp.Status)
	}
	violations := h.close()
	if len(violations) != 1 || len(logged) != 1 || !strings.Contains(violations[0], "KAS JWT") {
		t.Errorf("%d violations kept, %d logged, want the missing KAS JWT: %q", len(violations), len(logged), violations)
	}
	if _, err := http.Get(rails.URL + fakegitlab.PathAgentInfo); err == nil {
		t.Error("the stand-in still answers after close")
	}
}
