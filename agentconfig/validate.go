package agentconfig

import (
	"fmt"
	"slices"
	"strconv"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

// validate checks the rules GitLab's agent server checks after decoding
// (gitlab-wire §B.5; the allowed words of kas-spec §3.2): identifiers and
// list items that must not be empty, oneofs that must be set, and the
// words some fields are limited to.
func validate(f *agentcfg.ConfigurationFile) error {
	for i, p := range f.GetGitops().GetManifestProjects() {
		if err := validateManifestProject(index("gitops.manifest_projects", i), p); err != nil {
			return err
		}
	}
	for i, p := range f.GetCiAccess().GetProjects() {
		if err := validateCiAccessEntry(index("ci_access.projects", i), p.GetId(), p.GetEnvironments(), p.GetAccessAs()); err != nil {
			return err
		}
	}
	for i, g := range f.GetCiAccess().GetGroups() {
		if err := validateCiAccessEntry(index("ci_access.groups", i), g.GetId(), g.GetEnvironments(), g.GetAccessAs()); err != nil {
			return err
		}
	}
	if err := validateUserAccess("user_access", f.GetUserAccess()); err != nil {
		return err
	}
	if cs := f.GetContainerScanning(); cs != nil {
		if err := nonEmpty("container_scanning.cadence", cs.GetCadence()); err != nil {
			return err
		}
	}
	if rd := f.GetRemoteDevelopment(); rd != nil {
		if err := positive("remote_development.partial_sync_interval", rd.GetPartialSyncInterval()); err != nil {
			return err
		}
		if err := positive("remote_development.full_sync_interval", rd.GetFullSyncInterval()); err != nil {
			return err
		}
	}
	return nil
}

func validateManifestProject(path string, p *agentcfg.ManifestProjectCF) error {
	// id may be left out (agentk then uses the configuration project),
	// but not given empty.
	if p.Id != nil {
		if err := nonEmpty(join(path, "id"), p.GetId()); err != nil {
			return err
		}
	}
	for i, pc := range p.GetPaths() {
		if err := nonEmpty(join(index(join(path, "paths"), i), "glob"), pc.GetGlob()); err != nil {
			return err
		}
	}
	if err := oneOfWords(join(path, "dry_run_strategy"), p.GetDryRunStrategy(),
		"none", "client", "server"); err != nil {
		return err
	}
	if err := oneOfWords(join(path, "prune_propagation_policy"), p.GetPrunePropagationPolicy(),
		"orphan", "background", "foreground"); err != nil {
		return err
	}
	if err := oneOfWords(join(path, "inventory_policy"), p.GetInventoryPolicy(),
		"must_match", "adopt_if_no_inventory", "adopt_all"); err != nil {
		return err
	}
	if ref := p.GetRef(); ref != nil {
		rp := join(path, "ref")
		switch r := ref.GetRef().(type) {
		case nil:
			return &Error{Path: rp, Msg: "must set one of tag, branch or commit"}
		case *agentcfg.GitRefCF_Tag:
			return nonEmpty(join(rp, "tag"), r.Tag)
		case *agentcfg.GitRefCF_Branch:
			return nonEmpty(join(rp, "branch"), r.Branch)
		case *agentcfg.GitRefCF_Commit:
			return nonEmpty(join(rp, "commit"), r.Commit)
		}
	}
	return nil
}

// validateCiAccessEntry checks a ci_access project or group; both have the
// same fields.
func validateCiAccessEntry(path, id string, environments []string, as *agentcfg.CiAccessAsCF) error {
	if err := nonEmpty(join(path, "id"), id); err != nil {
		return err
	}
	if err := itemsNonEmpty(join(path, "environments"), environments); err != nil {
		return err
	}
	// access_as may be left out: the agent's own identity (kas-spec §2.5).
	if as == nil {
		return nil
	}
	ap := join(path, "access_as")
	switch a := as.GetAs().(type) {
	case nil:
		return &Error{Path: ap, Msg: `must set one of agent, impersonate or ci_job, such as "agent: {}"`}
	case *agentcfg.CiAccessAsCF_Impersonate:
		ip := join(ap, "impersonate")
		imp := a.Impersonate
		if err := nonEmpty(join(ip, "username"), imp.GetUsername()); err != nil {
			return err
		}
		if err := itemsNonEmpty(join(ip, "groups"), imp.GetGroups()); err != nil {
			return err
		}
		for i, e := range imp.GetExtra() {
			ep := index(join(ip, "extra"), i)
			if err := nonEmpty(join(ep, "key"), e.GetKey()); err != nil {
				return err
			}
			if len(e.GetVal()) == 0 {
				return &Error{Path: join(ep, "val"), Msg: "must have at least one value"}
			}
			if err := itemsNonEmpty(join(ep, "val"), e.GetVal()); err != nil {
				return err
			}
		}
	}
	return nil
}

func validateUserAccess(path string, ua *agentcfg.UserAccessCF) error {
	if ua == nil {
		return nil
	}
	// access_as may be left out: the agent's own identity (kas-spec §3.2).
	if as := ua.GetAccessAs(); as != nil && as.GetAs() == nil {
		return &Error{Path: join(path, "access_as"), Msg: `must set one of agent or user, such as "agent: {}"`}
	}
	for i, p := range ua.GetProjects() {
		if err := nonEmpty(join(index(join(path, "projects"), i), "id"), p.GetId()); err != nil {
			return err
		}
	}
	for i, g := range ua.GetGroups() {
		if err := nonEmpty(join(index(join(path, "groups"), i), "id"), g.GetId()); err != nil {
			return err
		}
	}
	return nil
}

func nonEmpty(path, s string) error {
	if s == "" {
		return &Error{Path: path, Msg: "must not be empty"}
	}
	return nil
}

func itemsNonEmpty(path string, items []string) error {
	for i, s := range items {
		if err := nonEmpty(index(path, i), s); err != nil {
			return err
		}
	}
	return nil
}

// oneOfWords accepts s if it is empty (agentk's default) or one of words.
func oneOfWords(path, s string, words ...string) error {
	if s == "" || slices.Contains(words, s) {
		return nil
	}
	return &Error{Path: path, Msg: fmt.Sprintf("invalid value %q: want one of %s", truncate(s), orList(words))}
}

// positive accepts a duration left out or greater than zero.
func positive(path string, d *durationpb.Duration) error {
	if d == nil || d.GetSeconds() > 0 || (d.GetSeconds() == 0 && d.GetNanos() > 0) {
		return nil
	}
	return &Error{Path: path, Msg: "must be greater than 0s"}
}

func index(path string, i int) string {
	return path + "[" + strconv.Itoa(i) + "]"
}
