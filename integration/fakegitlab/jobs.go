package fakegitlab

import (
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net/http"
)

// Job is a running CI job. allowed_agents answers for its token from
// the job's project and user and the configurations KAS posted.
type Job struct {
	// Token is the job token (CI_JOB_TOKEN).
	Token string
	// JobID and PipelineID identify the job and its pipeline.
	JobID, PipelineID int64
	// ProjectID is the job's project, which must have been added.
	ProjectID int64
	// Username is the user the job runs for, who must have been added;
	// the user's roles in the project come from memberships.
	Username string
	// Environment is the job's deployment environment, if it has one.
	Environment *Environment
}

// User is a GitLab user.
type User struct {
	ID       int64
	Username string
}

// Environment is a CI job's deployment environment.
type Environment struct {
	// Name is the environment's name, such as "review/app"; ci_access
	// environments match it. Tier is such as "production"; Slug is the
	// environment's slug.
	Name, Tier, Slug string
}

// AddJob registers a running CI job; allowed_agents then answers for its
// token.
func (s *Server) AddJob(j Job) {
	s.t.Helper()
	if j.Token == "" || j.JobID <= 0 || j.PipelineID <= 0 || j.ProjectID <= 0 {
		s.t.Fatalf("fakegitlab: AddJob needs a Token and positive JobID, PipelineID and ProjectID")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.projectByIDLocked(j.ProjectID) == nil || s.userByNameLocked(j.Username) == nil {
		s.t.Fatalf("fakegitlab: AddJob in project %d for user %q: add both first", j.ProjectID, j.Username)
	}
	if _, dup := s.jobs[j.Token]; dup {
		s.t.Fatalf("fakegitlab: AddJob with a job token that is already registered")
	}
	s.jobs[j.Token] = j
}

// EndJob ends a job: its token is refused from then on.
func (s *Server) EndJob(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.jobs, token)
}

// jobTokenHeader carries the CI job token to allowed_agents.
const jobTokenHeader = "Job-Token"

// allowedAgents serves GET allowed_agents (kas-spec §2.5).
func (s *Server) allowedAgents(w http.ResponseWriter, r *http.Request) {
	vals := r.Header.Values(jobTokenHeader)
	switch {
	case len(vals) == 0:
		s.violation(r, "no %s header", jobTokenHeader)
		writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
		return
	case len(vals) > 1:
		s.violation(r, "%d %s headers, want exactly one", len(vals), jobTokenHeader)
		writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
		return
	case vals[0] == "":
		s.violation(r, "empty %s header", jobTokenHeader)
		writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
		return
	}
	if _, present := r.Header["Authorization"]; present {
		s.violation(r, "an Authorization header was sent with the job token")
	}
	if !s.accept(w, PathAllowedAgents) {
		return
	}
	s.mu.Lock()
	var job Job
	found := false
	for token, j := range s.jobs {
		if subtle.ConstantTimeCompare([]byte(token), []byte(vals[0])) == 1 {
			job, found = j, true
		}
	}
	s.mu.Unlock()
	if !found {
		// A legitimate answer: the job token is unknown or the job is over.
		writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
		return
	}
	s.mu.Lock()
	resp := s.allowedAgentsLocked(job)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, resp)
}

// The allowed_agents answer (kas-spec §2.5).
type (
	allowedAgentsJSON struct {
		AllowedAgents []allowedAgentJSON `json:"allowed_agents"`
		Job           idJSON             `json:"job"`
		Pipeline      idJSON             `json:"pipeline"`
		Project       jobProjectJSON     `json:"project"`
		User          jobUserJSON        `json:"user"`
		Environment   *environmentJSON   `json:"environment,omitempty"`
	}
	allowedAgentJSON struct {
		ID            int64           `json:"id"`
		ConfigProject idJSON          `json:"config_project"`
		Configuration json.RawMessage `json:"configuration"`
	}
	idJSON struct {
		ID int64 `json:"id"`
	}
	jobProjectJSON struct {
		ID     int64    `json:"id"`
		Groups []idJSON `json:"groups"`
	}
	jobUserJSON struct {
		ID             int64    `json:"id"`
		Username       string   `json:"username"`
		RolesInProject []string `json:"roles_in_project"`
	}
	environmentJSON struct {
		Tier string `json:"tier"`
		Slug string `json:"slug"`
	}
)

