package fakegitlab

import (
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// UsageReport is one usage_metrics body KAS sent.
type UsageReport struct {
	// Counters are the plain counters by name.
	Counters map[string]int64
	// UniqueCounters are the unique counters (lists of ids) by name.
	UniqueCounters map[string][]int64
}

// The counter names KAS reports to usage_metrics (kas-spec §7).
var (
	knownCounters = map[string]bool{
		"k8s_api_proxy_request":                  true,
		"flux_git_push_notifications_total":      true,
		"k8s_api_proxy_requests_via_ci_access":   true,
		"k8s_api_proxy_requests_via_user_access": true,
		"k8s_api_proxy_requests_via_pat_access":  true,
		"gitops_sync":                            true,
	}
	knownUniqueCounters = map[string]bool{
		"k8s_api_proxy_requests_unique_users_via_ci_access":    true,
		"k8s_api_proxy_requests_unique_agents_via_ci_access":   true,
		"k8s_api_proxy_requests_unique_users_via_user_access":  true,
		"k8s_api_proxy_requests_unique_agents_via_user_access": true,
		"k8s_api_proxy_requests_unique_users_via_pat_access":   true,
		"k8s_api_proxy_requests_unique_agents_via_pat_access":  true,
		"flux_git_push_notified_unique_projects":               true,
		"agent_users_using_ci_tunnel":                          true,
	}
)

// usageMetricsRequest is the body KAS sends.
type usageMetricsRequest struct {
	Counters       map[string]int64   `json:"counters"`
	UniqueCounters map[string][]int64 `json:"unique_counters"`
}

// usageMetrics serves POST usage_metrics (kas-spec §7).
func (s *Server) usageMetrics(w http.ResponseWriter, r *http.Request) {
	var req usageMetricsRequest
	if err := decodeJSONBody(r, &req); err != nil {
		s.violation(r, "%v", err)
		writeMessage(w, http.StatusBadRequest, "400 Bad request - "+err.Error())
		return
	}
	var problems []string
	for _, name := range sortedKeys(req.Counters) {
		switch {
		case !knownCounters[name]:
			problems = append(problems, "unknown counter "+strconv.Quote(name))
		case req.Counters[name] < 0:
			problems = append(problems, "negative counter "+strconv.Quote(name))
		}
	}
	for _, name := range sortedKeys(req.UniqueCounters) {
		switch {
		case !knownUniqueCounters[name]:
			problems = append(problems, "unknown unique counter "+strconv.Quote(name))
		case req.UniqueCounters[name] == nil:
			problems = append(problems, "unique counter "+strconv.Quote(name)+" is null, not a list")
		}
	}
	if len(problems) > 0 {
		msg := strings.Join(problems, ", ")
		s.violation(r, "bad usage report: %s", msg)
		writeMessage(w, http.StatusBadRequest, "400 Bad request - "+msg)
		return
	}
	if !s.accept(w, PathUsageMetrics) {
		return
	}
	report := UsageReport{
		Counters:       maps.Clone(req.Counters),
		UniqueCounters: maps.Clone(req.UniqueCounters),
	}
	s.mu.Lock()
	s.usage = append(s.usage, report)
	s.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// UsageReports returns the usage reports the Server accepted, in the order
// they came. A report without counters or unique counters has nil maps.
func (s *Server) UsageReports() []UsageReport {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]UsageReport, len(s.usage))
	for i, u := range s.usage {
		out[i].Counters = maps.Clone(u.Counters)
		if u.UniqueCounters != nil {
			out[i].UniqueCounters = make(map[string][]int64, len(u.UniqueCounters))
			for k, v := range u.UniqueCounters {
				out[i].UniqueCounters[k] = slices.Clone(v)
			}
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }
