package main

import (
	"strings"

	"go.uber.org/zap"
)

// unusedGitLabEnv are environment variables that the gitlab/gitlab-agent
// Helm chart sets for GitLab's agentk (or that GitLab's agentk reads), and
// that this agentk has no use for, with the reason. They are accepted as
// they are and logged once at start, so that nobody wonders whether they
// had an effect. A name ending in "*" is a prefix.
var unusedGitLabEnv = []struct {
	names  []string
	reason string
}{
	{[]string{"SERVICE_ACCOUNT_NAME", "OCS_ENABLED", "OCS_SERVICE_ACCOUNT_NAME"},
		"GitLab's agentk starts vulnerability-scanning pods with them; this agentk has no scanning"},
	{[]string{"GITLAB_AGENT_TELEMETRY_*"},
		"GitLab's agentk reports them to GitLab as telemetry; this agentk sends none"},
	{[]string{"POD_IP", "OWN_PRIVATE_API_URL", "POD_SELECTOR_LABELS"},
		"GitLab's agentk uses them for receptive agents and its private API between replicas; this agentk has neither"},
	{[]string{"OTEL_*"},
		"this agentk exports no traces"},
}

// unusedEnv returns, per group of unusedGitLabEnv, the names of its
// variables that are set in environ, in the table's order; nil for a group
// none of which is set.
func unusedEnv(environ []string) [][]string {
	found := make([][]string, len(unusedGitLabEnv))
	for i, group := range unusedGitLabEnv {
		for _, want := range group.names {
			prefix, isPrefix := strings.CutSuffix(want, "*")
			for _, kv := range environ {
				name, _, _ := strings.Cut(kv, "=")
				if name == want || isPrefix && strings.HasPrefix(name, prefix) {
					found[i] = append(found[i], name)
				}
			}
		}
	}
	return found
}

// logUnusedEnv logs, once per group, which of the variables of
// unusedGitLabEnv are set. Only names are logged: values may be secrets.
func logUnusedEnv(logger *zap.Logger, environ []string) {
	for i, set := range unusedEnv(environ) {
		if len(set) > 0 {
			logger.Info("environment variables of GitLab's agentk have no effect here", zap.Strings("env", set), zap.String("reason", unusedGitLabEnv[i].reason))
		}
	}
}
