package gitlab

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/caddy-kas/caddy-kas/identity"
)

// Extra keys of the identities GitLab's agent server gives CI jobs and
// users (kas-spec §2.5, §2.6). Customers' RBAC and admission rules match
// these strings.
const (
	ExtraAgentID         = "agent.gitlab.com/id"
	ExtraConfigProjectID = "agent.gitlab.com/config_project_id"
	ExtraProjectID       = "agent.gitlab.com/project_id"
	ExtraCIPipelineID    = "agent.gitlab.com/ci_pipeline_id"
	ExtraCIJobID         = "agent.gitlab.com/ci_job_id"
	ExtraUsername        = "agent.gitlab.com/username"
	ExtraEnvironmentSlug = "agent.gitlab.com/environment_slug"
	ExtraEnvironmentTier = "agent.gitlab.com/environment_tier"
	ExtraAccessType      = "agent.gitlab.com/access_type"
)

// ErrUnsupportedAccessAs is wrapped by the errors of [CIAccessIdentity] and
// [UserAccessIdentity] for an access_as they cannot honour. Such a request
// is refused: guessing could give more access than the configuration
// means.
var ErrUnsupportedAccessAs = errors.New("unsupported access_as")

// CIAccessIdentity returns the identity a CI job's request has on the
// cluster of agent, one of aa.AllowedAgents, following its ci_access
// entry's access_as (kas-spec §2.5):
//
//   - absent or "agent": no identity (the agent's own), and the client's
//     own Impersonate-* headers may pass;
//   - "impersonate": the configured username, uid, groups and extra;
//   - "ci_job": username gitlab:ci_job:<job id>, groups gitlab:ci_job,
//     then per group of the job's project gitlab:group:<id> (and, with an
//     environment, gitlab:group_env_tier:<id>:<tier>), then
//     gitlab:project:<id>, then with an environment
//     gitlab:project_env:<id>:<slug> and gitlab:project_env_tier:<id>:<tier>,
//     and the agent.gitlab.com/ extra fields.
//
// The client's own impersonation is allowed only in the first case.
func CIAccessIdentity(aa *AllowedAgents, agent *AllowedAgent) (id *identity.Identity, allowClientImpersonation bool, err error) {
	as := agent.Configuration.AccessAs
	if as == nil {
		return nil, true, nil
	}
	if len(as.unknown) > 0 {
		return nil, false, fmt.Errorf("%w: %s", ErrUnsupportedAccessAs, strings.Join(as.unknown, ", "))
	}
	set := 0
	for _, isSet := range []bool{as.Agent != nil, as.Impersonate != nil, as.CIJob != nil} {
		if isSet {
			set++
		}
	}
	if set > 1 {
		return nil, false, fmt.Errorf("%w: more than one of agent, impersonate and ci_job", ErrUnsupportedAccessAs)
	}
	switch {
	case as.Impersonate != nil:
		id, err := impersonateIdentity(as.Impersonate)
		return id, false, err
	case as.CIJob != nil:
		return ciJobIdentity(aa, agent), false, nil
	default: // agent, or an empty access_as
		return nil, true, nil
	}
}

// impersonateIdentity is the identity an "impersonate" access_as
// configures.
func impersonateIdentity(c *ImpersonateConfig) (*identity.Identity, error) {
	if c.Username == "" {
		// Kubernetes cannot impersonate without a username, and GitLab's
		// configuration schema requires one.
		return nil, fmt.Errorf("%w: impersonate without a username", ErrUnsupportedAccessAs)
	}
	id := &identity.Identity{Username: c.Username, UID: c.UID}
	if len(c.Groups) > 0 {
		id.Groups = append([]string(nil), c.Groups...)
	}
	for _, kv := range c.Extra {
		if id.Extra == nil {
			id.Extra = map[string][]string{}
		}
		// A key listed twice keeps the values of both entries.
		id.Extra[kv.Key] = append(id.Extra[kv.Key], kv.Val...)
	}
	return id, nil
}

