package fakegitlab

import (
	"bytes"
	"encoding/json"
	"net/http"
)

// PostedConfiguration is an agent configuration KAS posted.
type PostedConfiguration struct {
	AgentID int64
	// Body is the request body as KAS sent it.
	Body json.RawMessage
	// UserAgent tells which KAS posted it.
	UserAgent string
}

// agentConfigurationRequest is the body of POST agent_configuration
// (kas-spec §3.1).
type agentConfigurationRequest struct {
	AgentID     *railsInteger   `json:"agent_id"`
	AgentConfig json.RawMessage `json:"agent_config"`
}

// agentConfiguration serves POST agent_configuration: KAS hands Rails an
// agent's configuration file, from which Rails refreshes the agent's
// ci_access and user_access authorizations (kas-spec §3.1). It answers 204,
// or 404 for an agent GitLab does not have.
func (s *Server) agentConfiguration(w http.ResponseWriter, r *http.Request) {
	var req agentConfigurationRequest
	body, err := decodeJSONBodyBytes(r, &req)
	if err != nil {
		s.violation(r, "%v", err)
		writeValidationError(w, err.Error())
		return
	}
	switch {
	case req.AgentID == nil:
		s.violation(r, "agent_id is missing")
		writeValidationError(w, "agent_id is missing")
		return
	case !req.AgentID.ok || req.AgentID.value <= 0:
		s.violation(r, "agent_id is invalid")
		writeValidationError(w, "agent_id is invalid")
		return
	case len(req.AgentConfig) == 0 || string(req.AgentConfig) == "null":
		s.violation(r, "agent_config is missing")
		writeValidationError(w, "agent_config is missing")
		return
	case bytes.TrimSpace(req.AgentConfig)[0] != '{':
		s.violation(r, "agent_config is not a JSON object")
		writeValidationError(w, "agent_config is invalid")
		return
	}
	if !s.accept(w, PathAgentConfiguration) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	agent := s.agentByIDLocked(req.AgentID.value)
	if agent == nil {
		// A legitimate answer: the agent was deleted.
		writeMessage(w, http.StatusNotFound, "404 Not found")
		return
	}
	cfg, err := s.resolveConfigLocked(*agent, req.AgentConfig)
	if err != nil {
		s.violation(r, "%v", err) // takes no s.mu
		writeValidationError(w, err.Error())
		return
	}
	s.configs[agent.ID] = cfg
	s.posted = append(s.posted, PostedConfiguration{AgentID: agent.ID, Body: body, UserAgent: r.Header.Get("User-Agent")})
	w.WriteHeader(http.StatusNoContent)
}

// PostedConfigurations returns the configurations KAS posted, oldest
// first.
func (s *Server) PostedConfigurations() []PostedConfiguration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]PostedConfiguration(nil), s.posted...)
}
