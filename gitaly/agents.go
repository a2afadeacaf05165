package gitaly

import (
	"context"
	"errors"
	"regexp"
)

// AgentsDir is the directory of agent configurations in a configuration
// project, and AgentConfigFileName the file in each agent's directory
// (kas-spec §3.1).
const (
	AgentsDir           = ".gitlab/agents"
	AgentConfigFileName = "config.yaml"
)

// agentConfigPath matches the path of an agent's configuration file, the
// agent's name (an RFC 1123 DNS label) being its first group. The length
// of a label is not checked, as GitLab's KAS does not.
var agentConfigPath = regexp.MustCompile(`^\.gitlab/agents/([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)/config\.yaml$`)

// AgentConfigPath is the path of the configuration file of the agent
// called name.
func AgentConfigPath(name string) string {
	return AgentsDir + "/" + name + "/" + AgentConfigFileName
}

// AgentNameFromPath returns the agent whose configuration file path is, if
// it is one.
func AgentNameFromPath(path string) (name string, ok bool) {
	m := agentConfigPath.FindStringSubmatch(path)
	if m == nil {
		return "", false
	}
	return m[1], true
}

// AgentConfigFile is the configuration file of one agent.
type AgentConfigFile struct {
	// Path is the file's path from the repository root, e.g.
	// ".gitlab/agents/foo/config.yaml".
	Path string
	// AgentName is the agent's name, e.g. "foo".
	AgentName string
}

// AgentConfigFiles lists the agent configuration files of repo at
// revision, as ListAgentConfigFiles answers: each file (not directory or
// submodule) under .gitlab/agents whose path is that of an agent's
// configuration file. A revision without .gitlab/agents has none.
func (c *Client) AgentConfigFiles(ctx context.Context, repo Repository, revision string) ([]AgentConfigFile, error) {
	entries, err := c.ListDir(ctx, repo, revision, AgentsDir)
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var files []AgentConfigFile
	for _, e := range entries {
		if e.Type != EntryBlob {
			continue
		}
		if name, ok := AgentNameFromPath(e.Path); ok {
			files = append(files, AgentConfigFile{Path: e.Path, AgentName: name})
		}
	}
	return files, nil
}
