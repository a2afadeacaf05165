package fakegitlab

import (
	"encoding/json"
	"fmt"
	"path"
	"slices"
	"strings"

	"github.com/caddy-kas/caddy-kas/integration/fakegitaly"
)

// This file is the part of GitLab the authorizations are decided from:
// groups and projects, users and their memberships, personal access
// tokens and sessions, and the agent configurations KAS posts. Nothing in
// it grants access by itself; authorize_proxy_user and allowed_agents
// derive every answer from these facts the way Rails does.

// Roles, lowest first, with GitLab's access levels (Gitlab::Access).
var roles = []struct {
	name  string
	level int
}{{"guest", 10}, {"reporter", 20}, {"developer", 30}, {"maintainer", 40}, {"owner", 50}}

// developerLevel is the least access level user_access grants to
// (kas-spec §2.6: "Developer role or higher is needed").
const developerLevel = 30

func roleLevel(name string) int {
	for _, r := range roles {
		if r.name == name {
			return r.level
		}
	}
	return 0
}

// rolesUpTo lists the roles at or below level, lowest first, as Rails
// lists a member's roles (roles_in_project of allowed_agents, kas-spec
// §2.5; the roles of access_as user, §2.6).
func rolesUpTo(level int) []string {
	out := []string{}
	for _, r := range roles {
		if r.level <= level {
			out = append(out, r.name)
		}
	}
	return out
}

// maxEntries is how many projects and how many groups of one ci_access or
// user_access section Rails takes (kas-spec §2.5).
const maxEntries = 500

// Group is a GitLab group. Its parent is the group whose full path is its
// own without the last segment, which must have been added before.
type Group struct {
	ID int64
	// Path is the full path, such as "platform" or "platform/apps".
	Path string
}

// Project is a GitLab project. Its namespace is the group whose full path
// is its own without the last segment (added before), or a user's personal
// namespace when that path is not a group.
type Project struct {
	ID int64
	// Path is the full path, such as "platform/deployments".
	Path string
	// Repo is the project's repository in the Gitaly of Options.Gitaly,
	// which agent_info names for the project's agents; nil for a project
	// without one (KAS cannot read the configuration of its agents).
	Repo *fakegitaly.Repo
}

// AddGroup adds a group.
func (s *Server) AddGroup(g Group) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if g.ID <= 0 || g.Path == "" || strings.HasPrefix(g.Path, "/") || strings.HasSuffix(g.Path, "/") {
		s.t.Fatalf("fakegitlab: AddGroup needs a positive ID and a full path, got %d %q", g.ID, g.Path)
	}
	if parent := path.Dir(g.Path); parent != "." && s.groupByPathLocked(parent) == nil {
		s.t.Fatalf("fakegitlab: AddGroup %q before its parent group %q", g.Path, parent)
	}
	if s.groupByPathLocked(g.Path) != nil || s.groupByIDLocked(g.ID) != nil || s.projectByPathLocked(g.Path) != nil {
		s.t.Fatalf("fakegitlab: AddGroup %d %q: the id or path is taken", g.ID, g.Path)
	}
	s.groups = append(s.groups, g)
}

// AddProject adds a project.
func (s *Server) AddProject(p Project) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.ID <= 0 || !strings.Contains(p.Path, "/") || strings.HasPrefix(p.Path, "/") || strings.HasSuffix(p.Path, "/") {
		s.t.Fatalf("fakegitlab: AddProject needs a positive ID and a full path with a namespace, got %d %q", p.ID, p.Path)
	}
	if s.projectByIDLocked(p.ID) != nil || s.projectByPathLocked(p.Path) != nil || s.groupByPathLocked(p.Path) != nil {
		s.t.Fatalf("fakegitlab: AddProject %d %q: the id or path is taken", p.ID, p.Path)
	}
	if p.Repo != nil && s.gitaly == nil {
		s.t.Fatalf("fakegitlab: AddProject with a repository, but the Server has no Options.Gitaly")
	}
	if p.Repo != nil && !strings.EqualFold(p.Repo.GlProjectPath, p.Path) {
		s.t.Fatalf("fakegitlab: AddProject %q with the repository of %q", p.Path, p.Repo.GlProjectPath)
	}
	s.projects = append(s.projects, p)
}

