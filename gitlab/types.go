package gitlab

import (
	"encoding/json"
	"fmt"
	"sort"
)

// AgentInfo is GitLab's answer to agent_info: the agent an agent token
// belongs to and where its configuration project lives (kas-spec §2.1).
// It holds the Gitaly token: never log it.
type AgentInfo struct {
	ProjectID        int64            `json:"project_id"`
	AgentID          int64            `json:"agent_id"`
	AgentName        string           `json:"agent_name"`
	GitalyInfo       GitalyInfo       `json:"gitaly_info"`
	GitalyRepository GitalyRepository `json:"gitaly_repository"`
	DefaultBranch    string           `json:"default_branch"`
}

// GitalyInfo says how to reach the Gitaly server of a repository.
type GitalyInfo struct {
	Address string `json:"address"`
	// Token authenticates to Gitaly. It is a secret.
	Token    string            `json:"token"`
	Features map[string]string `json:"features"`
}

// String describes g without its token, so that printing an [AgentInfo]
// does not leak it.
func (g GitalyInfo) String() string {
	return fmt.Sprintf("{Address:%s Token:[redacted] Features:%v}", g.Address, g.Features)
}

// GitalyRepository locates a repository on its Gitaly server.
type GitalyRepository struct {
	StorageName                   string   `json:"storage_name"`
	RelativePath                  string   `json:"relative_path"`
	GitObjectDirectory            string   `json:"git_object_directory"`
	GitAlternateObjectDirectories []string `json:"git_alternate_object_directories"`
	GlRepository                  string   `json:"gl_repository"`
	GlProjectPath                 string   `json:"gl_project_path"`
}

// AllowedAgents is GitLab's answer to allowed_agents: the agents a CI job
// may use and the facts about the job that its identity is made of
// (kas-spec §2.5).
type AllowedAgents struct {
	AllowedAgents []AllowedAgent `json:"allowed_agents"`
	Job           Job            `json:"job"`
	Pipeline      Pipeline       `json:"pipeline"`
	Project       Project        `json:"project"`
	User          CIUser         `json:"user"`
	// Environment is nil when the job has no environment.
	Environment *Environment `json:"environment,omitempty"`
}

// Job is a CI job.
type Job struct {
	ID int64 `json:"id"`
}

// Pipeline is a CI pipeline.
type Pipeline struct {
	ID int64 `json:"id"`
}

// Project is the project of a CI job, with the groups it is in, innermost
// last as Rails lists them.
type Project struct {
	ID     int64   `json:"id"`
	Groups []Group `json:"groups"`
}

// Group is a GitLab group.
type Group struct {
	ID int64 `json:"id"`
}

// CIUser is the user a CI job runs for.
type CIUser struct {
	ID             int64    `json:"id"`
	Username       string   `json:"username"`
	RolesInProject []string `json:"roles_in_project"`
}

// Environment is the deployment environment of a CI job.
type Environment struct {
	Tier string `json:"tier"`
	Slug string `json:"slug"`
}

// AllowedAgent is an agent a CI job may use, with the ci_access entry of
// the agent's configuration that authorizes it.
type AllowedAgent struct {
	ID            int64              `json:"id"`
	ConfigProject ConfigProject      `json:"config_project"`
	Configuration AgentConfiguration `json:"configuration"`
}

// ConfigProject is an agent's configuration project. Rails sends more
// fields; only the id is used.
type ConfigProject struct {
	ID int64 `json:"id"`
}

// AgentConfiguration is the ci_access entry (a project or a group) of an
// agent's configuration file that authorizes a CI job.
type AgentConfiguration struct {
	DefaultNamespace string `json:"default_namespace"`
	// AccessAs is nil when the entry does not say; that means the agent's
	// own identity.
	AccessAs *AccessAsCI `json:"access_as,omitempty"`
}

// AccessAsCI is the access_as of a ci_access entry: at most one of its
// fields is set (kas-spec §2.5).
type AccessAsCI struct {
	Agent       *struct{}          `json:"agent,omitempty"`
	Impersonate *ImpersonateConfig `json:"impersonate,omitempty"`
	CIJob       *struct{}          `json:"ci_job,omitempty"`

	// unknown lists keys this version does not understand, such as a mode
	// added by a newer GitLab. Such an entry is refused rather than
	// mistaken for "agent", which may give more access than meant.
	unknown []string
}

