package gitlab

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
)

// AccessKind is how a Kubernetes API proxy request was authenticated, for
// the usage counters (kas-spec §7).
type AccessKind int

// Access kinds.
const (
	// AccessCI is a CI job token.
	AccessCI AccessKind = iota + 1
	// AccessUser is a GitLab session cookie.
	AccessUser
	// AccessPAT is a personal access token.
	AccessPAT
)

// String returns the kind's name as GitLab's counter names spell it.
func (k AccessKind) String() string {
	switch k {
	case AccessCI:
		return "ci"
	case AccessUser:
		return "user"
	case AccessPAT:
		return "pat"
	}
	return "unknown"
}

// Names of the counters GitLab accepts at usage_metrics that the agent
// server tracks (kas-spec §7).
const (
	counterProxyRequest       = "k8s_api_proxy_request"
	counterFluxPushes         = "flux_git_push_notifications_total"
	uniqueFluxProjects        = "flux_git_push_notified_unique_projects"
	uniqueAgentUsersCITunnel  = "agent_users_using_ci_tunnel"
	counterProxyRequestPrefix = "k8s_api_proxy_requests_via_"
	uniqueUsersPrefix         = "k8s_api_proxy_requests_unique_users_via_"
	uniqueAgentsPrefix        = "k8s_api_proxy_requests_unique_agents_via_"
	accessSuffix              = "_access"
)

var accessKinds = []AccessKind{AccessCI, AccessUser, AccessPAT}

// kindCounters names the counters of one access kind, built once: they are
// counted on every proxied request.
type kindCounters struct {
	requests, uniqueUsers, uniqueAgents string
}

var countersOf = func() map[AccessKind]kindCounters {
	m := make(map[AccessKind]kindCounters, len(accessKinds))
	for _, k := range accessKinds {
		m[k] = kindCounters{
			requests:     counterProxyRequestPrefix + k.String() + accessSuffix,
			uniqueUsers:  uniqueUsersPrefix + k.String() + accessSuffix,
			uniqueAgents: uniqueAgentsPrefix + k.String() + accessSuffix,
		}
	}
	return m
}()

// trackedCounters and trackedUniqueCounters are every key a report
// carries, zero or empty included.
var trackedCounters, trackedUniqueCounters = func() ([]string, []string) {
	counters := []string{counterProxyRequest, counterFluxPushes}
	unique := []string{uniqueFluxProjects, uniqueAgentUsersCITunnel}
	for _, k := range accessKinds {
		c := countersOf[k]
		counters = append(counters, c.requests)
		unique = append(unique, c.uniqueUsers, c.uniqueAgents)
	}
	return counters, unique
}()

// Usage counts what GitLab's usage_metrics wants to know (kas-spec §7)
// between two reports. It is safe for concurrent use; a nil *Usage counts
// nothing.
type Usage struct {
	mu       sync.Mutex                    // guards counters and unique
	counters map[string]int64              // counter name → count
	unique   map[string]map[int64]struct{} // unique counter name → ids seen
}

// NewUsage returns empty counters.
func NewUsage() *Usage {
	return &Usage{counters: map[string]int64{}, unique: map[string]map[int64]struct{}{}}
}

