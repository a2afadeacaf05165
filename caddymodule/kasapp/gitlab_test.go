package kasapp

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

func TestUnmarshalGlobalOption(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    string // JSON of the app
		wantErr string
	}{
		{
			name: "all settings",
			input: `kas {
				gitlab {
					url http://127.0.0.1:8181
					secret_file /etc/gitlab/gitlab_kas_secret
					ca_file /etc/gitlab/ca.pem
					external_url https://gitlab.example.com
					api_listen 127.0.0.1:8153
					api_tls /etc/kas/api.crt /etc/kas/api.key
					agent_info_cache_ttl 2m
					agent_info_cache_error_ttl 30s
					allowed_agents_cache_ttl 90s
					allowed_agents_cache_error_ttl 5s
					usage_reporting_period 0
					api_rate_limit 12.5 100
					agent_configuration_poll_period 5m
					gitaly_ca_file /etc/gitlab/gitaly-ca.pem
					gitaly_global_rate_limit 60 140
					gitaly_per_server_rate_limit 30 80
				}
			}`,
			want: `{"gitlab":{"url":"http://127.0.0.1:8181","secret_file":"/etc/gitlab/gitlab_kas_secret","ca_file":"/etc/gitlab/ca.pem",` +
				`"external_url":"https://gitlab.example.com","api_listen":"127.0.0.1:8153","api_cert_file":"/etc/kas/api.crt","api_key_file":"/etc/kas/api.key",` +
				`"agent_info_cache_ttl":120000000000,"agent_info_cache_error_ttl":30000000000,"allowed_agents_cache_ttl":90000000000,` +
				`"allowed_agents_cache_error_ttl":5000000000,"usage_reporting_period":0,` +
				`"api_rate_limit":{"refill_rate_per_second":12.5,"bucket_size":100},"agent_configuration_poll_period":300000000000,` +
				`"gitaly_ca_file":"/etc/gitlab/gitaly-ca.pem","gitaly_global_rate_limit":{"refill_rate_per_second":60,"bucket_size":140},` +
				`"gitaly_per_server_rate_limit":{"refill_rate_per_second":30,"bucket_size":80}}}`,
		},
		{name: "empty", input: `kas`, want: `{}`},
		{name: "unknown option", input: "kas {\n memcached localhost\n}", wantErr: `unrecognized kas option "memcached"`},
		{
			name: "several nodes",
			input: `kas {
				redis {
					addresses 10.0.0.1:26379 10.0.0.2:26379
					addresses 10.0.0.3:26379
					master_name gitlab-redis
					username kas
					password_file /etc/kas/redis.pass
					sentinel_password_file /etc/kas/sentinel.pass
					database_index 2
					tls {
						ca_file /etc/kas/redis-ca.pem
						server_name redis.internal
					}
					key_prefix kas-prod
					tunnel_ttl 2m
					tunnel_refresh 90s
				}
				private_api {
					listen :8155
					secret_file /etc/kas/private.secret
					tls /etc/kas/node.crt /etc/kas/node.key
					ca_file /etc/kas/nodes-ca.pem
					own_cidrs 10.0.0.0/24 fd00::/64
					own_scheme grpcs
					own_host kas.internal
				}
			}`,
			want: `{"redis":{"addresses":["10.0.0.1:26379","10.0.0.2:26379","10.0.0.3:26379"],"master_name":"gitlab-redis","username":"kas",` +
				`"password_file":"/etc/kas/redis.pass","sentinel_password_file":"/etc/kas/sentinel.pass","database_index":2,` +
				`"tls":{"ca_file":"/etc/kas/redis-ca.pem","server_name":"redis.internal"},"key_prefix":"kas-prod","tunnel_ttl":120000000000,"tunnel_refresh":90000000000},` +
				`"private_api":{"listen":":8155","secret_file":"/etc/kas/private.secret","cert_file":"/etc/kas/node.crt","key_file":"/etc/kas/node.key",` +
				`"ca_file":"/etc/kas/nodes-ca.pem","own_cidrs":["10.0.0.0/24","fd00::/64"],"own_scheme":"grpcs","own_host":"kas.internal"}}`,
		},
		{name: "redis cluster flag takes no argument", input: "kas {\n redis {\n cluster yes\n }\n}", wantErr: "wrong argument count"},
		{name: "unknown redis option", input: "kas {\n redis {\n sentinels a\n }\n}", wantErr: `unrecognized redis option "sentinels"`},
		{name: "bad database index", input: "kas {\n redis {\n database_index one\n }\n}", wantErr: `database_index: "one"`},
		{name: "unknown private_api option", input: "kas {\n private_api {\n address x\n }\n}", wantErr: `unrecognized private_api option "address"`},
		{name: "drain and age", input: "kas {\n shutdown_grace_period 30s\n max_connection_age 10m\n}",
			want: `{"shutdown_grace_period":30000000000,"max_connection_age":600000000000}`},
		{name: "no maximum age", input: "kas {\n max_connection_age off\n}", want: `{"max_connection_age":-1}`},
		{name: "zero grace", input: "kas {\n shutdown_grace_period 0\n}", wantErr: `shutdown_grace_period: "0" is not a positive duration`},
		{name: "age without value", input: "kas {\n max_connection_age\n}", wantErr: "wrong argument count"},
		{name: "unknown gitlab option", input: "kas {\n gitlab {\n address x\n }\n}", wantErr: `unrecognized gitlab option "address"`},
		{name: "bad duration", input: "kas {\n gitlab {\n agent_info_cache_ttl soon\n }\n}", wantErr: "is not a duration"},
		{name: "api_tls with one file", input: "kas {\n gitlab {\n api_tls a.crt\n }\n}", wantErr: "wrong argument count"},
		{name: "api_rate_limit with one number", input: "kas {\n gitlab {\n api_rate_limit 50\n }\n}", wantErr: "wrong argument count"},
		{name: "api_rate_limit refill zero", input: "kas {\n gitlab {\n api_rate_limit 0 250\n }\n}", wantErr: `refill rate "0" is not a positive number`},
		{name: "api_rate_limit refill not a number", input: "kas {\n gitlab {\n api_rate_limit fast 250\n }\n}", wantErr: `refill rate "fast"`},
		{name: "api_rate_limit bucket fractional", input: "kas {\n gitlab {\n api_rate_limit 50 2.5\n }\n}", wantErr: `bucket size "2.5" is not a positive integer`},
		{name: "api_rate_limit bucket negative", input: "kas {\n gitlab {\n api_rate_limit 50 -1\n }\n}", wantErr: `bucket size "-1"`},
		{name: "gitaly rate limit refill zero", input: "kas {\n gitlab {\n gitaly_per_server_rate_limit 0 40\n }\n}", wantErr: `gitaly_per_server_rate_limit: refill rate "0"`},
		{name: "bad poll period", input: "kas {\n gitlab {\n agent_configuration_poll_period often\n }\n}", wantErr: `agent_configuration_poll_period: "often" is not a duration`},
		{name: "gitlab twice", input: "kas {\n gitlab {\n }\n gitlab {\n }\n}", wantErr: "gitlab given twice"},
		{name: "redis tls twice", input: "kas {\n redis {\n tls {\n ca_file a.pem\n }\n tls {\n }\n }\n}", wantErr: "tls given twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a App
			err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, _ := json.Marshal(&a)
			if string(got) != tt.want {
				t.Errorf("JSON:\n got %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestProvisionGitLabRefuses(t *testing.T) {
	dir := t.TempDir() // for files that are not there
	good := writeTestFile(t, "good.secret", base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef")))
	short := writeTestFile(t, "short.secret", base64.StdEncoding.EncodeToString([]byte("0123456789abcdef")))
	tests := []struct {
		name    string
		cfg     GitLab
		wantErr string
	}{
		{"no url", GitLab{SecretFile: good}, "must be an http:// or https:// URL"},
		{"url without scheme", GitLab{URL: "gitlab:8181", SecretFile: good}, "must be an http:// or https:// URL"},
		{"no secret", GitLab{URL: "http://gitlab"}, "secret_file is required"},
		{"short secret", GitLab{URL: "http://gitlab", SecretFile: short}, short},
		{"missing secret file", GitLab{URL: "http://gitlab", SecretFile: filepath.Join(dir, "nope")}, "nope"},
		{"bad external url", GitLab{URL: "http://gitlab", SecretFile: good, ExternalURL: "gitlab.example.com"}, "external_url"},
		{"missing ca file", GitLab{URL: "https://gitlab", SecretFile: good, CAFile: filepath.Join(dir, "ca.pem")}, "ca_file"},
		{"ca file without PEM", GitLab{URL: "https://gitlab", SecretFile: good, CAFile: short}, "no PEM certificate"},
		{"half of api tls", GitLab{URL: "http://gitlab", SecretFile: good, APIListen: "127.0.0.1:0", APICertFile: "a.crt"}, "go together"},
		{"negative api rate", GitLab{URL: "http://gitlab", SecretFile: good, APIRateLimit: &RateLimit{RefillRatePerSecond: -1}}, "api_rate_limit: rate limit: refill rate"},
		{"negative api bucket", GitLab{URL: "http://gitlab", SecretFile: good, APIRateLimit: &RateLimit{BucketSize: -1}}, "api_rate_limit: rate limit: bucket size"},
		{"negative poll period", GitLab{URL: "http://gitlab", SecretFile: good, AgentConfigurationPollPeriod: -1}, "agent_configuration_poll_period must not be negative"},
		{"missing gitaly ca file", GitLab{URL: "http://gitlab", SecretFile: good, GitalyCAFile: filepath.Join(dir, "gitaly.pem")}, "gitaly_ca_file"},
		{"gitaly ca file without PEM", GitLab{URL: "http://gitlab", SecretFile: good, GitalyCAFile: short}, "gitaly_ca_file: " + short + ": no PEM certificate"},
		{"negative gitaly rate", GitLab{URL: "http://gitlab", SecretFile: good, GitalyGlobalRateLimit: &RateLimit{RefillRatePerSecond: -1}}, "gitaly global rate limit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			a := App{GitLab: &cfg}
			err := a.Provision(caddy.Context{})
			defer a.Cleanup()
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Provision = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestExternalOrigin(t *testing.T) {
	tests := map[string]string{
		"":                                 "",
		"https://gitlab.example.com":       "https://gitlab.example.com",
		"https://GitLab.Example.com/":      "https://gitlab.example.com",
		"https://gitlab.example.com:443/x": "https://gitlab.example.com",
		"http://gitlab.example.com:80":     "http://gitlab.example.com",
		"https://gitlab.example.com:8443":  "https://gitlab.example.com:8443",
	}
	for in, want := range tests {
		got, err := externalOrigin(in)
		if err != nil || got != want {
			t.Errorf("externalOrigin(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

// TestModeChangeClosesTunnels: tunnels accepted with standalone tokens
// were never checked by GitLab; a reload into GitLab mode closes them so
// that their agents authenticate again.
func TestModeChangeClosesTunnels(t *testing.T) {
	var standalone App
	if err := standalone.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	defer standalone.Cleanup()
	standalone.DeclareAgents(agentSet{1: sha256.Sum256([]byte("token-one"))})
	if err := standalone.Start(); err != nil {
		t.Fatal(err)
	}
	p := h2tunneltest.NewPair(t, http.NotFoundHandler(), h2tunneltest.Options{
		Agent: tunnel.AgentInfo{ID: 1, Credential: sha256.Sum256([]byte("token-one"))},
	})
	t.Cleanup(standalone.Store().Add(p.KAS))

	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte(base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))), 0o600); err != nil {
		t.Fatal(err)
	}
	off := caddy.Duration(0)
	gitlab := App{GitLab: &GitLab{URL: "http://127.0.0.1:1", SecretFile: secret, UsageReportingPeriod: &off}}
	if err := gitlab.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	defer gitlab.Cleanup()
	if gitlab.GitLabMode() == nil || standalone.GitLabMode() != nil {
		t.Fatal("GitLabMode does not tell the modes apart")
	}
	if err := gitlab.Start(); err != nil {
		t.Fatal(err)
	}
	defer gitlab.Stop()
	standalone.Stop()
	select {
	case <-p.KAS.Done():
	default:
		t.Error("a standalone tunnel survived the switch to GitLab mode")
	}
}

// TestAgentRecheckKeepsGitLabStatus: GitLab shows an agent as connected
// while its token was used in the last 8 minutes (kas-spec §7). A re-check
// reaches GitLab only once the cached answer has expired, so the longest
// gap between two calls is the cache TTL plus one re-check interval at
// its longest (+10 % jitter); with the default TTL it must stay under 8
// minutes.
func TestAgentRecheckKeepsGitLabStatus(t *testing.T) {
	ttl := defaultAgentInfoCacheTTL
	longestGap := ttl + agentRecheck(ttl)*11/10
	if longestGap >= 8*time.Minute {
		t.Errorf("with the default TTL of %s a connected agent's token may go %s without reaching GitLab; GitLab's connected status needs less than 8m", ttl, longestGap)
	}
	if agentRecheck(ttl) <= 0 {
		t.Error("no re-check")
	}
}

// TestAPIRateLimitDefaults: what api_rate_limit leaves out is GitLab's
// default: a bucket of 250 that regains 50 calls a second.
func TestAPIRateLimitDefaults(t *testing.T) {
	tests := []struct {
		name     string
		cfg      *RateLimit
		wantSize int
		wantWait time.Duration // for the first call the full bucket has no room for
	}{
		{"not set", nil, 250, 20 * time.Millisecond},
		{"empty", &RateLimit{}, 250, 20 * time.Millisecond},
		{"rate only", &RateLimit{RefillRatePerSecond: 2}, 250, 500 * time.Millisecond},
		{"bucket only", &RateLimit{BucketSize: 3}, 3, 20 * time.Millisecond},
		{"both", &RateLimit{RefillRatePerSecond: 0.25, BucketSize: 1}, 1, 4 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { // no time passes: no refill
				l, err := tt.cfg.limiter()
				if err != nil {
					t.Fatal(err)
				}
				for i := range tt.wantSize {
					if ok, _ := l.Take(); !ok {
						t.Fatalf("call %d of a full bucket of %d refused", i+1, tt.wantSize)
					}
				}
				if ok, wait := l.Take(); ok || wait != tt.wantWait {
					t.Errorf("call past the bucket: ok=%v wait=%v, want refused with wait %v", ok, wait, tt.wantWait)
				}
			})
		})
	}
}