// AddUser adds a user. User.ID and User.Username must be unique.
func (s *Server) AddUser(u User) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if u.ID <= 0 || u.Username == "" {
		s.t.Fatalf("fakegitlab: AddUser needs a positive ID and a Username")
	}
	if s.userByNameLocked(u.Username) != nil || s.userByIDLocked(u.ID) != nil {
		s.t.Fatalf("fakegitlab: AddUser %d %q: taken", u.ID, u.Username)
	}
	s.users = append(s.users, u)
}

// member is a membership of a user in a project or a group.
type member struct {
	userID int64
	path   string // of the project or group
	level  int
}

// AddMember makes the user a member of the project or group at path with
// role (guest, reporter, developer, maintainer or owner), replacing a
// membership there it had. A group membership extends to the group's
// subgroups and projects, as in GitLab; where a user is a member at
// several levels, the highest role counts.
func (s *Server) AddMember(username, path, role string) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.userByNameLocked(username)
	level := roleLevel(role)
	switch {
	case u == nil:
		s.t.Fatalf("fakegitlab: AddMember of unknown user %q", username)
	case level == 0:
		s.t.Fatalf("fakegitlab: AddMember with role %q", role)
	case s.projectByPathLocked(path) == nil && s.groupByPathLocked(path) == nil:
		s.t.Fatalf("fakegitlab: AddMember to %q, which is neither a project nor a group", path)
	}
	s.members = slices.DeleteFunc(s.members, func(m member) bool { return m.userID == u.ID && strings.EqualFold(m.path, path) })
	s.members = append(s.members, member{userID: u.ID, path: path, level: level})
}

// RemoveMember ends the user's membership of the project or group at path.
func (s *Server) RemoveMember(username, path string) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.userByNameLocked(username)
	if u == nil {
		s.t.Fatalf("fakegitlab: RemoveMember of unknown user %q", username)
	}
	s.members = slices.DeleteFunc(s.members, func(m member) bool { return m.userID == u.ID && strings.EqualFold(m.path, path) })
}

// personalAccessToken is a user's personal access token.
type personalAccessToken struct {
	token  string
	userID int64
	scopes []string
}

// AddPersonalAccessToken gives the user a personal access token with
// scopes. The Kubernetes API proxy takes tokens with the k8s_proxy scope
// only (kas-spec §2.6); a token without it is refused with 403.
func (s *Server) AddPersonalAccessToken(username, token string, scopes ...string) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.userByNameLocked(username)
	if u == nil || token == "" {
		s.t.Fatalf("fakegitlab: AddPersonalAccessToken needs a known user and a token")
	}
	s.pats = append(s.pats, personalAccessToken{token: token, userID: u.ID, scopes: scopes})
}

// session is a user's GitLab session, as the _gitlab_kas cookie names it.
type session struct {
	cookie  string
	csrf    string
	userID  int64
	expired bool
}

// AddSession starts a GitLab session of the user: cookie is the
// (unescaped) value of the _gitlab_kas cookie Rails sets on GitLab's
// pages, csrf the CSRF token of those pages.
func (s *Server) AddSession(username, cookie, csrf string) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.userByNameLocked(username)
	if u == nil || cookie == "" || csrf == "" {
		s.t.Fatalf("fakegitlab: AddSession needs a known user, a cookie and a CSRF token")
	}
	s.sessions = append(s.sessions, &session{cookie: cookie, csrf: csrf, userID: u.ID})
}

// ExpireSession ends the session of cookie: Rails then answers 401 for it.
func (s *Server) ExpireSession(cookie string) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ss := range s.sessions {
		if ss.cookie == cookie {
			ss.expired = true
			return
		}
	}
	s.t.Fatalf("fakegitlab: ExpireSession of an unknown session")
}