// allowedAgentsLocked decides which agents the job may use, as Rails does
// (Clusters::Agents::Authorizations::CiAccess::Finder and FilterService,
// kas-spec §2.5): agents whose posted ci_access names the job's project,
// then those whose ci_access names one of the groups the project is in
// (the innermost first), then agents whose configuration project is the
// job's own project, which are authorized implicitly with an empty
// configuration. An agent appears once, with the first authorization
// found; an entry with environments only counts for a job whose
// environment matches one of them.
func (s *Server) allowedAgentsLocked(j Job) allowedAgentsJSON {
	project := s.projectByIDLocked(j.ProjectID)
	user := s.userByNameLocked(j.Username)
	groups := s.ancestorsLocked(project.Path)
	out := allowedAgentsJSON{
		AllowedAgents: []allowedAgentJSON{},
		Job:           idJSON{j.JobID},
		Pipeline:      idJSON{j.PipelineID},
		Project:       jobProjectJSON{ID: j.ProjectID, Groups: []idJSON{}},
		User: jobUserJSON{
			ID:             user.ID,
			Username:       user.Username,
			RolesInProject: rolesUpTo(s.accessLevelLocked(user.ID, project.Path)),
		},
	}
	for _, g := range groups {
		out.Project.Groups = append(out.Project.Groups, idJSON{g.ID})
	}
	if j.Environment != nil {
		out.Environment = &environmentJSON{Tier: j.Environment.Tier, Slug: j.Environment.Slug}
	}

	seen := map[int64]bool{}
	add := func(a Agent, config json.RawMessage) {
		if seen[a.ID] {
			return
		}
		seen[a.ID] = true
		out.AllowedAgents = append(out.AllowedAgents, allowedAgentJSON{ID: a.ID, ConfigProject: idJSON{a.ProjectID}, Configuration: config})
	}
	applies := func(auth ciAuthorization) bool {
		if len(auth.environments) == 0 {
			return true
		}
		if j.Environment == nil {
			return false
		}
		name := j.Environment.Name
		if name == "" {
			name = j.Environment.Slug
		}
		return environmentMatches(auth.environments, name)
	}
	agents := s.agentsLocked()
	for _, a := range agents {
		if cfg := s.configs[a.ID]; cfg != nil {
			for _, auth := range cfg.ciProjects {
				if auth.id == project.ID && applies(auth) {
					add(a, auth.config)
				}
			}
		}
	}
	for i := len(groups) - 1; i >= 0; i-- {
		for _, a := range agents {
			if cfg := s.configs[a.ID]; cfg != nil {
				for _, auth := range cfg.ciGroups {
					if auth.id == groups[i].ID && applies(auth) {
						add(a, auth.config)
					}
				}
			}
		}
	}
	for _, a := range agents {
		if a.ProjectID == project.ID {
			add(a, json.RawMessage(`{}`))
		}
	}
	return out
}

// agentsLocked lists the agents, each once, in the order they were added.
func (s *Server) agentsLocked() []Agent {
	var out []Agent
	seen := map[int64]bool{}
	for _, at := range s.agents {
		if !seen[at.agent.ID] {
			seen[at.agent.ID] = true
			out = append(out, at.agent)
		}
	}
	return out
}

// String describes a job without its token, for messages.
func (j Job) String() string {
	return fmt.Sprintf("job %d of pipeline %d in project %d", j.JobID, j.PipelineID, j.ProjectID)
}
