package fakegitlab

import (
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net/http"
)

// Job is a running CI job and what allowed_agents answers for its token.
type Job struct {
	// Token is the job token (CI_JOB_TOKEN).
	Token string
	// JobID, PipelineID and ProjectID identify the job, its pipeline and
	// its project.
	JobID, PipelineID, ProjectID int64
	// ProjectGroups are the ids of the project's groups, innermost last
	// as Rails lists them (its ancestors).
	ProjectGroups []int64
	// User is the user the job runs as.
	User User
	// Environment is the job's deployment environment, if it has one.
	Environment *Environment
	// AllowedAgents are the agents whose ci_access authorizes the job's
	// project.
	AllowedAgents []AllowedAgent
}

// User is a GitLab user. RolesInProject only matters for a Job.
type User struct {
	ID       int64
	Username string
	// RolesInProject are the user's roles in the job's project, such as
	// "guest", "reporter", "developer", "maintainer".
	RolesInProject []string
}

// Environment is a CI job's deployment environment.
type Environment struct {
	// Tier is such as "production"; Slug is the environment's slug.
	Tier, Slug string
}

// AllowedAgent is one ci_access authorization of a job's project.
type AllowedAgent struct {
	// ID is the agent's id, ConfigProjectID its configuration project's.
	ID, ConfigProjectID int64
	// DefaultNamespace is the ci_access entry's default_namespace.
	DefaultNamespace string
	// AccessAs is the ci_access entry's access_as as JSON, such as
	// {"ci_job":{}} or {"impersonate":{"username":"u"}}; nil leaves the key
	// out, which means the agent's own identity.
	AccessAs json.RawMessage
}

// AddJob registers a running CI job; allowed_agents then answers for its
// token.
func (s *Server) AddJob(j Job) {
	s.t.Helper()
	if j.Token == "" || j.JobID <= 0 || j.PipelineID <= 0 || j.ProjectID <= 0 {
		s.t.Fatalf("fakegitlab: AddJob needs a Token and positive JobID, PipelineID and ProjectID")
	}
	for _, a := range j.AllowedAgents {
		if a.AccessAs != nil && !json.Valid(a.AccessAs) {
			s.t.Fatalf("fakegitlab: AddJob: the AccessAs of agent %d is not JSON", a.ID)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.jobs[j.Token]; dup {
		s.t.Fatalf("fakegitlab: AddJob with a job token that is already registered")
	}
	s.jobs[j.Token] = j
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
	writeJSON(w, http.StatusOK, allowedAgentsResponse(job))
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
		ID            int64                 `json:"id"`
		ConfigProject idJSON                `json:"config_project"`
		Configuration ciAccessConfiguration `json:"configuration"`
	}
	ciAccessConfiguration struct {
		DefaultNamespace string          `json:"default_namespace"`
		AccessAs         json.RawMessage `json:"access_as,omitempty"`
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

func allowedAgentsResponse(j Job) allowedAgentsJSON {
	out := allowedAgentsJSON{
		AllowedAgents: []allowedAgentJSON{},
		Job:           idJSON{j.JobID},
		Pipeline:      idJSON{j.PipelineID},
		Project:       jobProjectJSON{ID: j.ProjectID, Groups: []idJSON{}},
		User: jobUserJSON{
			ID:             j.User.ID,
			Username:       j.User.Username,
			RolesInProject: append([]string{}, j.User.RolesInProject...),
		},
	}
	for _, a := range j.AllowedAgents {
		out.AllowedAgents = append(out.AllowedAgents, allowedAgentJSON{
			ID:            a.ID,
			ConfigProject: idJSON{a.ConfigProjectID},
			Configuration: ciAccessConfiguration{DefaultNamespace: a.DefaultNamespace, AccessAs: a.AccessAs},
		})
	}
	for _, g := range j.ProjectGroups {
		out.Project.Groups = append(out.Project.Groups, idJSON{g})
	}
	if j.Environment != nil {
		out.Environment = &environmentJSON{Tier: j.Environment.Tier, Slug: j.Environment.Slug}
	}
	return out
}

// String describes a job without its token, for messages.
func (j Job) String() string {
	return fmt.Sprintf("job %d of pipeline %d in project %d", j.JobID, j.PipelineID, j.ProjectID)
}
