package nodetunnel_test

import (
	"errors"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-kas/caddy-kas/tunnel/nodetunnel"
)

// machine is a machine's interface addresses: loopback, link-local, two
// IPv4 and one IPv6 address.
func machine() ([]net.Addr, error) {
	var out []net.Addr
	for _, c := range []string{"127.0.0.1/8", "::1/128", "169.254.3.4/16", "fe80::1/64", "10.0.0.5/24", "192.168.7.9/24", "2001:db8::5/64", "::ffff:10.1.2.3/120"} {
		ip, n, err := net.ParseCIDR(c)
		if err != nil {
			return nil, err
		}
		n.IP = ip
		out = append(out, n)
	}
	return out, nil
}

func TestOwnURLs(t *testing.T) {
	tests := []struct {
		name      string
		s         nodetunnel.OwnURLSettings
		network   string
		addr      string
		want      []string
		wantErr   string
		wantNoURL bool
	}{
		{name: "explicit URL", s: nodetunnel.OwnURLSettings{URL: "grpc://kas-1.internal:8155"}, network: "tcp", addr: ":8155", want: []string{"grpc://kas-1.internal:8155"}},
		{name: "explicit grpcs URL", s: nodetunnel.OwnURLSettings{URL: "grpcs://[2001:db8::5]:8155"}, network: "tcp", addr: ":8155", want: []string{"grpcs://[2001:db8::5]:8155"}},
		{name: "explicit URL without port", s: nodetunnel.OwnURLSettings{URL: "grpc://kas-1"}, network: "tcp", addr: ":8155", wantErr: "OWN_PRIVATE_API_URL"},
		{name: "explicit URL of another scheme", s: nodetunnel.OwnURLSettings{URL: "http://kas-1:8155"}, network: "tcp", addr: ":8155", wantErr: "OWN_PRIVATE_API_URL"},
		{name: "URL and CIDR", s: nodetunnel.OwnURLSettings{URL: "grpc://a:1", CIDRs: []string{"10.0.0.0/8"}}, network: "tcp", addr: ":8155", wantErr: "exclude each other"},
		{name: "one CIDR, one match", s: nodetunnel.OwnURLSettings{CIDRs: []string{"10.0.0.0/24"}}, network: "tcp", addr: ":8155", want: []string{"grpc://10.0.0.5:8155"}},
		{name: "one CIDR, two matches", s: nodetunnel.OwnURLSettings{CIDRs: []string{"10.0.0.0/8"}}, network: "tcp", addr: ":8155", wantErr: "matches 2 addresses", wantNoURL: true},
		{name: "one CIDR, no match", s: nodetunnel.OwnURLSettings{CIDRs: []string{"172.16.0.0/12"}}, network: "tcp", addr: ":8155", wantErr: "no interface address", wantNoURL: true},
		{name: "several CIDRs", s: nodetunnel.OwnURLSettings{CIDRs: []string{"10.0.0.0/24", "2001:db8::/32"}}, network: "tcp", addr: ":8155", want: []string{"grpc://10.0.0.5:8155", "grpc://[2001:db8::5]:8155"}},
		{name: "IPv6 CIDR", s: nodetunnel.OwnURLSettings{CIDRs: []string{"2001:db8::/64"}, Port: "9000"}, network: "tcp", addr: ":8155", want: []string{"grpc://[2001:db8::5]:9000"}},
		{name: "bad CIDR", s: nodetunnel.OwnURLSettings{CIDRs: []string{"10.0.0.0"}}, network: "tcp", addr: ":8155", wantErr: "OWN_PRIVATE_API_CIDR"},
		{name: "wildcard tcp", network: "tcp", addr: ":8155", want: []string{"grpc://10.0.0.5:8155", "grpc://192.168.7.9:8155", "grpc://[2001:db8::5]:8155", "grpc://10.1.2.3:8155"}},
		{name: "wildcard 0.0.0.0 tcp4", network: "tcp4", addr: "0.0.0.0:8155", want: []string{"grpc://10.0.0.5:8155", "grpc://192.168.7.9:8155", "grpc://10.1.2.3:8155"}},
		{name: "wildcard [::] tcp6", network: "tcp6", addr: "[::]:8155", want: []string{"grpc://[2001:db8::5]:8155"}},
		{name: "concrete IPv4", network: "tcp", addr: "10.0.0.5:8155", want: []string{"grpc://10.0.0.5:8155"}},
		{name: "concrete IPv6", network: "tcp", addr: "[2001:db8::5]:8155", want: []string{"grpc://[2001:db8::5]:8155"}},
		{name: "host name", network: "tcp", addr: "kas-2.internal:8155", want: []string{"grpc://kas-2.internal:8155"}},
		{name: "port override", s: nodetunnel.OwnURLSettings{Port: "443"}, network: "tcp", addr: "10.0.0.5:8155", want: []string{"grpc://10.0.0.5:443"}},
		{name: "bad port", s: nodetunnel.OwnURLSettings{Port: "http"}, network: "tcp", addr: "10.0.0.5:8155", wantErr: "OWN_PRIVATE_API_PORT"},
		{name: "loopback", network: "tcp", addr: "127.0.0.1:8155", wantErr: "loopback", wantNoURL: true},
		{name: "no port", network: "tcp", addr: "10.0.0.5:0", wantErr: "no fixed port"},
		{name: "grpcs with host", s: nodetunnel.OwnURLSettings{Scheme: "grpcs", Host: "kas.internal"}, network: "tcp", addr: "10.0.0.5:8155", want: []string{"grpcs://10.0.0.5:8155"}},
		{name: "grpcs without host", s: nodetunnel.OwnURLSettings{Scheme: "grpcs"}, network: "tcp", addr: "10.0.0.5:8155", wantErr: "OWN_PRIVATE_API_HOST"},
		{name: "unknown scheme", s: nodetunnel.OwnURLSettings{Scheme: "https"}, network: "tcp", addr: "10.0.0.5:8155", wantErr: "OWN_PRIVATE_API_SCHEME"},
		{name: "unix socket", network: "unix", addr: "/run/kas/private.sock", want: []string{"unix:///run/kas/private.sock"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := nodetunnel.OwnURLs(tt.s, tt.network, tt.addr, machine)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("OwnURLs = %v, %v; want an error naming %q", got, err, tt.wantErr)
				}
				if errors.Is(err, nodetunnel.ErrNoOwnURL) != tt.wantNoURL {
					t.Errorf("errors.Is(ErrNoOwnURL) = %v", !tt.wantNoURL)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) {
				t.Errorf("OwnURLs = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func TestOwnURLSettingsFromEnv(t *testing.T) {
	env := map[string]string{
		"OWN_PRIVATE_API_CIDR":   "10.0.0.0/8, 2001:db8::/32",
		"OWN_PRIVATE_API_SCHEME": "grpcs",
		"OWN_PRIVATE_API_PORT":   "8155",
		"OWN_PRIVATE_API_HOST":   "kas.internal",
	}
	s := nodetunnel.OwnURLSettingsFromEnv(nodetunnel.OwnURLSettings{Port: "1"}, func(k string) string { return env[k] })
	if !slices.Equal(s.CIDRs, []string{"10.0.0.0/8", "2001:db8::/32"}) || s.Scheme != "grpcs" || s.Port != "8155" || s.Host != "kas.internal" || s.URL != "" {
		t.Errorf("settings %+v", s)
	}
	s = nodetunnel.OwnURLSettingsFromEnv(nodetunnel.OwnURLSettings{Port: "1"}, func(string) string { return "" })
	if s.Port != "1" {
		t.Errorf("an unset variable changed %+v", s)
	}
}
