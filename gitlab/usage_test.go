package gitlab

import (
	"context"
	"encoding/json"
	"net/http"
	"reflect"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestUsageTakeRestore(t *testing.T) {
	u := NewUsage()
	if m := u.Take(); m != nil {
		t.Fatalf("empty Take = %+v, want nil", m)
	}
	u.ProxyRequest(AccessCI, 2, 5)
	u.ProxyRequest(AccessCI, 1, 5)
	u.ProxyRequest(AccessCI, 2, 5)
	u.ProxyRequest(AccessUser, 3, 6)
	u.ProxyRequest(AccessPAT, 4, 7)
	u.GitPushNotification(9)
	u.GitPushNotification(8)
	u.GitPushNotification(9)
	m := u.Take()
	want := &UsageMetrics{
		Counters: map[string]int64{
			"k8s_api_proxy_request":                  5,
			"flux_git_push_notifications_total":      3,
			"k8s_api_proxy_requests_via_ci_access":   3,
			"k8s_api_proxy_requests_via_user_access": 1,
			"k8s_api_proxy_requests_via_pat_access":  1,
		},
		UniqueCounters: map[string][]int64{
			"k8s_api_proxy_requests_unique_users_via_ci_access":    {1, 2},
			"k8s_api_proxy_requests_unique_agents_via_ci_access":   {5},
			"k8s_api_proxy_requests_unique_users_via_user_access":  {3},
			"k8s_api_proxy_requests_unique_agents_via_user_access": {6},
			"k8s_api_proxy_requests_unique_users_via_pat_access":   {4},
			"k8s_api_proxy_requests_unique_agents_via_pat_access":  {7},
			"flux_git_push_notified_unique_projects":               {8, 9},
			"agent_users_using_ci_tunnel":                          {1, 2},
		},
	}
	if !reflect.DeepEqual(m, want) {
		t.Errorf("Take =\n%+v\nwant\n%+v", m, want)
	}
	if again := u.Take(); again != nil {
		t.Errorf("Take after Take = %+v, want nil", again)
	}

	// A failed send is restored and merged with what came since.
	u.ProxyRequest(AccessCI, 3, 5)
	u.Restore(m)
	u.Restore(nil)
	m2 := u.Take()
	if m2.Counters["k8s_api_proxy_request"] != 6 || m2.Counters["k8s_api_proxy_requests_via_ci_access"] != 4 {
		t.Errorf("counters after Restore %v", m2.Counters)
	}
	if got := m2.UniqueCounters["agent_users_using_ci_tunnel"]; !reflect.DeepEqual(got, []int64{1, 2, 3}) {
		t.Errorf("unique users after Restore %v", got)
	}

	var nilUsage *Usage
	nilUsage.ProxyRequest(AccessCI, 1, 1)
	nilUsage.GitPushNotification(1)
	if nilUsage.Take() != nil {
		t.Error("nil Usage took something")
	}
}

func TestUsageJSON(t *testing.T) {
	// Every tracked key is sent, empty lists as [] (kas-spec §7).
	u := NewUsage()
	u.GitPushNotification(7)
	b, err := json.Marshal(u.Take())
	if err != nil {
		t.Fatal(err)
	}
	want := `{"counters":{"flux_git_push_notifications_total":1,"k8s_api_proxy_request":0,` +
		`"k8s_api_proxy_requests_via_ci_access":0,"k8s_api_proxy_requests_via_pat_access":0,"k8s_api_proxy_requests_via_user_access":0},` +
		`"unique_counters":{"agent_users_using_ci_tunnel":[],"flux_git_push_notified_unique_projects":[7],` +
		`"k8s_api_proxy_requests_unique_agents_via_ci_access":[],"k8s_api_proxy_requests_unique_agents_via_pat_access":[],` +
		`"k8s_api_proxy_requests_unique_agents_via_user_access":[],"k8s_api_proxy_requests_unique_users_via_ci_access":[],` +
		`"k8s_api_proxy_requests_unique_users_via_pat_access":[],"k8s_api_proxy_requests_unique_users_via_user_access":[]}}`
	if string(b) != want {
		t.Errorf("JSON\n%s\nwant\n%s", b, want)
	}
}

func TestUsageConcurrent(t *testing.T) {
	u := NewUsage()
	var wg sync.WaitGroup
	var mu sync.Mutex // guards total
	var total int64
	for i := range 8 {
		wg.Go(func() {
			for j := range 100 {
				u.ProxyRequest(AccessKind(1+j%3), int64(i), int64(j))
			}
		})
	}
	wg.Go(func() {
		for range 20 {
			if m := u.Take(); m != nil {
				mu.Lock()
				total += m.Counters["k8s_api_proxy_request"]
				mu.Unlock()
			}
		}
	})
	wg.Wait()
	if m := u.Take(); m != nil {
		total += m.Counters["k8s_api_proxy_request"]
	}
	if total != 800 {
		t.Errorf("counted %d requests, want 800", total)
	}
}

func TestReporter(t *testing.T) {
	f := newFakeGitLab(t, "")
	type post struct {
		status int
		body   UsageMetrics
	}
	posts := make(chan post, 10)
	var mu sync.Mutex // guards statuses
	statuses := []int{http.StatusServiceUnavailable, http.StatusNoContent, http.StatusNoContent}
	f.handle(PathUsageMetrics, func(w http.ResponseWriter, r *http.Request) {
		var m UsageMetrics
		if err := json.Unmarshal(readBody(t, r), &m); err != nil {
			t.Error(err)
		}
		mu.Lock()
		status := statuses[0]
		if len(statuses) > 1 {
			statuses = statuses[1:]
		}
		mu.Unlock()
		w.WriteHeader(status)
		posts <- post{status, m}
	})
	u := NewUsage()
	core, logs := observer.New(zap.WarnLevel)
	r := &Reporter{Client: f.client(), Usage: u, Period: time.Millisecond, Logger: zap.New(core)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		r.Run(ctx)
		close(done)
	}()

	u.ProxyRequest(AccessPAT, 1, 2)
	p := <-posts
	if p.status != http.StatusServiceUnavailable || p.body.Counters["k8s_api_proxy_request"] != 1 {
		t.Fatalf("first post %+v", p)
	}
	// The failed report comes back with the next one, merged with what
	// was counted since.
	u.ProxyRequest(AccessPAT, 3, 2)
	var got int64
	var users []int64
	for got < 2 {
		p = <-posts
		if p.status != http.StatusNoContent {
			t.Fatalf("post %+v", p)
		}
		got += p.body.Counters["k8s_api_proxy_requests_via_pat_access"]
		users = append(users, p.body.UniqueCounters["k8s_api_proxy_requests_unique_users_via_pat_access"]...)
	}
	if got != 2 || !reflect.DeepEqual(users, []int64{1, 3}) {
		t.Errorf("after the retry: %d requests from users %v, want 2 from [1 3]", got, users)
	}
	if n := logs.FilterMessage("sending the usage report to GitLab failed; will retry with the next one").Len(); n != 1 {
		t.Errorf("%d warnings about the failure, want 1", n)
	}
	for _, e := range logs.All() {
		if e.ContextMap()["gitlab_path"] != PathUsageMetrics || e.ContextMap()["status"] != int64(503) {
			t.Errorf("log fields %v", e.ContextMap())
		}
	}

	// Counts made just before shutdown go out in the final report.
	u.GitPushNotification(4)
	cancel()
	<-done
	close(posts)
	var pushes int64
	for p := range posts {
		pushes += p.body.Counters["flux_git_push_notifications_total"]
	}
	if pushes != 1 {
		t.Errorf("%d push notifications reported, want 1 (final report)", pushes)
	}
	if m := u.Take(); m != nil {
		t.Errorf("left unreported: %+v", m)
	}
}

func TestReporterDropsBadData(t *testing.T) {
	f := newFakeGitLab(t, "")
	f.handle(PathUsageMetrics, jsonAnswer(http.StatusBadRequest, `{"message":"400 Bad request"}`))
	u := NewUsage()
	r := &Reporter{Client: f.client(), Usage: u, Period: time.Hour}
	u.ProxyRequest(AccessCI, 1, 1)
	r.report(context.Background())
	if m := u.Take(); m != nil {
		t.Errorf("data GitLab refused as bad was kept: %+v", m)
	}
}

func TestReporterDisabled(t *testing.T) {
	f := newFakeGitLab(t, "")
	u := NewUsage()
	u.ProxyRequest(AccessCI, 1, 1)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	(&Reporter{Client: f.client(), Usage: u}).Run(ctx)
	if f.callCount(PathUsageMetrics) != 0 {
		t.Error("disabled reporter sent a report")
	}
}
