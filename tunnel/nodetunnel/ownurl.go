package nodetunnel

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
)

// OwnURLSettings say how other nodes reach this node's private listener,
// with the names of GitLab's KAS (kas-spec §5.2), so that what its admins
// know applies.
type OwnURLSettings struct {
	// URL is the whole URL, e.g. grpc://10.0.0.5:8155
	// (OWN_PRIVATE_API_URL). It excludes CIDRs.
	URL string
	// CIDRs choose the addresses of this machine's interfaces to publish
	// (OWN_PRIVATE_API_CIDR, comma-separated).
	CIDRs []string
	// Scheme is grpc (HTTP/2 without TLS, the default) or grpcs (TLS)
	// (OWN_PRIVATE_API_SCHEME).
	Scheme string
	// Port is the port to publish; default the listener's
	// (OWN_PRIVATE_API_PORT).
	Port string
	// Host is the TLS server name other nodes verify this node's
	// certificate for (OWN_PRIVATE_API_HOST); required with grpcs unless
	// URL is given.
	Host string
}

// OwnURLSettingsFromEnv reads the settings GitLab's KAS reads from its
// environment; unset variables leave s's fields as they are.
func OwnURLSettingsFromEnv(s OwnURLSettings, getenv func(string) string) OwnURLSettings {
	if getenv == nil {
		getenv = os.Getenv
	}
	if v := getenv("OWN_PRIVATE_API_URL"); v != "" {
		s.URL = v
	}
	if v := getenv("OWN_PRIVATE_API_CIDR"); v != "" {
		s.CIDRs = nil
		for _, c := range strings.Split(v, ",") {
			if c = strings.TrimSpace(c); c != "" {
				s.CIDRs = append(s.CIDRs, c)
			}
		}
	}
	if v := getenv("OWN_PRIVATE_API_SCHEME"); v != "" {
		s.Scheme = v
	}
	if v := getenv("OWN_PRIVATE_API_PORT"); v != "" {
		s.Port = v
	}
	if v := getenv("OWN_PRIVATE_API_HOST"); v != "" {
		s.Host = v
	}
	return s
}

// ErrNoOwnURL is wrapped when no URL other nodes can use can be made.
var ErrNoOwnURL = errors.New("no address other nodes can reach this node at")

