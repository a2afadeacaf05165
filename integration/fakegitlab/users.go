package fakegitlab

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// The access types authorize_proxy_user accepts (kas-spec §2.6).
const (
	AccessTypePersonalAccessToken = "personal_access_token"
	AccessTypeSessionCookie       = "session_cookie"
)

// proxyUserRefusals are the messages of the refusals Rails gives.
var proxyUserRefusals = map[int]string{
	http.StatusBadRequest:   "400 Bad request - Unable to get user from request data",
	http.StatusUnauthorized: "401 Unauthorized",
	http.StatusForbidden:    "403 Forbidden",
	http.StatusNotFound:     "404 Not found",
}

// authorizeProxyUserRequest is the body KAS sends; pointers tell a missing
// field from an empty one.
type authorizeProxyUserRequest struct {
	AgentID    *railsInteger `json:"agent_id"`
	AccessType *string       `json:"access_type"`
	AccessKey  *string       `json:"access_key"`
	CSRFToken  *string       `json:"csrf_token"`
}

// railsInteger is a parameter Rails declares "type: Integer" (Grape), read
// from a JSON body. Grape coerces it with Ruby's Integer(): a JSON integer,
// or a string such as GitLab's KAS sends (protojson writes an int64 as a
// string: "agent_id":"1"), which Integer(s, 10) reads: optional blanks
// around it, a sign, a "0d" prefix, decimal digits with single underscores
// between them. Anything else is "invalid", as Rails answers. (Integer()
// would also read a JSON number that is not an integer literal, 1e3 or
// 1.5, truncating; no client sends one, and the Server treats it as
// invalid.)
type railsInteger struct {
	value int64
	ok    bool // false: present, but not an integer Rails would read
}

// rubyDecimalInteger is what Ruby's Integer(s, 10) reads from a string.
var rubyDecimalInteger = regexp.MustCompile(`^[ \t\n\v\f\r]*([+-]?)(?:0[dD])?([0-9]+(?:_[0-9]+)*)[ \t\n\v\f\r]*$`)

func (i *railsInteger) UnmarshalJSON(b []byte) error {
	*i = railsInteger{}
	text := string(b)
	if strings.HasPrefix(text, `"`) {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		m := rubyDecimalInteger.FindStringSubmatch(s)
		if m == nil {
			return nil
		}
		text = m[1] + strings.ReplaceAll(m[2], "_", "")
	}
	if v, err := strconv.ParseInt(text, 10, 64); err == nil {
		i.value, i.ok = v, true
	}
	return nil
}

// authorizeProxyUser serves POST authorize_proxy_user (kas-spec §2.6).
func (s *Server) authorizeProxyUser(w http.ResponseWriter, r *http.Request) {
	var req authorizeProxyUserRequest
	if err := decodeJSONBody(r, &req); err != nil {
		s.violation(r, "%v", err)
		writeValidationError(w, err.Error())
		return
	}
	if problems := req.problems(); len(problems) > 0 {
		msg := strings.Join(problems, ", ")
		s.violation(r, "bad request body: %s", msg)
		writeValidationError(w, msg)
		return
	}
	if !s.accept(w, PathAuthorizeProxyUser) {
		return
	}
	csrf := ""
	if req.CSRFToken != nil {
		csrf = *req.CSRFToken
	}
	status, resp := s.decideProxyUser(req.AgentID.value, *req.AccessType, *req.AccessKey, csrf)
	if status != http.StatusOK {
		writeMessage(w, status, proxyUserRefusals[status])
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// decideProxyUser decides authorize_proxy_user as Rails does
// (Clusters::Agents::AuthorizeProxyUserService, kas-spec §2.6): the
// credential must be a live session with its CSRF token, or a personal
// access token with the k8s_proxy scope; the agent must exist; and the
// user must be a member, Developer or above, of a project or group that
// the user_access of the configuration KAS last posted for the agent
// lists. access_as comes from that configuration; for access_as user the
// answer lists each of those projects and groups the user may use, with
// the user's roles there.
func (s *Server) decideProxyUser(agentID int64, accessType, accessKey, csrf string) (int, authorizeProxyUserResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	agent := s.agentByIDLocked(agentID)
	if agent == nil {
		return http.StatusNotFound, authorizeProxyUserResponse{}
	}
	var userID int64
	switch accessType {
	case AccessTypeSessionCookie:
		var found *session
		for _, ss := range s.sessions {
			if subtle.ConstantTimeCompare([]byte(ss.cookie), []byte(accessKey)) == 1 {
				found = ss
			}
		}
		if found == nil || found.expired || subtle.ConstantTimeCompare([]byte(found.csrf), []byte(csrf)) != 1 {
			return http.StatusUnauthorized, authorizeProxyUserResponse{}
		}
		userID = found.userID
	case AccessTypePersonalAccessToken:
		var found *personalAccessToken
		for i := range s.pats {
			if subtle.ConstantTimeCompare([]byte(s.pats[i].token), []byte(accessKey)) == 1 {
				found = &s.pats[i]
			}
		}
		if found == nil {
			return http.StatusUnauthorized, authorizeProxyUserResponse{}
		}
		if !slices.Contains(found.scopes, "k8s_proxy") {
			return http.StatusForbidden, authorizeProxyUserResponse{}
		}
		userID = found.userID
	}
	user := s.userByIDLocked(userID)
	cfg := s.configs[agent.ID]
	if cfg == nil || cfg.user == nil {
		return http.StatusForbidden, authorizeProxyUserResponse{}
	}
	var projects, groups []accessRolesJSON
	for _, p := range cfg.user.projects {
		if level := s.accessLevelLocked(userID, p.Path); level >= developerLevel {
			projects = append(projects, accessRolesJSON{ID: p.ID, Roles: rolesUpTo(level)})
		}
	}
	for _, g := range cfg.user.groups {
		if level := s.accessLevelLocked(userID, g.Path); level >= developerLevel {
			groups = append(groups, accessRolesJSON{ID: g.ID, Roles: rolesUpTo(level)})
		}
	}
	if len(projects) == 0 && len(groups) == 0 {
		return http.StatusForbidden, authorizeProxyUserResponse{}
	}
	resp := authorizeProxyUserResponse{
		Agent: proxyAgentJSON{ID: agent.ID, ConfigProject: idJSON{agent.ProjectID}},
		User:  proxyUserJSON{ID: user.ID, Username: user.Username},
	}
	var accessAs map[string]json.RawMessage
	if cfg.user.accessAs != nil && json.Unmarshal(cfg.user.accessAs, &accessAs) == nil {
		if _, ok := accessAs["user"]; ok {
			resp.AccessAs, _ = json.Marshal(map[string]any{"user": map[string]any{
				"projects": nonNil(projects), "groups": nonNil(groups)}})
		} else {
			resp.AccessAs = json.RawMessage(`{"agent":{}}`)
		}
	}
	// Without access_as (optional since GitLab 18.3) Rails leaves the key
	// out, and KAS uses the agent's own identity.
	return http.StatusOK, resp
}

// accessRolesJSON is a project or group of access_as user with the user's
// roles in it.
type accessRolesJSON struct {
	ID    int64    `json:"id"`
	Roles []string `json:"roles"`
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// problems lists what is wrong with a decoded request body, in the words of
// Rails' parameter validation.
func (req *authorizeProxyUserRequest) problems() []string {
	var out []string
	switch {
	case req.AgentID == nil:
		out = append(out, "agent_id is missing")
	case !req.AgentID.ok || req.AgentID.value <= 0:
		out = append(out, "agent_id is invalid")
	}
	switch {
	case req.AccessType == nil:
		out = append(out, "access_type is missing")
	case *req.AccessType != AccessTypePersonalAccessToken && *req.AccessType != AccessTypeSessionCookie:
		out = append(out, "access_type does not have a valid value")
	}
	switch {
	case req.AccessKey == nil:
		out = append(out, "access_key is missing")
	case *req.AccessKey == "":
		out = append(out, "access_key is empty")
	}
	if req.AccessType != nil {
		hasCSRF := req.CSRFToken != nil && *req.CSRFToken != ""
		switch {
		case *req.AccessType == AccessTypeSessionCookie && !hasCSRF:
			out = append(out, "csrf_token is missing (required for session_cookie)")
		case *req.AccessType == AccessTypePersonalAccessToken && hasCSRF:
			out = append(out, "csrf_token is set for personal_access_token (it is only for session_cookie)")
		}
	}
	return out
}

// The authorize_proxy_user answer (kas-spec §2.6).
type (
	authorizeProxyUserResponse struct {
		Agent    proxyAgentJSON  `json:"agent"`
		User     proxyUserJSON   `json:"user"`
		AccessAs json.RawMessage `json:"access_as,omitempty"`
	}
	proxyAgentJSON struct {
		ID            int64  `json:"id"`
		ConfigProject idJSON `json:"config_project"`
	}
	proxyUserJSON struct {
		ID       int64  `json:"id"`
		Username string `json:"username"`
	}
)

// maxBody bounds the request bodies the Server reads.
const maxBody = 1 << 20

// decodeJSONBody decodes a JSON request body into v strictly: the content
// type must be application/json, the body one JSON object with no field v
// does not have and nothing after it.
func decodeJSONBody(r *http.Request, v any) error {
	_, err := decodeJSONBodyBytes(r, v)
	return err
}

// decodeJSONBodyBytes is decodeJSONBody that also returns the body.
func decodeJSONBodyBytes(r *http.Request, v any) ([]byte, error) {
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
		return nil, fmt.Errorf("Content-Type is %q, want application/json", ct)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return nil, fmt.Errorf("read the request body: %v", err)
	}
	if len(body) > maxBody {
		return nil, fmt.Errorf("the request body is larger than %d bytes", maxBody)
	}
	if t := bytes.TrimSpace(body); len(t) == 0 || t[0] != '{' {
		return nil, errors.New("the request body is not a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return nil, fmt.Errorf("the request body does not have the documented shape: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("the request body has data after its JSON object")
	}
	return body, nil
}
