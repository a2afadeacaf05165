package agentconfig

import (
	"bytes"
	"encoding/json"
	"fmt"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

// railsRequest is the body of GitLab's
// POST /api/v4/internal/kubernetes/agent_configuration (kas-spec §3.1):
// {"agent_id": "5", "agent_config": {...whole ConfigurationFile as
// JSON...}}. agent_id is a string, as GitLab's own agent server sends it:
// it encodes the request with protojson, which writes an int64 as a
// string (seen in the differential test against GitLab's KAS 16.5); Rails
// declares the parameter an Integer and reads the string as one.
// agent_config is the ConfigurationFile with the field names of the file
// itself (kas-spec §3.2), which Rails reads to refresh the agent's
// ci_access and user_access authorizations (kas-spec §2.5, §2.6).
type railsRequest struct {
	AgentID     int64           `json:"agent_id,string"`
	AgentConfig json.RawMessage `json:"agent_config"`
}

// RailsBody returns the JSON body the agent server POSTs to GitLab's
// agent_configuration endpoint after reading a new configuration for the
// agent agentID (kas-spec §3.1), for example
//
//	{"agent_id":"5","agent_config":{"ci_access":{"projects":[{"id":"group/app","access_as":{"ci_job":{}}}]}}}
//
// The body is compact JSON: passed as a json.RawMessage to an encoder such
// as encoding/json, it comes out unchanged. A nil f is an empty
// configuration, sent as {}.
func RailsBody(agentID int64, f *agentcfg.ConfigurationFile) ([]byte, error) {
	if agentID <= 0 {
		return nil, fmt.Errorf("agentconfig: agent id %d is not positive", agentID)
	}
	cfg, err := configJSON(f)
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(railsRequest{AgentID: agentID, AgentConfig: cfg})
	if err != nil {
		return nil, fmt.Errorf("agentconfig: encoding agent_configuration body: %w", err)
	}
	return b, nil
}

// configJSON encodes f as JSON with the names of the configuration file
// (snake_case, as GitLab's agentcfg.proto names them for JSON), leaving out
// unset fields; durations are strings such as "300s" and enums their
// names. The result is compact.
func configJSON(f *agentcfg.ConfigurationFile) (json.RawMessage, error) {
	if f == nil {
		f = &agentcfg.ConfigurationFile{}
	}
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("agentconfig: encoding configuration: %w", err)
	}
	// protojson varies its spacing on purpose; take it out.
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		return nil, fmt.Errorf("agentconfig: encoding configuration: %w", err)
	}
	return json.RawMessage(buf.Bytes()), nil
}