// UnmarshalJSON decodes an access_as object and remembers keys it does
// not know.
func (a *AccessAsCI) UnmarshalJSON(b []byte) error {
	*a = AccessAsCI{}
	var err error
	a.unknown, err = decodeAccessAs(b, map[string]any{"agent": &a.Agent, "impersonate": &a.Impersonate, "ci_job": &a.CIJob})
	return err
}

// decodeAccessAs decodes an access_as object: the value of each key in
// known into its target, and returns the other keys, sorted.
func decodeAccessAs(b []byte, known map[string]any) (unknown []string, err error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return nil, err
	}
	for k, v := range fields {
		target, ok := known[k]
		if !ok {
			unknown = append(unknown, k)
			continue
		}
		if err := json.Unmarshal(v, target); err != nil {
			return nil, fmt.Errorf("access_as.%s: %w", k, err)
		}
	}
	sort.Strings(unknown)
	return unknown, nil
}

// ImpersonateConfig is an identity set explicitly in an agent's
// configuration.
type ImpersonateConfig struct {
	Username string        `json:"username"`
	UID      string        `json:"uid,omitempty"`
	Groups   []string      `json:"groups,omitempty"`
	Extra    []ExtraKeyVal `json:"extra,omitempty"`
}

// ExtraKeyVal is one extra field of an impersonated identity.
type ExtraKeyVal struct {
	Key string   `json:"key"`
	Val []string `json:"val"`
}

// Access types of authorize_proxy_user: the only two Rails accepts
// (kas-spec §2.6).
const (
	AccessTypeSessionCookie       = "session_cookie"
	AccessTypePersonalAccessToken = "personal_access_token"
)

// AuthorizeProxyUserRequest asks GitLab whether a user may use an agent
// (kas-spec §2.6). AccessKey is a secret: never log the request.
type AuthorizeProxyUserRequest struct {
	AgentID int64 `json:"agent_id"`
	// AccessType is AccessTypeSessionCookie or AccessTypePersonalAccessToken.
	AccessType string `json:"access_type"`
	// AccessKey is the session cookie's value or the personal access token.
	AccessKey string `json:"access_key"`
	// CSRFToken goes with a session cookie only.
	CSRFToken string `json:"csrf_token,omitempty"`
}

// AuthorizeProxyUserResponse is GitLab's yes to an
// [AuthorizeProxyUserRequest].
type AuthorizeProxyUserResponse struct {
	Agent    ProxyAgent         `json:"agent"`
	User     User               `json:"user"`
	AccessAs *AccessAsProxyUser `json:"access_as,omitempty"`
}

// ProxyAgent is the agent a user was authorized for.
type ProxyAgent struct {
	ID            int64         `json:"id"`
	ConfigProject ConfigProject `json:"config_project"`
}

// User is a GitLab user.
type User struct {
	ID       int64  `json:"id"`
	Username string `json:"username"`
}

// AccessAsProxyUser is the access_as of a user_access authorization: at
// most one of its fields is set; when it is absent or empty the agent's
// own identity is used (GitLab 18.3 made it optional, kas-spec §2.6).
type AccessAsProxyUser struct {
	Agent *struct{}     `json:"agent,omitempty"`
	User  *AccessAsUser `json:"user,omitempty"`

	// unknown lists keys this version does not understand; see
	// AccessAsCI.unknown.
	unknown []string
}

// UnmarshalJSON decodes an access_as object and remembers keys it does
// not know.
func (a *AccessAsProxyUser) UnmarshalJSON(b []byte) error {
	*a = AccessAsProxyUser{}
	var err error
	a.unknown, err = decodeAccessAs(b, map[string]any{"agent": &a.Agent, "user": &a.User})
	return err
}

// AccessAsUser lists the user's roles in the projects and groups that the
// agent's user_access shares, in the order Rails sends them.
type AccessAsUser struct {
	Projects []ProjectRoles `json:"projects"`
	Groups   []GroupRoles   `json:"groups"`
}

// ProjectRoles are a user's roles in a project.
type ProjectRoles struct {
	ID    int64    `json:"id"`
	Roles []string `json:"roles"`
}

// GroupRoles are a user's roles in a group.
type GroupRoles struct {
	ID    int64    `json:"id"`
	Roles []string `json:"roles"`
}

// UsageMetrics is the body of usage_metrics (kas-spec §7).
type UsageMetrics struct {
	Counters       map[string]int64   `json:"counters"`
	UniqueCounters map[string][]int64 `json:"unique_counters"`
}