// agentConfig is what Rails keeps of the configuration KAS last posted for
// an agent: the ci_access and user_access authorizations (kas-spec §2.5,
// §2.6), resolved to the projects and groups they name.
type agentConfig struct {
	ciProjects []ciAuthorization
	ciGroups   []ciAuthorization
	user       *userAuthorization // nil: no user_access
}

// ciAuthorization is one ci_access entry that names an existing project or
// group: its id, and the entry without "id", which allowed_agents answers
// as the agent's configuration for the job.
type ciAuthorization struct {
	id     int64
	path   string
	config json.RawMessage
	// environments are the entry's environments, if any: then only jobs
	// with a matching environment are authorized.
	environments []string
}

// userAuthorization is the user_access section.
type userAuthorization struct {
	accessAs json.RawMessage // nil when the section has none
	projects []Project
	groups   []Group
}

// configFile is the part of a posted configuration Rails reads.
type configFile struct {
	CIAccess *struct {
		Projects []map[string]json.RawMessage `json:"projects"`
		Groups   []map[string]json.RawMessage `json:"groups"`
	} `json:"ci_access"`
	UserAccess *struct {
		AccessAs json.RawMessage `json:"access_as"`
		Projects []struct {
			ID string `json:"id"`
		} `json:"projects"`
		Groups []struct {
			ID string `json:"id"`
		} `json:"groups"`
	} `json:"user_access"`
}

// resolveConfigLocked turns a posted configuration of agent a into the
// authorizations Rails keeps (Clusters::Agents::Authorizations::*::
// RefreshService): entries are looked up by full path within the root
// namespace of the agent's configuration project, those that name nothing
// there are left out, and at most maxEntries of each kind are kept.
func (s *Server) resolveConfigLocked(a Agent, raw json.RawMessage) (*agentConfig, error) {
	var f configFile
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("agent_config is not a configuration: %v", err)
	}
	root := rootNamespace(a.ProjectPath)
	cfg := &agentConfig{}
	if ci := f.CIAccess; ci != nil {
		var err error
		cfg.ciProjects, err = resolveCIAccess("projects", ci.Projects, root, func(fullPath string) (int64, string, bool) {
			if p := s.projectByPathLocked(fullPath); p != nil {
				return p.ID, p.Path, true
			}
			return 0, "", false
		})
		if err != nil {
			return nil, err
		}
		cfg.ciGroups, err = resolveCIAccess("groups", ci.Groups, root, func(fullPath string) (int64, string, bool) {
			if g := s.groupByPathLocked(fullPath); g != nil {
				return g.ID, g.Path, true
			}
			return 0, "", false
		})
		if err != nil {
			return nil, err
		}
	}
	if ua := f.UserAccess; ua != nil {
		u := &userAuthorization{}
		if len(ua.AccessAs) > 0 && string(ua.AccessAs) != "null" {
			u.accessAs = ua.AccessAs
		}
		for _, e := range ua.Projects {
			if p := s.projectByPathLocked(e.ID); p != nil && rootNamespace(p.Path) == root && len(u.projects) < maxEntries {
				u.projects = append(u.projects, *p)
			}
		}
		for _, e := range ua.Groups {
			if g := s.groupByPathLocked(e.ID); g != nil && rootNamespace(g.Path) == root && len(u.groups) < maxEntries {
				u.groups = append(u.groups, *g)
			}
		}
		cfg.user = u
	}
	return cfg, nil
}

