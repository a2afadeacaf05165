package kasapp

import (
	"math"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("kas", parseGlobalOption)
}

func parseGlobalOption(d *caddyfile.Dispenser, _ any) (any, error) {
	app := new(App)
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "kas", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from the "kas" global option.
// Syntax:
//
//	kas {
//	    shutdown_grace_period <duration>
//	    max_connection_age    <duration>|off
//	    gitlab {
//	        url          <GitLab's internal URL>
//	        secret_file  <path>
//	        ca_file      <path>
//	        external_url <GitLab's external URL>
//	        api_listen   <address>
//	        api_tls      <cert file> <key file>
//	        agent_info_cache_ttl           <duration>
//	        agent_info_cache_error_ttl     <duration>
//	        allowed_agents_cache_ttl       <duration>
//	        allowed_agents_cache_error_ttl <duration>
//	        usage_reporting_period         <duration>
//	        api_rate_limit <refill per second> <bucket size>
//	        agent_configuration_poll_period <duration>
//	        gitaly_ca_file <path>
//	        gitaly_global_rate_limit     <refill per second> <bucket size>
//	        gitaly_per_server_rate_limit <refill per second> <bucket size>
//	    }
//	    redis {
//	        addresses <host:port>...
//	        master_name <Sentinel master name>
//	        cluster
//	        username <user>
//	        password_file <path>
//	        sentinel_username <user>
//	        sentinel_password_file <path>
//	        database_index <n>
//	        tls {
//	            ca_file     <path>
//	            cert_file   <path>
//	            key_file    <path>
//	            server_name <name>
//	        }
//	        key_prefix     <prefix>
//	        tunnel_ttl     <duration>
//	        tunnel_refresh <duration>
//	    }
//	    private_api {
//	        listen      <network address>
//	        secret_file <path>
//	        tls         <cert file> <key file>
//	        ca_file     <path>
//	        own_url     <grpc(s)://host:port>
//	        own_cidrs   <cidr>...
//	        own_scheme  grpc|grpcs
//	        own_port    <port>
//	        own_host    <TLS server name>
//	    }
//	}
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the option name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "gitlab":
			if err := unmarshalBlock(d, &a.GitLab, (*GitLab).unmarshalCaddyfile); err != nil {
				return err
			}
		case "redis":
			if err := unmarshalBlock(d, &a.Redis, (*Redis).unmarshalCaddyfile); err != nil {
				return err
			}
		case "private_api":
			if err := unmarshalBlock(d, &a.PrivateAPI, (*PrivateAPI).unmarshalCaddyfile); err != nil {
				return err
			}
		case "shutdown_grace_period", "max_connection_age":
			name := d.Val()
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			if name == "max_connection_age" && v == "off" {
				a.MaxConnectionAge = -1
				continue
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return d.Errf("%s: %q is not a positive duration", name, v)
			}
			if name == "shutdown_grace_period" {
				a.ShutdownGracePeriod = caddy.Duration(dur)
			} else {
				a.MaxConnectionAge = caddy.Duration(dur)
			}
		default:
			return d.Errf("unrecognized kas option %q", d.Val())
		}
	}
	return nil
}