// ProxyRequest counts one authenticated Kubernetes API proxy request of a
// user (for CI, the user the job runs for) to an agent.
func (u *Usage) ProxyRequest(kind AccessKind, userID, agentID int64) {
	c, ok := countersOf[kind]
	if u == nil || !ok {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.counters[counterProxyRequest]++
	u.counters[c.requests]++
	u.addUnique(c.uniqueUsers, userID)
	u.addUnique(c.uniqueAgents, agentID)
	if kind == AccessCI {
		u.addUnique(uniqueAgentUsersCITunnel, userID)
	}
}

// GitPushNotification counts one push notification to Flux for a project.
func (u *Usage) GitPushNotification(projectID int64) {
	if u == nil {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.counters[counterFluxPushes]++
	u.addUnique(uniqueFluxProjects, projectID)
}

// addUnique adds id to a unique counter; unknown (zero) ids are not
// counted. u.mu must be held.
func (u *Usage) addUnique(name string, id int64) {
	if id == 0 {
		return
	}
	set := u.unique[name]
	if set == nil {
		set = map[int64]struct{}{}
		u.unique[name] = set
	}
	set[id] = struct{}{}
}

// Take returns what was counted since the last Take and starts afresh, or
// nil if nothing was. The report has every tracked key, with zero counts
// and empty lists too, and its lists are sorted.
func (u *Usage) Take() *UsageMetrics {
	if u == nil {
		return nil
	}
	u.mu.Lock()
	counters, unique := u.counters, u.unique
	u.counters, u.unique = map[string]int64{}, map[string]map[int64]struct{}{}
	u.mu.Unlock()

	empty := true
	m := &UsageMetrics{Counters: map[string]int64{}, UniqueCounters: map[string][]int64{}}
	for _, name := range trackedCounters {
		m.Counters[name] = counters[name]
		empty = empty && counters[name] == 0
	}
	for _, name := range trackedUniqueCounters {
		ids := make([]int64, 0, len(unique[name]))
		for id := range unique[name] {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		m.UniqueCounters[name] = ids
		empty = empty && len(ids) == 0
	}
	if empty {
		return nil
	}
	return m
}

// Restore adds back a report taken by Take whose sending failed, so that
// nothing is lost; it goes out with the next one.
func (u *Usage) Restore(m *UsageMetrics) {
	if u == nil || m == nil {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	for name, n := range m.Counters {
		if n != 0 {
			u.counters[name] += n
		}
	}
	for name, ids := range m.UniqueCounters {
		for _, id := range ids {
			u.addUnique(name, id)
		}
	}
}

// DefaultUsageReportingPeriod is GitLab's
// observability.usage_reporting_period (kas-spec §7).
const DefaultUsageReportingPeriod = time.Minute

// Timeouts of one report, and of the report sent on the way out.
const (
	reportTimeout      = 30 * time.Second
	finalReportTimeout = 5 * time.Second
)

// Reporter sends the counts of a [Usage] to GitLab every Period
// (kas-spec §7).
type Reporter struct {
	Client *Client
	Usage  *Usage
	// Period is the time between reports; zero or less disables
	// reporting.
	Period time.Duration
	// Logger is told about failed reports; nil means no logging.
	Logger *zap.Logger
}

// Run reports every Period until ctx is done, then sends a last report
// (bounded by a short timeout) and returns. A report that fails is added
// back to the counts and retried with the next one, except one GitLab
// refuses with 400 as bad data: the same data would be refused again. With
// reporting disabled Run just waits for ctx.
func (r *Reporter) Run(ctx context.Context) {
	if r.Period <= 0 {
		<-ctx.Done()
		return
	}
	t := time.NewTicker(r.Period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			final, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalReportTimeout)
			r.report(final)
			cancel()
			return
		case <-t.C:
			rctx, cancel := context.WithTimeout(ctx, reportTimeout)
			r.report(rctx)
			cancel()
		}
	}
}

// report sends what was counted since the last report.
func (r *Reporter) report(ctx context.Context) {
	m := r.Usage.Take()
	if m == nil {
		return
	}
	err := r.Client.SendUsageMetrics(ctx, m)
	if err == nil {
		return
	}
	log := r.Logger
	if log == nil {
		log = zap.NewNop()
	}
	fields := []zap.Field{zap.String("gitlab_path", PathUsageMetrics), zap.Error(err)}
	var gerr *Error
	if errors.As(err, &gerr) {
		fields = append(fields, zap.Int("status", gerr.StatusCode))
		if gerr.StatusCode == http.StatusBadRequest {
			log.Warn("GitLab refused the usage report as bad data; dropping it", fields...)
			return
		}
	}
	r.Usage.Restore(m)
	log.Warn("sending the usage report to GitLab failed; will retry with the next one", fields...)
}
