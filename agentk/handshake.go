package agentk

import (
	"crypto/x509"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strings"
)

// agentPath is the path of the agent endpoint on GitLab's host: GitLab's
// Workhorse, GitLab's chart Ingress and the caddy-kas examples serve KAS
// there (kas-spec §1.1).
const agentPath = "/-/kubernetes-agent/"

// refusal is what a server answered instead of switching protocols.
type refusal struct {
	status      int
	contentType string // media type, without parameters
	body        string // start of the body, redacted
	location    string // where a redirect points, credentials redacted
}

// fromKAS reports whether the refusal comes from a caddy-kas agent
// endpoint: it answers plain text with one of its fixed reasons
// (agentserver). GitLab's KAS never refuses a WebSocket handshake for the
// token: it checks the token on every gRPC call inside the tunnel. A 401
// answered otherwise comes from something in front of KAS, or from a
// server that is not KAS at all (GitLab's web server answers JSON, a login
// proxy HTML).
func (r *refusal) fromKAS() bool {
	if r.contentType != "text/plain" {
		return false
	}
	return r.body == "unauthenticated" || r.body == "missing agent token"
}

// newRefusal reads what a refused handshake answered.
func newRefusal(resp *http.Response, token string) *refusal {
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	r := &refusal{status: resp.StatusCode, contentType: mt, body: responseExcerpt(resp.Body, token)}
	if loc, err := resp.Location(); err == nil {
		loc.RawQuery = "" // may carry a session or token
		r.location = loc.Redacted()
	}
	return r
}

// diagnosis is a failed handshake, said for the log: what happened and
// what to change so that it does not happen again.
type diagnosis struct {
	message string
	fix     string // empty if there is nothing to change (KAS is busy, say)
}

// diagnose explains a handshake that failed with err and, if the server
// answered, ref.
func diagnose(kasAddress *url.URL, err error, ref *refusal) diagnosis {
	if ref == nil {
		return diagnoseDialError(err)
	}
	d := diagnosis{message: "KAS refused the tunnel handshake"}
	switch ref.status {
	case http.StatusUnauthorized:
		if !ref.fromKAS() {
			d.message = "a server that is not KAS refused the tunnel handshake"
			d.fix = "--kas-address leads to a server that asks for other credentials (a proxy or a login page in front of KAS, " +
				"or another service): point --kas-address at the agent endpoint, wss://<gitlab host>" + agentPath +
				", or give the credentials a proxy needs with --kas-header"
			break
		}
		d.message = "KAS refused the agent token"
		d.fix = "KAS does not know this agent token: check the file of --token-file or AGENTK_TOKEN (Helm chart: config.token " +
			"or config.secretName) against the token GitLab showed when the agent was registered, and that the token was not revoked"
	case http.StatusBadRequest:
		switch {
		case kasAddress.Scheme == "ws" && plainHTTPToTLSPort(ref.body):
			d.fix = "the server speaks TLS on this port: use wss:// instead of ws:// in --kas-address"
		case ref.fromKASUpgradeCheck():
			d.fix = "something between agentk and KAS (a proxy or load balancer) dropped the WebSocket Upgrade header: " +
				"let it pass the Upgrade and Connection headers on " + agentPath
		}
	case http.StatusNotFound:
		d.message = "no agent endpoint at --kas-address"
		switch {
		case strings.TrimSuffix(kasAddress.Path, "/") == strings.TrimSuffix(agentPath, "/") && kasAddress.Path != agentPath:
			d.fix = "add the trailing slash: the agent endpoint is " + agentPath
		case !strings.HasSuffix(kasAddress.Path, agentPath):
			d.fix = fmt.Sprintf("the server has nothing at %q: the agent endpoint is usually wss://<gitlab host>%s", pathOrRoot(kasAddress.Path), agentPath)
		default:
			d.fix = "the server at this host does not serve the agent endpoint: check the host of --kas-address, and that KAS " +
				"(or Caddy's kubernetes_agent handler) is routed on " + agentPath
		}
	case http.StatusOK:
		// Caddy answers 200 where no route matches, as do many web
		// servers' catch-all pages.
		d.fix = "the server answered like a web page instead of switching to WebSocket: nothing at this address speaks " +
			"the agent protocol; the agent endpoint is usually wss://<gitlab host>" + agentPath
	case http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther, http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		// Redirects are not followed: the agent token would go wherever
		// the redirect points (GitLab agentk does not follow them either).
		d.message = "KAS's address redirects the tunnel handshake"
		switch loc, err := url.Parse(ref.location); {
		case err == nil && ref.location != "" && loc.Path == kasAddress.Path+"/":
			d.fix = "add the trailing slash to --kas-address: the agent endpoint is " + agentPath
		case ref.location != "":
			d.fix = fmt.Sprintf("agentk does not follow redirects (the agent token would go along): put the address it redirects to, %s, into --kas-address with ws:// or wss://", ref.location)
		default:
			d.fix = "agentk does not follow redirects (the agent token would go along): put the address it redirects to into --kas-address"
		}
	}
	return d
}

// diagnoseDialError explains a handshake that got no HTTP answer.
func diagnoseDialError(err error) diagnosis {
	d := diagnosis{message: "cannot connect to KAS"}
	var unknownAuthority x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknownAuthority):
		d.fix = "KAS's certificate is signed by a CA agentk does not trust: give that CA's certificate with --kas-ca-cert-file " +
			"(Helm chart: --set-file config.kasCaCert=<ca.pem>), or check that no TLS-intercepting proxy is in the way"
	case errors.As(err, &hostname):
		d.fix = "KAS's certificate is not valid for the host of --kas-address: use a host name the certificate names, " +
			"or set --kas-tls-server-name to one of them"
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		d.fix = "KAS's certificate is expired or not yet valid: renew it, or check this machine's clock"
	}
	return d
}

// plainHTTPToTLSPort reports whether a 400 answer is a TLS server's
// complaint about a plain HTTP request (Go's net/http, and so Caddy, and
// nginx word it so).
func plainHTTPToTLSPort(body string) bool {
	return strings.Contains(body, "HTTP request to an HTTPS server") || strings.Contains(body, "plain HTTP request was sent to HTTPS port")
}

// fromKASUpgradeCheck reports whether a 400 answer is a caddy-kas agent
// endpoint's answer to a request without the WebSocket upgrade, which
// agentk always sends: something on the way removed it.
func (r *refusal) fromKASUpgradeCheck() bool {
	return r.contentType == "text/plain" && strings.HasPrefix(r.body, "This is the GitLab agent endpoint")
}

func pathOrRoot(p string) string {
	if p == "" {
		return "/"
	}
	return p
}
