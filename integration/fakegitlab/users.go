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
	"strconv"
	"strings"
)

// The access types authorize_proxy_user accepts (kas-spec §2.6).
const (
	AccessTypePersonalAccessToken = "personal_access_token"
	AccessTypeSessionCookie       = "session_cookie"
)

// UserAccess is one credential authorize_proxy_user knows: a user's
// personal access token or session cookie for one agent, and the answer.
type UserAccess struct {
	// AgentID is the agent the credential is presented for.
	AgentID int64
	// AccessType is AccessTypePersonalAccessToken or AccessTypeSessionCookie.
	AccessType string
	// AccessKey is the token or the (unescaped) _gitlab_kas cookie value.
	AccessKey string
	// CSRFToken is the CSRF token that must come with a session cookie; a
	// different one is answered 401, as Rails does. Unused for tokens.
	CSRFToken string
	// Status is the answer: 0 for 200 with the JSON below, or 400, 401, 403
	// or 404 for the refusals Rails gives.
	Status int
	// User is the user the credential belongs to.
	User User
	// ConfigProjectID is the agent's configuration project.
	ConfigProjectID int64
	// AccessAs is the user_access access_as as JSON, {"agent":{}} or
	// {"user":{"projects":[...],"groups":[...]}}; nil leaves the key out,
	// which newer Rails does when the configuration has none.
	AccessAs json.RawMessage
}

// AddUserAccess registers a credential for authorize_proxy_user.
func (s *Server) AddUserAccess(u UserAccess) {
	s.t.Helper()
	switch {
	case u.AgentID <= 0 || u.AccessKey == "":
		s.t.Fatalf("fakegitlab: AddUserAccess needs a positive AgentID and an AccessKey")
	case u.AccessType != AccessTypePersonalAccessToken && u.AccessType != AccessTypeSessionCookie:
		s.t.Fatalf("fakegitlab: AddUserAccess with access type %q", u.AccessType)
	case u.AccessType == AccessTypeSessionCookie && u.CSRFToken == "":
		s.t.Fatalf("fakegitlab: AddUserAccess: a session cookie needs a CSRFToken")
	case u.Status != 0 && proxyUserRefusals[u.Status] == "":
		s.t.Fatalf("fakegitlab: AddUserAccess with status %d, want 0, 400, 401, 403 or 404", u.Status)
	case u.AccessAs != nil && !json.Valid(u.AccessAs):
		s.t.Fatalf("fakegitlab: AddUserAccess: AccessAs is not JSON")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.userAccess = append(s.userAccess, u)
}

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
	s.mu.Lock()
	var match UserAccess
	found := false
	for _, u := range s.userAccess {
		if u.AgentID == req.AgentID.value && u.AccessType == *req.AccessType &&
			subtle.ConstantTimeCompare([]byte(u.AccessKey), []byte(*req.AccessKey)) == 1 {
			match, found = u, true
		}
	}
	s.mu.Unlock()
	switch {
	case !found:
		// A legitimate answer: Rails does not know the credential for this
		// agent.
		writeMessage(w, http.StatusUnauthorized, proxyUserRefusals[http.StatusUnauthorized])
	case match.AccessType == AccessTypeSessionCookie &&
		subtle.ConstantTimeCompare([]byte(match.CSRFToken), []byte(csrf)) != 1:
		// A legitimate answer too: the CSRF token does not go with the
		// session.
		writeMessage(w, http.StatusUnauthorized, proxyUserRefusals[http.StatusUnauthorized])
	case match.Status != 0:
		writeMessage(w, match.Status, proxyUserRefusals[match.Status])
	default:
		writeJSON(w, http.StatusOK, authorizeProxyUserResponse{
			Agent: proxyAgentJSON{ID: match.AgentID, ConfigProject: idJSON{match.ConfigProjectID}},
			User:  proxyUserJSON{ID: match.User.ID, Username: match.User.Username},
			// nil leaves access_as out
			AccessAs: match.AccessAs,
		})
	}
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
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
		return fmt.Errorf("Content-Type is %q, want application/json", ct)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return fmt.Errorf("read the request body: %v", err)
	}
	if len(body) > maxBody {
		return fmt.Errorf("the request body is larger than %d bytes", maxBody)
	}
	if t := bytes.TrimSpace(body); len(t) == 0 || t[0] != '{' {
		return errors.New("the request body is not a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("the request body does not have the documented shape: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("the request body has data after its JSON object")
	}
	return nil
}