// ciJobIdentity is the identity of a "ci_job" access_as (kas-spec §2.5).
func ciJobIdentity(aa *AllowedAgents, agent *AllowedAgent) *identity.Identity {
	env := aa.Environment
	pid := itoa(aa.Project.ID)
	groups := []string{"gitlab:ci_job"}
	for _, g := range aa.Project.Groups {
		gid := itoa(g.ID)
		groups = append(groups, "gitlab:group:"+gid)
		if env != nil {
			groups = append(groups, "gitlab:group_env_tier:"+gid+":"+env.Tier)
		}
	}
	groups = append(groups, "gitlab:project:"+pid)
	if env != nil {
		groups = append(groups,
			"gitlab:project_env:"+pid+":"+env.Slug,
			"gitlab:project_env_tier:"+pid+":"+env.Tier)
	}
	extra := map[string][]string{
		ExtraAgentID:         {itoa(agent.ID)},
		ExtraConfigProjectID: {itoa(agent.ConfigProject.ID)},
		ExtraProjectID:       {pid},
		ExtraCIPipelineID:    {itoa(aa.Pipeline.ID)},
		ExtraCIJobID:         {itoa(aa.Job.ID)},
		ExtraUsername:        {aa.User.Username},
	}
	if env != nil {
		extra[ExtraEnvironmentSlug] = []string{env.Slug}
		extra[ExtraEnvironmentTier] = []string{env.Tier}
	}
	return &identity.Identity{
		Username: "gitlab:ci_job:" + itoa(aa.Job.ID),
		Groups:   groups,
		Extra:    extra,
	}
}

// UserAccessIdentity returns the identity a user's request has on the
// agent's cluster, following authorize_proxy_user's access_as
// (kas-spec §2.6); accessType is the request's, [AccessTypeSessionCookie]
// or [AccessTypePersonalAccessToken].
//
//   - absent (GitLab 18.3 made it optional) or "agent": no identity (the
//     agent's own), and the client's own Impersonate-* headers may pass;
//   - "user": username gitlab:user:<username>, groups gitlab:user, then
//     gitlab:project_role:<id>:<role> for each role in each project, then
//     gitlab:group_role:<id>:<role> for each role in each group, in
//     GitLab's order, and the agent.gitlab.com/ extra fields.
func UserAccessIdentity(resp *AuthorizeProxyUserResponse, accessType string) (id *identity.Identity, allowClientImpersonation bool, err error) {
	as := resp.AccessAs
	if as == nil {
		return nil, true, nil
	}
	if len(as.unknown) > 0 {
		return nil, false, fmt.Errorf("%w: %s", ErrUnsupportedAccessAs, strings.Join(as.unknown, ", "))
	}
	if as.Agent != nil && as.User != nil {
		return nil, false, fmt.Errorf("%w: both agent and user", ErrUnsupportedAccessAs)
	}
	if as.User == nil {
		return nil, true, nil
	}
	if resp.User.Username == "" {
		return nil, false, fmt.Errorf("%w: user access without a username", ErrUnsupportedAccessAs)
	}
	groups := []string{"gitlab:user"}
	for _, p := range as.User.Projects {
		for _, role := range p.Roles {
			groups = append(groups, "gitlab:project_role:"+itoa(p.ID)+":"+role)
		}
	}
	for _, g := range as.User.Groups {
		for _, role := range g.Roles {
			groups = append(groups, "gitlab:group_role:"+itoa(g.ID)+":"+role)
		}
	}
	return &identity.Identity{
		Username: "gitlab:user:" + resp.User.Username,
		Groups:   groups,
		Extra: map[string][]string{
			ExtraAgentID:         {itoa(resp.Agent.ID)},
			ExtraUsername:        {resp.User.Username},
			ExtraAccessType:      {accessType},
			ExtraConfigProjectID: {itoa(resp.Agent.ConfigProject.ID)},
		},
	}, false, nil
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
