package fakegitlab

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"

	"github.com/caddy-kas/caddy-kas/integration/fakegitaly"
)

// Agent is an agent registered in the fake GitLab, with one of its tokens.
// Adding the same agent twice with two tokens gives it two active tokens,
// as Rails allows.
type Agent struct {
	// ID is the agent's id, ProjectID the id of its configuration project.
	ID, ProjectID int64
	// Name is the agent's name and Token the agent token agentk presents.
	Name, Token string
	// ProjectPath is the configuration project's full path, such as
	// "group/project": that of the project ProjectID if it was added,
	// else "group/project-<ProjectID>" unless given.
	ProjectPath string
}

// agentToken is one registered agent token.
type agentToken struct {
	agent   Agent
	revoked bool
}

// AddAgent registers an agent token; agent_info then answers for it.
func (s *Server) AddAgent(a Agent) {
	s.t.Helper()
	if a.ID <= 0 || a.ProjectID <= 0 || a.Name == "" || a.Token == "" {
		s.t.Fatalf("fakegitlab: AddAgent needs a positive ID and ProjectID, a Name and a Token")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.projectByIDLocked(a.ProjectID); p != nil {
		if a.ProjectPath != "" && !strings.EqualFold(a.ProjectPath, p.Path) {
			s.t.Fatalf("fakegitlab: AddAgent with project path %q for project %d, which is %q", a.ProjectPath, p.ID, p.Path)
		}
		a.ProjectPath = p.Path
	}
	if a.ProjectPath == "" {
		a.ProjectPath = fmt.Sprintf("group/project-%d", a.ProjectID)
	}
	if s.findAgentLocked(a.Token) != nil {
		s.t.Fatalf("fakegitlab: AddAgent with a token that is already registered")
	}
	s.agents = append(s.agents, &agentToken{agent: a})
}

// RevokeAgentToken revokes an agent token: agent_info then answers 401 for
// it, as Rails does for a token that is no longer active.
func (s *Server) RevokeAgentToken(token string) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	at := s.findAgentLocked(token)
	if at == nil {
		s.t.Fatalf("fakegitlab: RevokeAgentToken with a token that was never added")
	}
	at.revoked = true
}

// findAgentLocked finds a registered token, revoked or not, comparing in
// constant time. s.mu must be held.
func (s *Server) findAgentLocked(token string) *agentToken {
	var found *agentToken
	for _, at := range s.agents {
		if subtle.ConstantTimeCompare([]byte(at.agent.Token), []byte(token)) == 1 {
			found = at
		}
	}
	return found
}

// agentByIDLocked finds the agent with id, whichever of its tokens are
// revoked; with several tokens, the last added describes it. s.mu must be
// held while the pointer is used.
func (s *Server) agentByIDLocked(id int64) *Agent {
	for i := len(s.agents) - 1; i >= 0; i-- {
		if s.agents[i].agent.ID == id {
			return &s.agents[i].agent
		}
	}
	return nil
}

// agentTokenHeader is where newer Rails also accepts the agent token.
const agentTokenHeader = "Gitlab-Agentk-Api-Request"

// agentInfo serves GET agent_info (kas-spec §2.1).
func (s *Server) agentInfo(w http.ResponseWriter, r *http.Request) {
	token, problem := agentTokenFrom(r.Header)
	if problem != "" {
		s.violation(r, "%s", problem)
		writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
		return
	}
	if !s.accept(w, PathAgentInfo) {
		return
	}
	s.mu.Lock()
	at := s.findAgentLocked(token)
	var a Agent
	var repo *fakegitaly.Repo
	active := at != nil && !at.revoked
	if active {
		a = at.agent
		if p := s.projectByIDLocked(a.ProjectID); p != nil {
			repo = p.Repo
		}
	}
	s.mu.Unlock()
	if !active {
		// A legitimate answer: agentk presented a token GitLab does not
		// know or has revoked.
		writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
		return
	}
	info := agentInfoResponse(a)
	if repo != nil {
		info.GitalyInfo = gitalyInfoJSON{Address: s.gitaly.Address(), Token: s.gitaly.Token(), Features: map[string]string{"gitaly-feature-test-flag": "true"}}
		info.GitalyRepository.StorageName = repo.StorageName
		info.GitalyRepository.RelativePath = repo.RelativePath
		info.GitalyRepository.GLRepository = repo.GlRepository
		info.GitalyRepository.GLProjectPath = repo.GlProjectPath
	}
	writeJSON(w, http.StatusOK, info)
}

// agentTokenFrom takes the agent token from "Authorization: Bearer <token>"
// or from Gitlab-Agentk-Api-Request. It returns a description of what is
// wrong with the headers, if anything.
func agentTokenFrom(h http.Header) (token, problem string) {
	var bearer, direct string
	switch auth := h.Values("Authorization"); len(auth) {
	case 0:
	case 1:
		scheme, value, ok := strings.Cut(auth[0], " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") || value == "" {
			return "", `the Authorization header is not "Bearer <agent token>"`
		}
		bearer = value
	default:
		return "", fmt.Sprintf("%d Authorization headers, want at most one", len(auth))
	}
	switch vals := h.Values(agentTokenHeader); len(vals) {
	case 0:
	case 1:
		if vals[0] == "" {
			return "", fmt.Sprintf("empty %s header", agentTokenHeader)
		}
		direct = vals[0]
	default:
		return "", fmt.Sprintf("%d %s headers, want at most one", len(vals), agentTokenHeader)
	}
	switch {
	case bearer == "" && direct == "":
		return "", fmt.Sprintf(`no agent token: neither "Authorization: Bearer <token>" nor %s`, agentTokenHeader)
	case bearer != "" && direct != "" && subtle.ConstantTimeCompare([]byte(bearer), []byte(direct)) != 1:
		return "", fmt.Sprintf("the Authorization and %s headers carry different agent tokens", agentTokenHeader)
	case bearer != "":
		return bearer, ""
	}
	return direct, ""
}

// The agent_info answer (kas-spec §2.1).
type (
	agentInfoJSON struct {
		ProjectID        int64                `json:"project_id"`
		AgentID          int64                `json:"agent_id"`
		AgentName        string               `json:"agent_name"`
		GitalyInfo       gitalyInfoJSON       `json:"gitaly_info"`
		GitalyRepository gitalyRepositoryJSON `json:"gitaly_repository"`
		DefaultBranch    string               `json:"default_branch"`
	}
	gitalyInfoJSON struct {
		Address  string            `json:"address"`
		Token    string            `json:"token"`
		Features map[string]string `json:"features"`
	}
	gitalyRepositoryJSON struct {
		StorageName                   string   `json:"storage_name"`
		RelativePath                  string   `json:"relative_path"`
		GitObjectDirectory            string   `json:"git_object_directory"`
		GitAlternateObjectDirectories []string `json:"git_alternate_object_directories"`
		GLRepository                  string   `json:"gl_repository"`
		GLProjectPath                 string   `json:"gl_project_path"`
	}
)

// agentInfoResponse is what Rails answers for an agent on an Omnibus
// install: Gitaly on its default socket, the project in hashed storage.
// For a project with a repository, agentInfo puts in that of the Gitaly
// double.
func agentInfoResponse(a Agent) agentInfoJSON {
	sum := sha256.Sum256(fmt.Appendf(nil, "%d", a.ProjectID))
	hash := hex.EncodeToString(sum[:])
	return agentInfoJSON{
		ProjectID: a.ProjectID,
		AgentID:   a.ID,
		AgentName: a.Name,
		GitalyInfo: gitalyInfoJSON{
			Address:  "unix:/var/opt/gitlab/gitaly/gitaly.socket",
			Token:    "",
			Features: map[string]string{},
		},
		GitalyRepository: gitalyRepositoryJSON{
			StorageName:                   "default",
			RelativePath:                  fmt.Sprintf("@hashed/%s/%s/%s.git", hash[:2], hash[2:4], hash),
			GitObjectDirectory:            "",
			GitAlternateObjectDirectories: []string{},
			GLRepository:                  fmt.Sprintf("project-%d", a.ProjectID),
			GLProjectPath:                 a.ProjectPath,
		},
		DefaultBranch: "main",
	}
}