// OwnURLs returns the URLs this node publishes for its private listener,
// listening on network ("tcp", "tcp4", "tcp6" or "unix") at addr, with the
// machine's interface addresses from addrs (net.InterfaceAddrs).
//
//   - URL given: it, alone.
//   - CIDRs given: the interface addresses inside them; one CIDR must match
//     exactly one address (as GitLab's KAS requires), several may match any.
//   - Otherwise the listen address: a concrete IP or host name as it is; a
//     wildcard (":8155", "0.0.0.0:8155", "[::]:8155") publishes every
//     interface address but loopback and link-local ones, of the family
//     network allows; a unix socket, unix:///path.
//
// The errors name the setting that would fix them.
func OwnURLs(s OwnURLSettings, network, addr string, addrs func() ([]net.Addr, error)) ([]string, error) {
	scheme := s.Scheme
	if scheme == "" {
		scheme = "grpc"
	}
	if scheme != "grpc" && scheme != "grpcs" {
		return nil, fmt.Errorf("OWN_PRIVATE_API_SCHEME %q: want grpc or grpcs", scheme)
	}
	if s.URL != "" {
		if len(s.CIDRs) > 0 {
			return nil, errors.New("OWN_PRIVATE_API_URL and OWN_PRIVATE_API_CIDR exclude each other: set one")
		}
		u, err := url.Parse(s.URL)
		if err != nil || (u.Scheme != "grpc" && u.Scheme != "grpcs" && u.Scheme != "unix") || (u.Scheme != "unix" && u.Port() == "") {
			return nil, fmt.Errorf("OWN_PRIVATE_API_URL %q: want grpc://host:port, grpcs://host:port or unix:///path", s.URL)
		}
		return []string{s.URL}, nil
	}
	if scheme == "grpcs" && s.Host == "" {
		return nil, errors.New("OWN_PRIVATE_API_SCHEME grpcs needs OWN_PRIVATE_API_HOST, the name other nodes verify this node's certificate for")
	}
	if network == "unix" {
		return []string{"unix://" + addr}, nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("private API listen address %q: %w", addr, err)
	}
	if s.Port != "" {
		if n, err := strconv.Atoi(s.Port); err != nil || n <= 0 || n > 65535 {
			return nil, fmt.Errorf("OWN_PRIVATE_API_PORT %q is not a port", s.Port)
		}
		port = s.Port
	}
	if port == "" || port == "0" {
		return nil, fmt.Errorf("private API listen address %q has no fixed port: set one, or OWN_PRIVATE_API_PORT", addr)
	}
	mk := func(ip string) string { return scheme + "://" + net.JoinHostPort(ip, port) }

	if len(s.CIDRs) > 0 {
		prefixes := make([]netip.Prefix, 0, len(s.CIDRs))
		for _, c := range s.CIDRs {
			p, err := netip.ParsePrefix(c)
			if err != nil {
				return nil, fmt.Errorf("OWN_PRIVATE_API_CIDR %q: %w", c, err)
			}
			prefixes = append(prefixes, p.Masked())
		}
		ips, err := interfaceIPs(addrs)
		if err != nil {
			return nil, err
		}
		var out []string
		for _, ip := range ips {
			for _, p := range prefixes {
				if p.Contains(ip) {
					out = append(out, mk(ip.String()))
					break
				}
			}
		}
		switch {
		case len(out) == 0:
			return nil, fmt.Errorf("%w: no interface address is in OWN_PRIVATE_API_CIDR %s", ErrNoOwnURL, strings.Join(s.CIDRs, ","))
		case len(prefixes) == 1 && len(out) > 1:
			return nil, fmt.Errorf("%w: OWN_PRIVATE_API_CIDR %s matches %d addresses (%s); narrow it to one", ErrNoOwnURL, s.CIDRs[0], len(out), strings.Join(out, ", "))
		}
		return out, nil
	}

	ip, err := netip.ParseAddr(host)
	switch {
	case host != "" && err != nil:
		// A host name: other nodes resolve it.
		return []string{mk(host)}, nil
	case host != "" && !ip.IsUnspecified():
		if ip.IsLoopback() {
			return nil, fmt.Errorf("%w: the private API listens on loopback %s, which other nodes cannot reach; listen on an interface address, or set OWN_PRIVATE_API_URL or OWN_PRIVATE_API_CIDR", ErrNoOwnURL, host)
		}
		return []string{mk(ip.String())}, nil
	}
	ips, err := interfaceIPs(addrs)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, ip := range ips {
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() {
			continue
		}
		if (network == "tcp4" && !ip.Is4()) || (network == "tcp6" && !ip.Is6()) {
			continue
		}
		out = append(out, mk(ip.String()))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: this machine has no %s address but loopback and link-local ones; set OWN_PRIVATE_API_URL or OWN_PRIVATE_API_CIDR", ErrNoOwnURL, network)
	}
	return out, nil
}

// interfaceIPs returns the IPs of the interface addresses, IPv4-mapped ones
// unmapped.
func interfaceIPs(addrs func() ([]net.Addr, error)) ([]netip.Addr, error) {
	if addrs == nil {
		addrs = net.InterfaceAddrs
	}
	list, err := addrs()
	if err != nil {
		return nil, fmt.Errorf("listing this machine's addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range list {
		var ip net.IP
		switch v := a.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		default:
			continue
		}
		if na, ok := netip.AddrFromSlice(ip); ok {
			out = append(out, na.Unmap())
		}
	}
	return out, nil
}