// resolveCIAccess resolves the entries of ci_access.<kind> (projects or
// groups) with lookup, which finds a full path's id and canonical path:
// entries that name nothing within the root namespace root are left out,
// and at most maxEntries are kept.
func resolveCIAccess(kind string, entries []map[string]json.RawMessage, root string, lookup func(fullPath string) (id int64, canonical string, ok bool)) ([]ciAuthorization, error) {
	var out []ciAuthorization
	for _, e := range entries {
		var fullPath string
		if err := json.Unmarshal(e["id"], &fullPath); err != nil || fullPath == "" {
			return nil, fmt.Errorf("ci_access.%s entry without a string id", kind)
		}
		id, canonical, ok := lookup(fullPath)
		if !ok || rootNamespace(canonical) != root {
			continue
		}
		rest := make(map[string]json.RawMessage, len(e))
		for k, v := range e {
			if k != "id" {
				rest[k] = v
			}
		}
		conf, _ := json.Marshal(rest) // values were decoded as JSON: they marshal
		var envs []string
		if v, ok := e["environments"]; ok {
			if err := json.Unmarshal(v, &envs); err != nil {
				return nil, fmt.Errorf("ci_access.%s environments is not a list of strings", kind)
			}
		}
		out = append(out, ciAuthorization{id: id, path: canonical, config: conf, environments: envs})
		if len(out) == maxEntries {
			break
		}
	}
	return out, nil
}

// rootNamespace is the first segment of a full path.
func rootNamespace(fullPath string) string {
	root, _, _ := strings.Cut(strings.ToLower(fullPath), "/")
	return root
}

// ancestorsLocked lists the groups a project or group at fullPath is in,
// outermost first, itself excluded.
func (s *Server) ancestorsLocked(fullPath string) []Group {
	var out []Group
	for dir := path.Dir(fullPath); dir != "."; dir = path.Dir(dir) {
		if g := s.groupByPathLocked(dir); g != nil {
			out = append(out, *g)
		}
	}
	slices.Reverse(out)
	return out
}

// accessLevelLocked is the user's access level in the project or group at
// fullPath: the highest of its memberships there and in the groups above.
func (s *Server) accessLevelLocked(userID int64, fullPath string) int {
	level := 0
	for _, m := range s.members {
		if m.userID != userID {
			continue
		}
		if strings.EqualFold(m.path, fullPath) || strings.HasPrefix(strings.ToLower(fullPath), strings.ToLower(m.path)+"/") {
			level = max(level, m.level)
		}
	}
	return level
}

// findLocked returns the first element of items that match accepts, or nil;
// the pointer points into items, so s.mu must be held while it is used.
func findLocked[T any](items []T, match func(*T) bool) *T {
	for i := range items {
		if match(&items[i]) {
			return &items[i]
		}
	}
	return nil
}

func (s *Server) groupByPathLocked(p string) *Group {
	return findLocked(s.groups, func(g *Group) bool { return strings.EqualFold(g.Path, p) })
}

func (s *Server) groupByIDLocked(id int64) *Group {
	return findLocked(s.groups, func(g *Group) bool { return g.ID == id })
}

func (s *Server) projectByPathLocked(p string) *Project {
	return findLocked(s.projects, func(pr *Project) bool { return strings.EqualFold(pr.Path, p) })
}

func (s *Server) projectByIDLocked(id int64) *Project {
	return findLocked(s.projects, func(pr *Project) bool { return pr.ID == id })
}

func (s *Server) userByNameLocked(name string) *User {
	return findLocked(s.users, func(u *User) bool { return strings.EqualFold(u.Username, name) })
}

func (s *Server) userByIDLocked(id int64) *User {
	return findLocked(s.users, func(u *User) bool { return u.ID == id })
}

// environmentMatches reports whether a job's environment name matches one
// of a ci_access entry's environments, where "*" stands for any run of
// characters (Clusters::Agents::Authorizations::CiAccess::FilterService).
func environmentMatches(patterns []string, env string) bool {
	for _, p := range patterns {
		if wildcardMatch(p, env) {
			return true
		}
	}
	return false
}

func wildcardMatch(pattern, s string) bool {
	parts := strings.Split(pattern, "*")
	if len(parts) == 1 {
		return pattern == s
	}
	if !strings.HasPrefix(s, parts[0]) {
		return false
	}
	s = s[len(parts[0]):]
	for _, part := range parts[1 : len(parts)-1] {
		i := strings.Index(s, part)
		if i < 0 {
			return false
		}
		s = s[i+len(part):]
	}
	return strings.HasSuffix(s, parts[len(parts)-1])
}