// unmarshalBlock parses the block of the option d is at into a new *T at
// dst, refusing the option given twice or with arguments.
func unmarshalBlock[T any](d *caddyfile.Dispenser, dst **T, parse func(*T, *caddyfile.Dispenser) error) error {
	if *dst != nil {
		return d.Errf("%s given twice", d.Val())
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	*dst = new(T)
	return parse(*dst, d)
}

func (g *GitLab) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	durations := map[string]*caddy.Duration{
		"agent_info_cache_ttl":            &g.AgentInfoCacheTTL,
		"agent_info_cache_error_ttl":      &g.AgentInfoCacheErrorTTL,
		"allowed_agents_cache_ttl":        &g.AllowedAgentsCacheTTL,
		"allowed_agents_cache_error_ttl":  &g.AllowedAgentsCacheErrorTTL,
		"agent_configuration_poll_period": &g.AgentConfigurationPollPeriod,
	}
	texts := map[string]*string{
		"url":            &g.URL,
		"secret_file":    &g.SecretFile,
		"ca_file":        &g.CAFile,
		"external_url":   &g.ExternalURL,
		"api_listen":     &g.APIListen,
		"gitaly_ca_file": &g.GitalyCAFile,
	}
	rateLimits := map[string]**RateLimit{
		"api_rate_limit":               &g.APIRateLimit,
		"gitaly_global_rate_limit":     &g.GitalyGlobalRateLimit,
		"gitaly_per_server_rate_limit": &g.GitalyPerServerRateLimit,
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		switch {
		case texts[name] != nil:
			if !d.AllArgs(texts[name]) {
				return d.ArgErr()
			}
		case durations[name] != nil || name == "usage_reporting_period":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur < 0 {
				return d.Errf("%s: %q is not a duration", name, v)
			}
			if name == "usage_reporting_period" {
				p := caddy.Duration(dur)
				g.UsageReportingPeriod = &p
				continue
			}
			*durations[name] = caddy.Duration(dur)
		case name == "api_tls":
			if !d.AllArgs(&g.APICertFile, &g.APIKeyFile) {
				return d.ArgErr()
			}
		case rateLimits[name] != nil:
			var rate, size string
			if !d.AllArgs(&rate, &size) {
				return d.ArgErr()
			}
			r, err := strconv.ParseFloat(rate, 64)
			if err != nil || !(r > 0) || math.IsInf(r, 0) {
				return d.Errf("%s: refill rate %q is not a positive number of calls per second", name, rate)
			}
			n, err := strconv.Atoi(size)
			if err != nil || n <= 0 {
				return d.Errf("%s: bucket size %q is not a positive integer", name, size)
			}
			*rateLimits[name] = &RateLimit{RefillRatePerSecond: r, BucketSize: n}
		default:
			return d.Errf("unrecognized gitlab option %q", name)
		}
	}
	return nil
}

func (r *Redis) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	texts := map[string]*string{
		"master_name":            &r.MasterName,
		"username":               &r.Username,
		"password_file":          &r.PasswordFile,
		"sentinel_username":      &r.SentinelUsername,
		"sentinel_password_file": &r.SentinelPasswordFile,
		"key_prefix":             &r.KeyPrefix,
	}
	durations := map[string]*caddy.Duration{"tunnel_ttl": &r.TunnelTTL, "tunnel_refresh": &r.TunnelRefresh}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		switch {
		case texts[name] != nil:
			if !d.AllArgs(texts[name]) {
				return d.ArgErr()
			}
		case durations[name] != nil:
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return d.Errf("%s: %q is not a positive duration", name, v)
			}
			*durations[name] = caddy.Duration(dur)
		case name == "addresses":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			r.Addresses = append(r.Addresses, args...)
		case name == "cluster":
			if d.NextArg() {
				return d.ArgErr()
			}
			r.Cluster = true
		case name == "database_index":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return d.Errf("database_index: %q is not a database number", v)
			}
			r.DatabaseIndex = n
		case name == "tls":
			if err := unmarshalBlock(d, &r.TLS, (*RedisTLS).unmarshalCaddyfile); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized redis option %q", name)
		}
	}
	return nil
}

func (t *RedisTLS) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	texts := map[string]*string{"ca_file": &t.CAFile, "cert_file": &t.CertFile, "key_file": &t.KeyFile, "server_name": &t.ServerName}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		f := texts[d.Val()]
		if f == nil {
			return d.Errf("unrecognized redis tls option %q", d.Val())
		}
		if !d.AllArgs(f) {
			return d.ArgErr()
		}
	}
	return nil
}

func (p *PrivateAPI) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	texts := map[string]*string{
		"listen":      &p.Listen,
		"secret_file": &p.SecretFile,
		"ca_file":     &p.CAFile,
		"own_url":     &p.OwnURL,
		"own_scheme":  &p.OwnScheme,
		"own_port":    &p.OwnPort,
		"own_host":    &p.OwnHost,
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		switch {
		case texts[name] != nil:
			if !d.AllArgs(texts[name]) {
				return d.ArgErr()
			}
		case name == "tls":
			if !d.AllArgs(&p.CertFile, &p.KeyFile) {
				return d.ArgErr()
			}
		case name == "own_cidrs":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			p.OwnCIDRs = append(p.OwnCIDRs, args...)
		default:
			return d.Errf("unrecognized private_api option %q", name)
		}
	}
	return nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*App)(nil)
